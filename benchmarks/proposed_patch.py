"""The proposed CP-ALS change, as a monkeypatch of the engine's ``_run_als`` (for benchmarking only).

``import proposed_patch`` replaces ``_run_als`` in the engine's ALS module (``peft_cp_merge.engine.als``
or, before the restructuring, ``peft_cp_merge.cp_als``) by :func:`run_als`, which differs from it in
two ways (the same code is in ``results/real_adapters_proposed.diff`` as a patch of the engine):

1. Extrapolation (Bro's line search, as in tensorly's ``parafac(linesearch=True)``, per batch
   element): after each sweep from the third on, the factors are moved ``k^(1/p)`` times the last
   sweep's change (``A + s (A - A_prev)``, weights folded into ``C``); the trial is kept where its
   error is lower, and ``p`` grows by one for an element after 4 failed trials in a row.
2. Single-threaded ALS for small batches: the sweeps are thousands of tiny batched kernels; with
   more than one OpenMP thread on a loaded machine each kernel can wait for a descheduled thread.
   Below ``SINGLE_THREAD_WORK`` multiply-adds per product (``batch * M^2 * R``) the loop runs with
   ``torch.set_num_threads(1)`` (restored afterwards).

Knobs for experiments: ``EXTRAPOLATE`` (bool) and ``SINGLE_THREAD_WORK`` (0 disables).
"""

from __future__ import annotations

import importlib
import math
from contextlib import contextmanager

import torch
from torch import Tensor
from tqdm.auto import tqdm

for _name in ("peft_cp_merge.engine.als", "peft_cp_merge.cp_als"):
    try:
        als = importlib.import_module(_name)
        break
    except ModuleNotFoundError:
        continue

EXACT_ERROR_BELOW = als.EXACT_ERROR_BELOW
_solve_normal_equations = als._solve_normal_equations
ORIGINAL_RUN_ALS = als._run_als

EXTRAPOLATE = True
SINGLE_THREAD_WORK = 2**26
MAX_FAILS = 4


@contextmanager
def _threads_for(work: int):
    before = torch.get_num_threads()
    if SINGLE_THREAD_WORK and work < SINGLE_THREAD_WORK and before > 1 and not torch.cuda.is_available():
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    else:
        yield


def _normalized(form, factors, tiny):
    """Unit columns (true metric) of working factors; returns state, projections, grams, norms."""
    state, projections, grams, norms = [], [], [], []
    for mode, factor in enumerate(factors):
        gram, projection = form.metric(factor, mode)
        norm = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        inverse = 1.0 / norm.clamp_min(tiny)
        state.append(factor * inverse[:, None, :])
        projections.append(None if projection is None else projection * inverse[:, None, :])
        grams.append(gram * inverse[:, :, None] * inverse[:, None, :])
        norms.append(norm)
    return state, projections, grams, norms[0] * norms[1] * norms[2]


def run_als(form, factors, *, n_iter_max: int, tol: float, l2: float, progress):
    batch, rank = factors[0].shape[0], factors[0].shape[2]
    work = batch * form.shape[1] * form.shape[2] * rank
    with _threads_for(work):
        return _run_als(form, factors, n_iter_max=n_iter_max, tol=tol, l2=l2, progress=progress)


def _run_als(form, factors, *, n_iter_max: int, tol: float, l2: float, progress):
    """``_run_als`` of the engine plus extrapolation (see the module docstring)."""
    batch, rank = factors[0].shape[0], factors[0].shape[2]
    tiny = torch.finfo(factors[0].dtype).tiny
    norm_sq = form.norm_sq()
    out_weights = factors[0].new_zeros(batch, rank)
    out_factors = [f.clone() for f in factors]
    n_iter = torch.zeros(batch, dtype=torch.long, device=norm_sq.device)
    converged = norm_sq <= 0
    active = (~converged).nonzero().squeeze(1)
    form, norm_sq = form.select(active), norm_sq[active]
    state, projections, grams = form.to_working(tuple(f[active] for f in factors))
    weights = out_weights[active].clone()
    prev_error = torch.full_like(norm_sq, math.inf)
    acc_pow = torch.full_like(norm_sq, 2.0)
    acc_fail = torch.zeros_like(norm_sq)
    previous: list[Tensor] | None = None
    disable = True if active.numel() == 0 else (None if progress is None else not progress)
    bar = tqdm(total=n_iter_max, desc="CP-ALS", unit="it", disable=disable)
    for iteration in range(1, n_iter_max + 1):
        if active.numel() == 0:
            break
        for mode in range(3):
            hadamard = grams[(mode + 1) % 3] * grams[(mode + 2) % 3]
            mttkrp = form.mttkrp(state, mode, projections)
            unnormalized = _solve_normal_equations(hadamard, mttkrp, l2)
            gram, projection = form.metric(unnormalized, mode)
            weights = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
            inverse = 1.0 / weights.clamp_min(tiny)
            state[mode] = unnormalized * inverse[:, None, :]
            projections[mode] = None if projection is None else projection * inverse[:, None, :]
            grams[mode] = gram * inverse[:, :, None] * inverse[:, None, :]
        inner = (mttkrp * unnormalized).sum(dim=(1, 2))
        model_sq = (hadamard * gram).sum(dim=(1, 2))
        error = (norm_sq + model_sq - 2 * inner).clamp_min(0).sqrt() / norm_sq.sqrt()
        current = [state[0], state[1], state[2] * weights[:, None, :]]
        if EXTRAPOLATE and previous is not None and iteration > 2:
            step = (iteration ** (1.0 / acc_pow))[:, None, None]
            trial = [c + step * (c - p) for c, p in zip(current, previous, strict=True)]
            t_state, t_proj, t_grams, t_weights = _normalized(form, trial, tiny)
            t_inner = (form.mttkrp(t_state, 2, t_proj) * t_state[2]).sum(dim=1)
            t_model = torch.einsum("br,brs,bs->b", t_weights, t_grams[0] * t_grams[1] * t_grams[2], t_weights)
            t_error = (norm_sq + t_model - 2 * (t_inner * t_weights).sum(dim=1)).clamp_min(0).sqrt()
            t_error = t_error / norm_sq.sqrt()
            better = (t_error < error) & t_error.isfinite()
            acc_fail = torch.where(better, 0.0, acc_fail + 1)
            bump = acc_fail >= MAX_FAILS
            acc_pow, acc_fail = torch.where(bump, acc_pow + 1, acc_pow), torch.where(bump, 0.0, acc_fail)
            if better.any():
                keep = better[:, None, None]
                state = [torch.where(keep, t, s) for t, s in zip(t_state, state, strict=True)]
                projections = [
                    None if p is None else torch.where(keep, tp, p)
                    for tp, p in zip(t_proj, projections, strict=True)
                ]
                grams = [torch.where(keep, t, g) for t, g in zip(t_grams, grams, strict=True)]
                weights = torch.where(better[:, None], t_weights, weights)
                error = torch.where(better, t_error, error)
                current = [state[0], state[1], state[2] * weights[:, None, :]]
        previous = current
        if (error < EXACT_ERROR_BELOW).any():
            error = form.residual_sq(weights, form.from_working(state)).sqrt() / norm_sq.sqrt()
        done = (prev_error - error).abs() <= tol
        prev_error = error
        bar.update(1)
        last = iteration == n_iter_max
        if done.any() or last:
            finished = done | last
            index = active[finished]
            out_weights[index] = weights[finished]
            finished_factors = form.select(finished).from_working([f[finished] for f in state])
            for out, f in zip(out_factors, finished_factors, strict=True):
                out[index] = f
            n_iter[index] = iteration
            converged[index] = done[finished]
            keep = ~finished
            active, form, norm_sq, prev_error = (
                active[keep],
                form.select(keep),
                norm_sq[keep],
                prev_error[keep],
            )
            acc_pow, acc_fail = acc_pow[keep], acc_fail[keep]
            weights, state, grams = weights[keep], [f[keep] for f in state], [g[keep] for g in grams]
            projections = [None if p is None else p[keep] for p in projections]
            previous = [p[keep] for p in previous]
            bar.set_postfix(active=active.numel())
    bar.close()
    return out_weights, tuple(out_factors), n_iter, converged


als._run_als = run_als

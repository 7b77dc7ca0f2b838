"""Batched CP-ALS (PARAFAC by alternating least squares) for third-order tensors, in pure PyTorch.

``X ~= sum_r weights_r a_r o b_r o c_r`` for every element of a batch, where the batch is either a
dense ``(batch, I, J, K)`` tensor, the exact core of LoRA stacks (:class:`.LoraCore`), or
LoRA stacks themselves (:class:`.LoraStack`, compressed, decomposed on the core and
lifted back, never forming ``d_out x d_in x N``). Every batch element stops on its own criterion;
finished elements drop out of the working set.

References:
    Kolda & Bader, "Tensor Decompositions and Applications", SIAM Review 51(3), 2009.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .compression import CompressedLora, LoraCore, LoraStack, compress, lift
from .operators import EXACT_ERROR_BELOW, DenseForm, Factors, KruskalCoreForm, factor_grams
from .starts import INITS, initialize

__all__ = ["CPResult", "canonicalize", "check_options", "check_rank", "cp_als"]


@dataclass(frozen=True)
class CPResult:
    """A batch of CP decompositions in canonical form.

    Attributes:
        weights: ``(batch, R)``, non-negative, sorted in descending order.
        factors: ``(A (batch, I, R), B (batch, J, R), C (batch, K, R))`` with unit-norm columns; the
            largest-magnitude entry of each column of ``A`` and ``B`` is positive (signs go to ``C``).
            For LoRA input, ``A`` lives in the output space (``d_out``), ``B`` in the input space
            (``d_in``) and ``C`` holds each adapter's loadings.
        rel_error: ``(batch,)`` exact ``||X - X_hat|| / ||X||`` (0 for an all-zero tensor).
        n_iter: ``(batch,)`` ALS iterations run.
        converged: ``(batch,)`` whether the change in relative error fell to ``tol``.
        condition: ``(batch,)`` largest condition number of the normal equations at the end; large
            values (say > 1e8) mean collinear components: the rank is higher than the data supports.
    """

    weights: Tensor
    factors: tuple[Tensor, Tensor, Tensor]
    rel_error: Tensor
    n_iter: Tensor
    converged: Tensor
    condition: Tensor

    @property
    def rank(self) -> int:
        return self.weights.shape[1]

    def to_tensor(self) -> Tensor:
        """The dense reconstruction ``(batch, I, J, K)``. For small tensors."""
        a, b, c = self.factors
        return torch.einsum("br,bir,bjr,bkr->bijk", self.weights, a, b, c)


def canonicalize(weights: Tensor, factors: Factors) -> tuple[Tensor, Factors]:
    """Unit columns (norms into ``weights``), signs fixed on modes 0 and 1, weights descending."""
    tiny = torch.finfo(weights.dtype).tiny
    norms = [f.norm(dim=1) for f in factors]
    weights = weights * norms[0] * norms[1] * norms[2]
    factors = [f / n.clamp_min(tiny)[:, None, :] for f, n in zip(factors, norms, strict=True)]
    for mode in (0, 1):
        peak = factors[mode].abs().argmax(dim=1, keepdim=True)
        sign = torch.gather(factors[mode], 1, peak).sign()
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        factors[mode] = factors[mode] * sign
        factors[2] = factors[2] * sign
    # A negative weight can only come from outside (ALS weights are norms); push it into C.
    factors[2] = factors[2] * torch.where(weights < 0, -1.0, 1.0).to(weights)[:, None, :]
    weights = weights.abs()
    order = torch.argsort(weights, dim=1, descending=True, stable=True)
    weights = torch.gather(weights, 1, order)
    factors = [torch.gather(f, 2, order[:, None, :].expand_as(f)) for f in factors]
    return weights, tuple(factors)


def _solve_normal_equations(hadamard: Tensor, mttkrp: Tensor, l2: float) -> Tensor:
    """``X = mttkrp @ (H + ridge)^-1`` for symmetric ``H``; pseudo-inverse where ``H`` is singular.

    The ``R x R`` inverse comes from a Cholesky factorisation and is applied with one batched matmul,
    far cheaper than a solve with ``I_mode`` right-hand sides.
    """
    if l2 > 0:
        ridge = l2 * hadamard.diagonal(dim1=1, dim2=2).mean(dim=1)
        hadamard = hadamard + ridge[:, None, None] * torch.eye(hadamard.shape[1]).to(hadamard)
    factor, info = torch.linalg.cholesky_ex(hadamard)
    bad = info != 0
    if bad.any():  # keep cholesky_inverse away from failed factors; their rows are replaced below
        factor = torch.where(bad[:, None, None], torch.eye(factor.shape[1]).to(factor), factor)
    inverse = torch.cholesky_inverse(factor)
    if bad.any():
        inverse[bad] = torch.linalg.pinv(hadamard[bad], hermitian=True)
    return mttkrp @ inverse


def _condition(factors: Factors) -> Tensor:
    grams = factor_grams(factors)
    conds = []
    for mode in range(3):
        others = [grams[m] for m in range(3) if m != mode]
        eig = torch.linalg.eigvalsh(others[0] * others[1])
        conds.append(eig[:, -1] / eig[:, 0].clamp_min(torch.finfo(eig.dtype).tiny))
    return torch.stack(conds).amax(dim=0)


def check_rank(rank: int) -> None:
    """Raise a ``ValueError`` unless ``rank`` is an integer >= 1 (``bool`` is not an integer here)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")


def check_options(
    rank: int,
    init: str,
    n_iter_max: int,
    tol: float,
    l2: float,
    seed: int,
    dtype=torch.float64,
    line_search: bool = True,
) -> None:
    """Raise a ``ValueError`` naming the first bad CP-ALS option (for callers that check early)."""

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    check_rank(rank)
    if init not in INITS:
        raise ValueError(f"Unknown init {init!r}; expected one of {sorted(INITS)}")
    if not is_int(n_iter_max) or n_iter_max < 1:
        raise ValueError(f"n_iter_max must be an integer >= 1, got {n_iter_max!r}")
    if not (isinstance(tol, int | float) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if not (isinstance(l2, int | float) and math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if not isinstance(line_search, bool):
        raise ValueError(f"line_search must be True or False, got {line_search!r}")


# Below this many multiply-adds per batched product (batch * I * J * R) the ALS sweeps run on one
# thread: they are thousands of tiny kernels, and with more OpenMP threads on a loaded machine each
# one can wait for a descheduled thread (SmolLM2, 210 modules, M = 48, R = 16, 2 threads on a busy
# 2-core machine: 9.8 s instead of 3.1 s; benchmarks/real_adapters.py).
SINGLE_THREAD_WORK = 2**26
# Extrapolation (Bro's line search, as tensorly's parafac(linesearch=True)): a batch element's
# exponent p grows by one after this many rejected trials in a row.
EXTRAPOLATION_FAILS = 4


@contextmanager
def _few_threads(work: int):
    """One intra-op thread for small CPU work, the caller's count restored afterwards."""
    before = torch.get_num_threads()
    if work >= SINGLE_THREAD_WORK or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _normalized(form: DenseForm | KruskalCoreForm, factors: list[Tensor], tiny: float):
    """Working state (unit columns in the true metric), projections, Grams and weights of factors."""
    state, projections, grams, weights = [], [], [], None
    for mode, factor in enumerate(factors):
        gram, projection = form.metric(factor, mode)
        norm = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        inverse = 1.0 / norm.clamp_min(tiny)
        state.append(factor * inverse[:, None, :])
        projections.append(None if projection is None else projection * inverse[:, None, :])
        grams.append(gram * inverse[:, :, None] * inverse[:, None, :])
        weights = norm if weights is None else weights * norm
    return state, projections, grams, weights


def _trial(form: DenseForm | KruskalCoreForm, factors: list[Tensor], norm_sq: Tensor, tiny: float):
    """The working state of extrapolated factors and their exact relative error (one mttkrp)."""
    state, projections, grams, weights = _normalized(form, factors, tiny)
    inner = ((form.mttkrp(state, 2, projections) * state[2]).sum(dim=1) * weights).sum(dim=1)
    model_sq = torch.einsum("br,brs,bs->b", weights, grams[0] * grams[1] * grams[2], weights)
    error = (norm_sq + model_sq - 2 * inner).clamp_min(0).sqrt() / norm_sq.sqrt()
    return (state, projections, grams, weights), error


def _run_als(
    form: DenseForm | KruskalCoreForm,
    factors: Factors,
    *,
    n_iter_max: int,
    tol: float,
    l2: float,
    line_search: bool,
    progress: bool | None,
) -> tuple[Tensor, Factors, Tensor, Tensor]:
    """ALS sweeps until every batch element has converged; returns weights, factors, n_iter, converged.

    With ``line_search``, each sweep from the third on is followed by an extrapolation trial (Bro
    1998; tensorly's ``linesearch=True``): the factors move ``k^(1/p)`` times the last sweep's change
    (weights folded into ``C``), and the trial is kept where it lowers the error. On the six SmolLM2
    task adapters this cut the sweeps from 19,364 to 11,102 (modules at ``n_iter_max``: 22 -> 1) with a
    slightly lower error; on CPU small problems run on one thread (:data:`SINGLE_THREAD_WORK`).
    """
    batch, rank = factors[0].shape[0], factors[0].shape[2]
    work = batch * form.shape[1] * form.shape[2] * rank
    if factors[0].device.type != "cpu":
        work = SINGLE_THREAD_WORK
    with _few_threads(work):
        return _sweeps(
            form, factors, n_iter_max=n_iter_max, tol=tol, l2=l2, line_search=line_search, progress=progress
        )


def _sweeps(form, factors, *, n_iter_max, tol, l2, line_search, progress):
    batch, rank = factors[0].shape[0], factors[0].shape[2]
    tiny = torch.finfo(factors[0].dtype).tiny
    norm_sq = form.norm_sq()
    out_weights = factors[0].new_zeros(batch, rank)
    out_factors = [f.clone() for f in factors]
    n_iter = torch.zeros(batch, dtype=torch.long, device=norm_sq.device)
    converged = norm_sq <= 0  # an all-zero tensor is fitted by zero weights
    active = (~converged).nonzero().squeeze(1)
    form, norm_sq = form.select(active), norm_sq[active]
    state, projections, grams = form.to_working(tuple(f[active] for f in factors))
    weights = out_weights[active].clone()
    prev_error = torch.full_like(norm_sq, math.inf)
    exponent = torch.full_like(norm_sq, 2.0)  # extrapolation step k^(1/exponent)
    fails = torch.zeros_like(norm_sq)
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
        # Cheap error from the last (mode-2) update: ||X||^2 + ||X_hat||^2 - 2 <X, X_hat>.
        inner = (mttkrp * unnormalized).sum(dim=(1, 2))
        model_sq = (hadamard * gram).sum(dim=(1, 2))
        error = (norm_sq + model_sq - 2 * inner).clamp_min(0).sqrt() / norm_sq.sqrt()
        current = [state[0], state[1], state[2] * weights[:, None, :]]
        if line_search and previous is not None and iteration > 2:
            step = (iteration ** (1.0 / exponent))[:, None, None]
            trial = [c + step * (c - p) for c, p in zip(current, previous, strict=True)]
            (t_state, t_proj, t_grams, t_weights), t_error = _trial(form, trial, norm_sq, tiny)
            better = (t_error < error) & t_error.isfinite()
            fails = torch.where(better, 0.0, fails + 1)
            bump = fails >= EXTRAPOLATION_FAILS
            exponent, fails = torch.where(bump, exponent + 1, exponent), torch.where(bump, 0.0, fails)
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
            exponent, fails, previous = exponent[keep], fails[keep], [p[keep] for p in previous]
            weights, state, grams = weights[keep], [f[keep] for f in state], [g[keep] for g in grams]
            projections = [None if p is None else p[keep] for p in projections]
            bar.set_postfix(active=active.numel())
    bar.close()
    return out_weights, tuple(out_factors), n_iter, converged


@torch.no_grad()
def cp_als(
    tensor: Tensor | LoraCore | LoraStack,
    rank: int,
    *,
    init: str | Factors = "gevd",
    n_iter_max: int = 200,
    tol: float = 1e-5,
    l2: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    line_search: bool = True,
    progress: bool | None = False,
) -> CPResult:
    """Fit a rank-``rank`` CP model to every element of a batch of third-order tensors.

    Args:
        tensor: A dense ``(batch, I, J, K)`` tensor, a :class:`.LoraCore`, or a
            :class:`.LoraStack` (compressed exactly, decomposed on the core, lifted back:
            factors ``(batch, d_out, R)``, ``(batch, d_in, R)``, ``(batch, N, R)``).
        rank: Number of components ``R``.
        init: ``"gevd"`` (algebraic start, exact for CP rank <= R; falls back to ``"svd"`` where it
            does not apply; for LoRA input with ``R >= sum(r_i)`` the exact rank-``sum(r_i)``
            decomposition is returned without iterating), ``"svd"`` (leading singular vectors of
            the unfoldings), ``"random"``, or
            three initial factors ``(batch, dim, R)`` in the input's coordinates (for a LoRA stack
            ``d_out``, ``d_in``, ``N``; they are projected onto the stack's column spaces).
        n_iter_max: Maximum number of ALS sweeps.
        tol: Stop a batch element when its relative error changes by at most ``tol`` in a sweep.
        l2: Ridge term added to each normal-equation matrix, relative to its mean diagonal.
        seed: Seed of the CPU generator behind every random number (random init, gevd mixtures,
            padding columns); the same seed gives bit-identical results on the same device.
        dtype: Precision of the ALS (float64 by default; the core is small).
        line_search: Extrapolate after each sweep and keep the trial where it fits better (Bro's line
            search, as tensorly's ``parafac(linesearch=True)``); ``False`` runs plain ALS, sweep for
            sweep as tensorly's ``parafac`` from the same start.
        progress: Show a progress bar over sweeps.

    Returns:
        A :class:`CPResult` in canonical form, in the input's dtype and on its device.

    Raises:
        ValueError: For a tensor of the wrong shape or with non-finite values, or a bad option.

    Example:
        >>> a, b, c = torch.randn(2, 8, 3), torch.randn(2, 7, 3), torch.randn(2, 5, 3)
        >>> x = torch.einsum("bir,bjr,bkr->bijk", a, b, c)
        >>> result = cp_als(x, 3)
        >>> bool((result.rel_error < 1e-6).all())
        True
    """
    init_name = "svd" if isinstance(init, tuple | list) else init
    check_options(rank, init_name, n_iter_max, tol, l2, seed, dtype, line_search)
    compressed: CompressedLora | None = None
    if isinstance(tensor, LoraStack):
        _check_finite(*tensor.lora_A, *tensor.lora_B, tensor.scales)
        out_dtype = tensor.lora_A[0].dtype
        compressed = compress(tensor)
        form = KruskalCoreForm(compressed.core, dtype)
    elif isinstance(tensor, LoraCore):
        _check_finite(tensor.left, tensor.right)
        out_dtype, form = tensor.left.dtype, KruskalCoreForm(tensor, dtype)
    elif isinstance(tensor, Tensor):
        if tensor.ndim != 4 or not tensor.is_floating_point():
            raise ValueError(
                f"Expected a floating (batch, I, J, K) tensor, got {tensor.dtype} "
                f"of shape {tuple(tensor.shape)}"
            )
        _check_finite(tensor)
        out_dtype, form = tensor.dtype, DenseForm(tensor.to(dtype))
    else:
        raise ValueError(f"Expected a Tensor, LoraCore or LoraStack, got {type(tensor).__name__}")

    if isinstance(form, KruskalCoreForm) and init == "gevd" and rank >= form.left.shape[2]:
        # The core is itself a CP of rank M = sum(r_i): with R >= M it is the exact answer.
        weights, factors = form.exact_decomposition(rank)
        n_iter = torch.zeros(weights.shape[0], dtype=torch.long, device=weights.device)
        converged = torch.ones_like(n_iter, dtype=torch.bool)
    else:
        if isinstance(init, tuple | list):
            factors = _given_init(init, form, rank, tensor, compressed)
        else:
            factors = initialize(form, rank, init=init, seed=seed)
        weights, factors, n_iter, converged = _run_als(
            form, factors, n_iter_max=n_iter_max, tol=tol, l2=l2, line_search=line_search, progress=progress
        )
    norm_sq = form.norm_sq()
    residual_sq = form.final_residual_sq(weights, factors)
    rel_error = torch.where(norm_sq > 0, residual_sq.sqrt() / norm_sq.sqrt().clamp_min(1e-300), 0.0)
    condition = _condition(factors)
    if compressed is not None:
        factors = (
            lift(factors[0], tensor.cat_B(), compressed.basis_B, out_dtype=dtype),
            lift(factors[1], tensor.cat_A().mT, compressed.basis_A, out_dtype=dtype),
            factors[2],
        )
    weights, factors = canonicalize(weights, factors)
    return CPResult(
        weights=weights.to(out_dtype),
        factors=tuple(f.to(out_dtype) for f in factors),
        rel_error=rel_error.to(out_dtype),
        n_iter=n_iter,
        converged=converged,
        condition=condition,
    )


def _given_init(init, form, rank: int, tensor, compressed: CompressedLora | None) -> Factors:
    """Validate user-given initial factors and bring them into the form's coordinates."""
    dims = (tensor.shape[1], tensor.shape[2], tensor.shape[3]) if compressed is not None else form.shape[1:]
    expected = [(form.shape[0], dim, rank) for dim in dims]
    if len(init) != 3 or [tuple(f.shape) for f in init] != expected:
        raise ValueError(f"init factors must have shapes {expected}, got {[tuple(f.shape) for f in init]}")
    like = form.tensor if isinstance(form, DenseForm) else form.left
    factors = [f.to(like) for f in init]
    if compressed is not None:  # project onto the spans: core coordinates Q^T F
        q_b_t = (tensor.cat_B().to(like) @ compressed.basis_B).mT
        q_a_t = (tensor.cat_A().mT.to(like) @ compressed.basis_A).mT
        factors[0], factors[1] = q_b_t @ factors[0], q_a_t @ factors[1]
    return tuple(factors)


def _check_finite(*tensors: Tensor) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise ValueError(
                f"Input contains non-finite values (NaN or inf) in a tensor of shape {tuple(t.shape)}"
            )

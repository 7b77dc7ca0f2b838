"""Why cp merges of real adapters run long: the investigation behind the engine's line search.

On the quality benchmark's six SmolLM2 task adapters (or any adapter folders), one batched core of
all modules, single thread, written to ``benchmarks/results/real_adapters_investigation.json``: the
error trajectory of every module over a long run, stopping rules evaluated on those trajectories
(sweeps, fit excess, distance of the merged delta to the converged one), starts (gevd / svd /
random), extrapolation (line search) in the ALS, and the thread count of the ALS phase. The
prototype ALS (``_als``) mirrors the engine's ``_sweeps`` with a pluggable stopping rule and
extrapolation; its findings are in the README ("Real adapters") and in ``docs/design.md``.

Usage (from the repository root, after training the six adapters, see ``real_adapters.py``)::

    python benchmarks/real_adapters_investigation.py
    python benchmarks/real_adapters_investigation.py --long-iters 1000 --random-starts 1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_adapters import DEFAULT_FOLDERS, _engine, cores_of, default_rank, environment, load_stacks  # noqa: E402

OUT = HERE / "results" / "real_adapters_investigation.json"


def _error_of(form, alpha, beta, wc, norm_sq):
    """Relative error of the model (a = left alpha, b = right beta, c = wc (weights folded in))."""
    g1, g2 = form._input_grams()
    pa, pb = g1 @ alpha, g2 @ beta
    ga, gb, gc = alpha.mT @ pa, beta.mT @ pb, wc.mT @ wc
    model_sq = (ga * gb * gc).sum(dim=(1, 2))
    pc = torch.einsum("km,bkr->bmr", form.indicator, wc)
    inner = (pa * pb * pc).sum(dim=(1, 2))
    return (norm_sq + model_sq - 2 * inner).clamp_min(0).sqrt() / norm_sq.sqrt()


def _als(
    form,
    factors,
    *,
    n_iter_max=200,
    tol=1e-5,
    rule="abs",
    window=1,
    extrapolate=None,
    record=False,
    reference=None,
    bound=None,
):
    """Prototype of ``_run_als`` on a KruskalCoreForm (no active-set shrinking when ``record``).

    rule: "abs" (|e_{k-w} - e_k| <= tol: the engine's with window 1), "rel" ((e_{k-w} - e_k) <= tol e_k),
    "bound" (abs rule, or e_k <= (1 + tol_bound) * bound). extrapolate: None or "bro" (Bro's line
    search: jump k^(1/p), p grows after 4 failures) or a float step s (constant extrapolation).
    record: return every sweep's error (and distance to ``reference`` deltas if given).
    Returns dict(weights, factors(core coords), n_iter, converged, errors, dists).
    """
    _solve_normal_equations = _engine("als")._solve_normal_equations

    batch, rank = factors[0].shape[0], factors[0].shape[2]
    tiny = torch.finfo(factors[0].dtype).tiny
    norm_sq_all = form.norm_sq()
    out_w = factors[0].new_zeros(batch, rank)
    out_f = [f.clone() for f in factors]
    n_iter = torch.zeros(batch, dtype=torch.long)
    converged = torch.zeros(batch, dtype=torch.bool)
    active = torch.arange(batch)
    f_all = form
    state, projections, grams = form.to_working(factors)
    norm_sq = norm_sq_all
    history = [torch.full((batch,), math.inf, dtype=norm_sq.dtype)]
    errors, dists = [], []
    acc_pow, acc_fail = 2.0, 0
    prev = None
    weights = None
    for iteration in range(1, n_iter_max + 1):
        if active.numel() == 0:
            break
        for mode in range(3):
            hadamard = grams[(mode + 1) % 3] * grams[(mode + 2) % 3]
            mttkrp = form.mttkrp(state, mode, projections)
            unnormalized = _solve_normal_equations(hadamard, mttkrp, 0.0)
            gram, projection = form.metric(unnormalized, mode)
            weights = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
            inverse = 1.0 / weights.clamp_min(tiny)
            state[mode] = unnormalized * inverse[:, None, :]
            projections[mode] = None if projection is None else projection * inverse[:, None, :]
            grams[mode] = gram * inverse[:, :, None] * inverse[:, None, :]
        inner = (mttkrp * unnormalized).sum(dim=(1, 2))
        model_sq = (hadamard * gram).sum(dim=(1, 2))
        error = (norm_sq + model_sq - 2 * inner).clamp_min(0).sqrt() / norm_sq.sqrt()
        current = (state[0], state[1], state[2] * weights[:, None, :])
        if extrapolate is not None and prev is not None and iteration > 2:
            step = iteration ** (1.0 / acc_pow) if extrapolate == "bro" else float(extrapolate)
            trial = [c + step * (c - p) for c, p in zip(current, prev, strict=True)]
            trial_error = _error_of(form, *trial, norm_sq)
            better = trial_error < error
            if extrapolate == "bro":
                if bool(better.all()):
                    acc_fail = 0
                else:
                    acc_fail += 1
                    if acc_fail == 4:
                        acc_pow, acc_fail = acc_pow + 1.0, 0
            if better.any():
                keep = better[:, None, None]
                current = tuple(torch.where(keep, t, c) for t, c in zip(trial, current, strict=True))
                error = torch.where(better, trial_error, error)
                # back to the working state: unit columns (true metric), weights from C's norms
                g1, g2 = form._input_grams()
                alpha, beta, wc = current
                na = (alpha * (g1 @ alpha)).sum(dim=1).clamp_min(0).sqrt()
                nb = (beta * (g2 @ beta)).sum(dim=1).clamp_min(0).sqrt()
                alpha, beta = alpha / na.clamp_min(tiny)[:, None, :], beta / nb.clamp_min(tiny)[:, None, :]
                wc = wc * (na * nb)[:, None, :]
                weights = wc.norm(dim=1)
                c = wc / weights.clamp_min(tiny)[:, None, :]
                state = [alpha, beta, c]
                projections = [g1 @ alpha, g2 @ beta, None]
                grams = [alpha.mT @ projections[0], beta.mT @ projections[1], c.mT @ c]
                current = (alpha, beta, c * weights[:, None, :])
        prev = current
        history.append(error)
        if record:
            errors.append(error.clone())
            if reference is not None:
                dists.append(_delta_distance(form, state, weights, reference))
        past = history[max(0, len(history) - 1 - window)]
        if rule == "abs":
            done = (past - error).abs() <= tol * window
        elif rule == "rel":
            done = (past - error).abs() <= tol * window * error
        elif rule == "bound":
            done = ((past - error).abs() <= 1e-5 * window) | (error <= (1 + tol) * bound[active])
        else:
            raise ValueError(rule)
        if record:
            done = torch.zeros_like(done)
        last = iteration == n_iter_max
        if done.any() or last:
            finished = done | last
            index = active[finished]
            out_w[index] = weights[finished]
            ff = form.select(finished).from_working([f[finished] for f in state])
            for o, f in zip(out_f, ff, strict=True):
                o[index] = f
            n_iter[index] = iteration
            converged[index] = done[finished]
            keep = ~finished
            active, form, norm_sq = active[keep], form.select(keep), norm_sq[keep]
            history = [h[keep] for h in history]
            weights, state, grams = weights[keep], [f[keep] for f in state], [g[keep] for g in grams]
            projections = [None if p is None else p[keep] for p in projections]
            prev = tuple(p[keep] for p in prev)
    del f_all
    return {
        "weights": out_w,
        "factors": tuple(out_f),
        "n_iter": n_iter,
        "converged": converged,
        "errors": torch.stack(errors, dim=1) if errors else None,
        "dists": torch.stack(dists, dim=1) if dists else None,
    }


def _merged_core_delta(left_coef_a, right_coef_b, weights, c, form):
    """Merged delta (weights 1, 'weighted') in core coordinates: sum_r w_r (sum_i c_ir) a_r b_r^T."""
    a = form.left @ left_coef_a
    b = form.right @ right_coef_b
    gains = weights * c.sum(dim=1)
    return (a * gains[:, None, :]) @ b.mT


def _delta_distance(form, state, weights, reference):
    delta = _merged_core_delta(state[0], state[1], weights, state[2], form)
    return torch.linalg.matrix_norm(delta - reference) / torch.linalg.matrix_norm(reference)


def _core_delta_from_result(form, result_factors, weights):
    """Merged delta from core-coordinate factors (a, b, c) as returned by from_working."""
    a, b, c = result_factors
    gains = weights * c.sum(dim=1)
    return (a * gains[:, None, :]) @ b.mT


def _weighted_sum(form):
    return form.left @ form.right.mT  # every adapter's columns with weight 1


def unfolding_bound(form, rank: int) -> torch.Tensor:
    """Lower bound on any rank-R CP error: the rank-R truncation error of the worst unfolding."""
    norm_sq = form.norm_sq()
    bounds = []
    for mode in range(3):
        eig = torch.linalg.eigvalsh(form.unfolding_gram(mode)).flip(-1).clamp_min(0)
        bounds.append(eig[:, rank:].sum(dim=1))
    return (torch.stack(bounds).amax(dim=0) / norm_sq).sqrt()


def investigate(stacks, rank: int, args) -> dict:
    initialize = _engine("starts").initialize
    KruskalCoreForm = _engine("operators").KruskalCoreForm

    torch.set_num_threads(1)
    names, compressed, _ = cores_of(stacks)
    form = KruskalCoreForm(compressed.core)
    norm_sq = form.norm_sq()
    target = _weighted_sum(form)
    out: dict = {"modules": names, "rank": rank}
    bound = unfolding_bound(form, rank)
    out["unfolding_bound"] = bound.tolist()

    # 1. long runs from every start: trajectories and the best reached fit
    long_iters = args.long_iters
    starts = {
        "gevd": initialize(form, rank, init="gevd", seed=0),
        "svd": initialize(form, rank, init="svd", seed=0),
    }
    for s in range(args.random_starts):
        starts[f"random{s}"] = initialize(form, rank, init="random", seed=s)
    finals = {}
    for name, start in starts.items():
        t0 = time.perf_counter()
        res = _als(form, start, n_iter_max=long_iters, tol=0.0, rule="abs")
        secs = time.perf_counter() - t0
        fit = (form.final_residual_sq(res["weights"], res["factors"]) / norm_sq).sqrt()
        finals[name] = {"fit": fit, "res": res, "secs": secs}
        print(f"long run {name}: {secs:.1f} s, fit median {fit.median():.5f}", flush=True)
    best_fit = torch.stack([f["fit"] for f in finals.values()]).amin(dim=0)
    out["best_fit_any_start"] = best_fit.tolist()
    out["long_runs"] = {
        name: {
            "secs": f["secs"],
            "n_iter": long_iters,
            "fit": f["fit"].tolist(),
            "excess_over_best": (f["fit"] / best_fit - 1).tolist(),
        }
        for name, f in finals.items()
    }
    # the gevd long run is the reference for "distance to the converged merged delta"
    ref = finals["gevd"]["res"]
    ref_delta = _core_delta_from_result(form, ref["factors"], ref["weights"])
    ref_fit = finals["gevd"]["fit"]
    ref_rel = torch.linalg.matrix_norm(ref_delta - target) / torch.linalg.matrix_norm(target)

    # 2. recorded gevd trajectory (same start, deterministic): error and delta distance per sweep
    rec = _als(form, starts["gevd"], n_iter_max=args.record_iters, tol=0.0, record=True, reference=ref_delta)
    errs, dists = rec["errors"], rec["dists"]  # (batch, iters)
    out["trajectory_checkpoints"] = {
        str(k): {
            "fit_excess_median": float((errs[:, k - 1] / ref_fit - 1).median()),
            "fit_excess_max": float((errs[:, k - 1] / ref_fit - 1).max()),
            "delta_dist_median": float(dists[:, k - 1].median()),
            "delta_dist_max": float(dists[:, k - 1].max()),
        }
        for k in (1, 5, 10, 20, 50, 100, 200, 500, args.record_iters)
        if k <= args.record_iters
    }

    # 3. stopping rules evaluated on the recorded trajectory (sweeps to stop, fit and delta there)
    def evaluate(stop_fn, label):
        iters = errs.shape[1]
        stops = []
        for b in range(errs.shape[0]):
            e = errs[b]
            k_stop = iters
            for k in range(1, iters + 1):
                if stop_fn(e, k, b):
                    k_stop = k
                    break
            stops.append(k_stop)
        stops_t = torch.tensor(stops)
        fit_at = errs[torch.arange(len(stops)), stops_t - 1]
        dist_at = dists[torch.arange(len(stops)), stops_t - 1]
        return {
            "rule": label,
            "sweeps_sum": int(stops_t.sum()),
            "sweeps_max": int(stops_t.max()),
            "hit_cap_200": int((stops_t >= 200).sum()),
            "fit_excess_median": float((fit_at / ref_fit - 1).median()),
            "fit_excess_max": float((fit_at / ref_fit - 1).max()),
            "delta_dist_median": float(dist_at.median()),
            "delta_dist_max": float(dist_at.max()),
        }

    def abs_rule(tol, window=1, cap=200):
        def f(e, k, b):
            if k >= cap:
                return True
            past = e[k - 1 - window] if k - 1 - window >= 0 else math.inf
            return abs(past - e[k - 1]) <= tol * window

        return f

    def rel_rule(tol, window=1, cap=200):
        def f(e, k, b):
            if k >= cap:
                return True
            past = e[k - 1 - window] if k - 1 - window >= 0 else math.inf
            return abs(past - e[k - 1]) <= tol * window * e[k - 1]

        return f

    def obj_rule(tol, window=1, cap=200):  # relative change of the squared error (the ALS objective)
        def f(e, k, b):
            if k >= cap:
                return True
            past = e[k - 1 - window] if k - 1 - window >= 0 else math.inf
            return abs(past**2 - e[k - 1] ** 2) <= tol * window * e[k - 1] ** 2

        return f

    def bound_rule(slack, cap=200):
        def f(e, k, b):
            return (
                k >= cap
                or abs((e[k - 2] if k > 1 else math.inf) - e[k - 1]) <= 1e-5
                or e[k - 1] <= (1 + slack) * bound[b]
            )

        return f

    rules = [evaluate(abs_rule(1e-5), "engine: |de| <= 1e-5, cap 200")]
    for tol in (1e-4, 3e-5, 1e-5, 3e-6):
        rules.append(evaluate(abs_rule(tol), f"|de| <= {tol:g}"))
    for tol in (1e-3, 3e-4, 1e-4, 3e-5, 1e-5):
        rules.append(evaluate(rel_rule(tol), f"|de| <= {tol:g} e"))
    for tol in (1e-3, 3e-4, 1e-4):
        for window in (5, 10):
            rules.append(evaluate(rel_rule(tol, window), f"|e(k-{window}) - e(k)| <= {window} {tol:g} e"))
    for cap in (50, 100):
        rules.append(evaluate(abs_rule(1e-5, cap=cap), f"|de| <= 1e-5, cap {cap}"))
        rules.append(evaluate(rel_rule(1e-4, cap=cap), f"|de| <= 1e-4 e, cap {cap}"))
    for slack in (0.01, 0.05):
        rules.append(evaluate(bound_rule(slack), f"engine rule or e <= (1+{slack}) unfolding bound"))
    out["stopping_rules"] = rules
    for r in rules:
        print(json.dumps(r), flush=True)

    # 4. starts and extrapolation, real runs with each rule (timed, 1 thread), fit & delta vs reference
    def summarize(label, fn, repeats=3):
        secs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = fn()
            secs.append(time.perf_counter() - t0)
        fit = (form.final_residual_sq(res["weights"], res["factors"]) / norm_sq).sqrt()
        delta = _core_delta_from_result(form, res["factors"], res["weights"])
        dist = torch.linalg.matrix_norm(delta - ref_delta) / torch.linalg.matrix_norm(ref_delta)
        rel = torch.linalg.matrix_norm(delta - target) / torch.linalg.matrix_norm(target)
        row = {
            "variant": label,
            "als_s_median": statistics.median(secs),
            "als_runs_s": secs,
            "sweeps_sum": int(res["n_iter"].sum()),
            "hit_cap": int((~res["converged"]).sum()),
            "fit_median": float(fit.median()),
            "fit_excess_over_best_median": float((fit / best_fit - 1).median()),
            "fit_excess_over_best_max": float((fit / best_fit - 1).max()),
            "fit_excess_over_ref_max": float((fit / ref_fit - 1).max()),
            "delta_dist_to_ref_median": float(dist.median()),
            "delta_dist_to_ref_max": float(dist.max()),
            "rel_error_to_sum_median": float(rel.median()),
            "rel_error_to_sum_ref_median": float(ref_rel.median()),
        }
        print(json.dumps(row), flush=True)
        return row

    variants = []
    for init in ("gevd", "svd", "random0"):
        variants.append(summarize(f"init {init}, engine rule", lambda s=starts[init]: _als(form, s)))
    g = starts["gevd"]
    variants.append(summarize("gevd, |de| <= 1e-4 e", lambda: _als(form, g, tol=1e-4, rule="rel")))
    variants.append(
        summarize("gevd, |de| <= 1e-4 e over 5", lambda: _als(form, g, tol=1e-4, rule="rel", window=5))
    )
    for ex in ("bro", 0.5, 1.0):
        variants.append(
            summarize(f"gevd, engine rule, extrapolate {ex}", lambda ex=ex: _als(form, g, extrapolate=ex))
        )
        variants.append(
            summarize(
                f"gevd, |de| <= 1e-4 e, extrapolate {ex}",
                lambda ex=ex: _als(form, g, tol=1e-4, rule="rel", extrapolate=ex),
            )
        )
    variants.append(summarize("gevd, engine rule, n_iter_max 1000", lambda: _als(form, g, n_iter_max=1000)))
    out["variants"] = variants
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folders", nargs="*", type=Path, help="adapter folders (default: the six task adapters)"
    )
    parser.add_argument("--rank", type=int, default=None, help="cp rank (default min(2 max r, sum r))")
    parser.add_argument("--long-iters", type=int, default=3000)
    parser.add_argument("--record-iters", type=int, default=1000)
    parser.add_argument("--random-starts", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    stacks = load_stacks(args.folders or DEFAULT_FOLDERS)
    rank = args.rank or default_rank(stacks)
    inv = investigate(stacks, rank, args)
    inv["environment"] = environment([1])
    args.out.write_text(json.dumps(inv, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

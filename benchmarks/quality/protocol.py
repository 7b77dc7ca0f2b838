"""Issue 11's protocol: three adapter seeds, 100 validation items per task, one ``lam`` grid for all.

Regimes (``--jobs regime:method``):

- ``seed0``, ``seed1``, ``seed2``: the six per-task adapters of one seed (``seeds_train.py``; seed 0 is
  the main benchmark's ``cache/adapters``);
- ``pooled``: all 18 adapters (6 tasks x 3 seeds) merged at once. Same-task adapters from different
  seeds share structure: the regime CP is meant for. ``N`` = 18, full rank ``sum r`` = 144.

Protocol. Each method's merge (weights 1, ``stages._compute``) is scaled by ``lam`` from
:data:`GRID`, one grid for every method (``1/N`` sorted in by value). ``lam`` is chosen on the first
100 validation items of each task (the main split's 40 plus 60 drawn after the training split:
``tasks.load_tasks(extra_validation=60)``) by hill climbing on the grid: start at :data:`START` (the
main benchmark's choice), evaluate both neighbours, move to the best (ties: the smaller ``lam``)
until the current point beats both. The chosen ``lam`` is evaluated on test (600 items); ``cat`` is
the mean (``lam = 1/N``, test only). The data-free ``norm`` rule (``strength.py``: ``||lam M|| =
mean_i ||dW_i||``) is computed for every merge and its nearest grid point is evaluated on validation
too; the chosen ``lam`` is the best of every point evaluated. Evaluations are cached under
``results/evals/protocol/<regime>/``; seed 0's test runs and individual adapters are reused from
``results/evals/osrm/plain`` (same adapters, items and harness; marked ``reused_from``).
``protocol_summary.py`` writes ``results/protocol.json``.

Commands (from the repository root; one job = one merge method in one regime, 5-15 min each with
1 thread; two processes side by side on this machine)::

    python benchmarks/quality/seeds_train.py --seed 1 & python benchmarks/quality/seeds_train.py --seed 2
    python benchmarks/quality/protocol.py --individual
    J=seed0:all,seed1:all,seed2:all,pooled:all   # both processes share the list (a lock per job)
    python benchmarks/quality/protocol.py --jobs $J & python benchmarks/quality/protocol.py --jobs $J
    python benchmarks/quality/protocol_summary.py        # -> results/protocol.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from base_model import load  # noqa: E402
from seeds_train import seed_root  # noqa: E402
from stages import EVALS, SPECS, _compute, cached_eval, lam_value, reuse_evaluation  # noqa: E402
from strength import rules  # noqa: E402
from tasks import TASKS, load_tasks  # noqa: E402
from train import claimed, load_lora_deltas, stacked_factors  # noqa: E402

OUT = EVALS / "protocol"
SEED_REUSE = EVALS / "osrm" / "plain"  # seed 0's evaluations of the OSRM study (identical setting)
SEEDS = (0, 1, 2)
VAL_ITEMS = 100
EXTRA_VALIDATION = VAL_ITEMS - 40
GRID = (0.05, 0.1, "1/N", 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
REGIMES = (*(f"seed{s}" for s in SEEDS), "pooled")
METHODS = {  # the data-free baselines of the target, the default cp and its best variant
    "seed": ("cat", "tsv_r48", "knots_ties", "iso_cts_r48", "cp_weighted_r16", "cp_iso_r48"),
    "pooled": ("cat", "tsv_r144", "knots_ties", "iso_cts_r144", "cp_weighted_r16", "cp_iso_r144"),
}
BASELINES = ("tsv", "knots_ties", "iso_cts")  # spec-id prefixes of the data-free baselines
START = {"tsv": 0.3, "knots_ties": 1.0, "iso_cts": 0.75, "cp_weighted": "1/N", "cp_iso": 1.0}
log = logging.getLogger("quality.protocol")


def methods(regime: str) -> tuple[str, ...]:
    return METHODS["pooled" if regime == "pooled" else "seed"]


def family(spec_id: str) -> str:
    """``tsv_r48`` -> ``tsv``: the method without its rank."""
    return re.sub(r"_r\d+$", "", spec_id)


def adapter_dirs(regime: str) -> dict[str, Path]:
    """Name -> adapter folder of the adapters the regime merges."""
    if regime == "pooled":
        return {f"{t}_s{s}": seed_root(s) / t for s in SEEDS for t in TASKS}
    return {t: seed_root(int(regime.removeprefix("seed"))) / t for t in TASKS}


def grid(n: int) -> list:
    """:data:`GRID` in ascending order of value for ``N = n`` adapters."""
    return sorted(GRID, key=lambda lam: lam_value(lam, n))


def path_of(regime: str, spec_id: str, lam, split: str) -> Path:
    n = len(adapter_dirs(regime))
    return OUT / regime / f"{spec_id}.lam{lam_value(lam, n):.3f}.{split}.json"


def mean_accuracy(path: Path) -> float:
    acc = json.loads(path.read_text())["accuracy"]
    return sum(acc.values()) / len(acc)


def climb(score, start: int, size: int) -> int:
    """Index of a local maximum of ``score`` on ``range(size)`` reached from ``start`` (ties: smaller).

    Example:
        >>> climb(lambda i: -abs(i - 6), 2, 10)
        6
    """
    seen: dict[int, float] = {}
    current = start
    while True:
        around = [j for j in (current - 1, current, current + 1) if 0 <= j < size]
        for j in around:
            if j not in seen:
                seen[j] = score(j)
        best = max(around, key=lambda j: (seen[j], -j))
        if best == current:
            return current
        current = best


def _reuse_seed0(regime: str, path: Path) -> None:
    """Copy seed 0's identical test evaluation from the OSRM study, if there is one."""
    if regime == "seed0" and path.name.endswith(".test.json"):
        reuse_evaluation(SEED_REUSE / path.name, path)


def evaluator(base, tok, data, regime: str, spec_id: str, folder: Path | None = None):
    """``evaluate(lam, split) -> path``: the spec's merge in ``regime`` at ``lam``, cached under
    ``folder`` (default ``OUT / regime``); the merge is computed once, on the first evaluation."""
    spec = {s.id: s for s in SPECS}[spec_id]
    dirs = adapter_dirs(regime)
    n = len(dirs)
    state: dict = {}

    def deltas() -> dict:
        if "deltas" not in state:
            state["factors"] = stacked_factors(dirs)
            found = _compute(spec, state["factors"], base, dirs, {})
            state["deltas"], state["seconds"], state["extra"] = found
        return state["deltas"]

    def evaluate(lam, split: str) -> Path:
        path = path_of(regime, spec_id, lam, split)
        if folder is not None:
            path = folder / path.name
        _reuse_seed0(regime, path)
        if not path.exists():
            subset = {t: data[t][split][: VAL_ITEMS if split == "validation" else None] for t in TASKS}
            scaled = {m: lam_value(lam, n) * d for m, d in deltas().items()}
            meta = {"regime": regime, "spec": spec_id, "lam": lam, "split": split, "n_adapters": n}
            meta |= {"merge_seconds": state["seconds"], **state["extra"]}
            cached_eval(path, base, tok, subset, scaled, keep_predictions=split == "test", meta=meta)
        return path

    evaluate.deltas, evaluate.state = deltas, state
    return evaluate


def run_job(base, tok, data, regime: str, spec_id: str) -> None:
    """Climb ``spec_id``'s ``lam`` on validation in ``regime``, evaluate the rule's point, then test."""
    evaluate = evaluator(base, tok, data, regime, spec_id)
    lams = grid(len(adapter_dirs(regime)))
    if spec_id == "cat":
        evaluate("1/N", "test")
        return
    start = lams.index(START[family(spec_id)])
    climb(lambda i: mean_accuracy(evaluate(lams[i], "validation")), start, len(lams))
    rule_path = OUT / regime / f"{spec_id}.rules.json"
    if not rule_path.exists():
        merged = evaluate.deltas()
        found = rules(merged, evaluate.state["factors"]) | {"n_adapters": len(adapter_dirs(regime))}
        rule_path.write_text(json.dumps(found, indent=2) + "\n")
    evaluate(rule_point(regime, spec_id), "validation")
    chosen = choice(regime, spec_id)
    evaluate(chosen, "test")
    log.info("%s %s: lam %s chosen on validation", regime, spec_id, chosen)


def rule_point(regime: str, spec_id: str):
    """The grid point nearest (log scale) to the ``norm`` rule's ``lam``."""
    n = len(adapter_dirs(regime))
    norm = json.loads((OUT / regime / f"{spec_id}.rules.json").read_text())["norm"]
    return min(grid(n), key=lambda lam: abs(math.log(lam_value(lam, n) / norm)))


def validation_means(regime: str, spec_id: str) -> dict:
    """``lam -> mean validation accuracy`` of every grid point evaluated (grid order)."""
    paths = {lam: path_of(regime, spec_id, lam, "validation") for lam in grid(len(adapter_dirs(regime)))}
    return {lam: mean_accuracy(p) for lam, p in paths.items() if p.exists()}


def choice(regime: str, spec_id: str):
    """The best ``lam`` on validation among the points evaluated (the climb's and the rule's; ties:
    the smaller); ``cat``: ``1/N``."""
    if spec_id == "cat":
        return "1/N"
    means = validation_means(regime, spec_id)
    order = list(means)
    return max(order, key=lambda lam: (means[lam], -order.index(lam)))


def run_individual(base, tok, data, seed: int) -> None:
    """Each adapter of ``seed`` on its own task's 100 test items (the normalisation's denominator)."""
    for task in TASKS:
        path = OUT / f"seed{seed}" / f"individual_{task}.test.json"
        if seed == 0:
            reuse_evaluation(SEED_REUSE / path.name, path)
        deltas = load_lora_deltas(seed_root(seed) / task)
        meta = {"model": f"seed{seed} individual_{task}", "split": "test"}
        cached_eval(path, base, tok, {task: data[task]["test"]}, deltas, keep_predictions=True, meta=meta)


def parse_jobs(text: str) -> list[tuple[str, str]]:
    """``"seed1:all,pooled:cp_iso_r144"`` -> ``[(regime, spec), ...]``; ``all``: every method."""
    jobs = []
    for item in filter(None, text.split(",")):
        regime, _, spec = item.partition(":")
        if regime not in REGIMES or (spec != "all" and spec not in methods(regime)):
            raise SystemExit(f"Bad job {item!r}: regimes {REGIMES}, methods {METHODS} or 'all'")
        jobs += [(regime, s) for s in (methods(regime) if spec == "all" else (spec,))]
    return jobs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--individual", action="store_true", help="every seed's adapters on their task")
    parser.add_argument("--jobs", default="", help="comma-separated regime:method (method 'all': every one)")
    parser.add_argument(
        "--points",
        default="",
        help="comma-separated regime:method:lam evaluated on validation only, under <regime>/points/ "
        "(never chosen: e.g. cp_iso at lam = 1/N, the weights of a mean)",
    )
    args = parser.parse_args(argv)
    jobs = parse_jobs(args.jobs)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    base, tok = load()
    data = load_tasks(extra_validation=EXTRA_VALIDATION)
    if args.individual:
        for seed in SEEDS:
            run_individual(base, tok, data, seed)
    for item in filter(None, args.points.split(",")):
        regime, spec_id, lam = item.split(":")
        lam = lam if lam == "1/N" else float(lam)
        evaluator(base, tok, data, regime, spec_id, OUT / regime / "points")(lam, "validation")
    for regime, spec_id in jobs:
        with claimed(OUT / regime / f"{spec_id}.lock") as mine:
            if mine:
                run_job(base, tok, data, regime, spec_id)


if __name__ == "__main__":
    main()

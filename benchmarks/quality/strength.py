"""A data-free merge strength (issue 11): how far do simple rules land from the validation-chosen ``lam``?

Every method's merged delta ``M`` (weights 1, ``stages._compute``) of the six per-task adapters
``dW_i`` is scaled by ``lam``; the benchmark picks ``lam`` on validation. Two data-free rules, global
over the 210 modules (Frobenius norms of all modules together):

- ``norm``: ``||lam M|| = mean_i ||dW_i||``: the merge as strong as an average task;
- ``own``: ``lam M`` keeps each task's own component at its strength on average:
  ``lam = mean_i ||dW_i||^2 / <dW_i, M>``.

Each rule's ``lam`` is rounded to the nearest value of the method's validation grid (log scale), and
its validation accuracy there is compared with the chosen ``lam``'s (``osrm_eval.py``'s evaluations:
nothing new is evaluated). Writes ``results/strength.json``; prints a Markdown table.

Command (from the repository root; about 3 min per adapter set)::

    python benchmarks/quality/strength.py
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from base_model import load  # noqa: E402
from osrm_eval import MERGE_SPECS, SETS, chosen_lam, grid, val_means  # noqa: E402
from stages import SPECS, _compute, lam_value  # noqa: E402
from tasks import TASKS  # noqa: E402
from train import stacked_factors  # noqa: E402

RESULT = HERE / "results" / "strength.json"
# osrm_eval's specs, then issue 11's cp variants (plain adapters only; skipped where not evaluated)
STRENGTH_SPECS = (*MERGE_SPECS, "cp_shared_r16", "cp_iso_r16", "cp_iso_r48", "cp_rank_tol_r16")
log = logging.getLogger("quality.strength")


def rules(deltas: dict, factors: dict) -> dict[str, float]:
    """Data-free ``lam`` of merged ``deltas`` (weights 1), streamed over modules in float64.

    ``norm``: ``||lam M|| = mean_i ||dW_i||``; ``own``: ``lam = mean_i ||dW_i||^2 / <dW_i, M>``
    (one module's task deltas in memory at a time).
    """
    n = len(next(iter(factors.values())))
    merged_sq, task_sq, inner = 0.0, [0.0] * n, [0.0] * n
    for module, merged in deltas.items():
        m = merged.double()
        merged_sq += float(m.square().sum())
        for i, (a, b, s) in enumerate(factors[module]):
            d = s * b.double() @ a.double()
            task_sq[i] += float(d.square().sum())
            inner[i] += float((d * m).sum())
    norm = sum(math.sqrt(x) for x in task_sq) / n / math.sqrt(merged_sq)
    own = sum(sq / ip for sq, ip in zip(task_sq, inner, strict=True) if ip > 0) / n
    return {"norm": norm, "own": own}


def nearest(lam: float, lams) -> object:
    n = len(TASKS)
    return min(lams, key=lambda x: abs(math.log(lam_value(x, n)) - math.log(lam)))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    base, _ = load()
    specs = {s.id: s for s in SPECS}
    out: dict = {}
    for adapters, root in SETS.items():
        dirs = {t: root / t for t in TASKS}
        factors = stacked_factors(dirs)
        for spec_id in STRENGTH_SPECS:
            means = val_means(adapters, spec_id)
            if spec_id == "cat" or means is None:
                continue
            deltas, _, _ = _compute(specs[spec_id], factors, base, dirs, {})
            lams = grid(spec_id)
            best = chosen_lam(adapters, spec_id)
            entry = {"chosen": str(best), "chosen_val": means[best], "rules": {}}
            for rule, lam in rules(deltas, factors).items():
                at = nearest(lam, lams)
                entry["rules"][rule] = {"lam": lam, "grid": str(at), "val": means[at]}
            out[f"{adapters}: {spec_id}"] = entry
            log.info("%s %s: %s", adapters, spec_id, entry)
    RESULT.write_text(json.dumps(out, indent=2) + "\n")
    head = ["merge", "chosen lam (val acc)"] + [f"{r} rule: lam -> grid (val acc)" for r in ("norm", "own")]
    print("| " + " | ".join(head) + " |")
    print("|---|---|---|---|")
    for name, e in out.items():
        cells = [f"{r['lam']:.3f} -> {r['grid']} ({r['val']:.3f})" for r in e["rules"].values()]
        print(f"| {name} | {e['chosen']} ({e['chosen_val']:.3f}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

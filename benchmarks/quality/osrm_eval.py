"""OSRM vs plain adapters, merged (issue 14): single-task accuracy and merges at validation-chosen ``lam``.

Two adapter sets of the six tasks, identical but for the start of ``lora_A``: ``plain``
(``cache/adapters``, LoRA's random init) and ``osrm`` (``cache/adapters_osrm``, ``osrm_train.py``).
For each set:

- ``--individual``: each adapter on its own task's 100 test items;
- ``--spec S --split validation``: the static merge ``S`` of ``stages.SPECS`` (weights 1, computed
  once) scaled by every ``lam`` of its grid, on the first 20 validation items per task (the main
  benchmark's protocol); ``--split test``: at the ``lam`` chosen on validation (ties: the smaller);
  ``cat`` is the mean and is only tested, at ``lam = 1/N``;
- ``--calibrated``: calibrated cp (``calibration.run_calibrated``, k = 32, 120 steps, lr 0.05, seed 0).

Evaluations are cached under ``results/evals/osrm/<set>/`` (the plain set reuses the identical
evaluations of ``results/evals/calibration/`` where they exist). ``--summary`` writes
``results/osrm.json`` and prints the tables: normalised accuracy is against the PLAIN individual
adapters for both sets (one denominator, so the gaps are gaps in accuracy, task-weighted), and
paired bootstrap CIs of osrm minus plain per method and for the best merge of each set (chosen on
validation). Threads: ``BENCH_THREADS`` (default 1).

Commands (from the repository root; each 2-15 min, two at a time on this machine)::

    python benchmarks/quality/osrm_eval.py --set osrm --individual
    for set in plain osrm; do
      for spec in cp_weighted_r16 tsv_r48 knots_ties; do
        python benchmarks/quality/osrm_eval.py --set $set --spec $spec --split validation
        python benchmarks/quality/osrm_eval.py --set $set --spec $spec --split test
      done
      python benchmarks/quality/osrm_eval.py --set $set --spec cat --split test
    done
    python benchmarks/quality/osrm_eval.py --set osrm --calibrated
    python benchmarks/quality/osrm_eval.py --summary       # -> results/osrm.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import calibration  # noqa: E402
from base_model import load  # noqa: E402
from osrm_train import OSRM_ADAPTERS  # noqa: E402
from stages import EVALS, SPECS, _split, cached_eval, lam_value  # noqa: E402
from tasks import TASKS, load_tasks  # noqa: E402
from train import ADAPTERS, load_lora_deltas, load_lora_factors  # noqa: E402

OUT = EVALS / "osrm"
SUMMARY = HERE / "results" / "osrm.json"
SETS = {"plain": ADAPTERS, "osrm": OSRM_ADAPTERS}
MERGE_SPECS = ("cat", "cp_weighted_r16", "tsv_r48", "knots_ties", "cp_whiten_r16", "iso_c_r48", "iso_cts_r48")
FIXED_LAM = {"cat": "1/N"}  # the mean: not tuned
# OSRM's lora_A rows have norm 1 (PEFT's kaiming rows about 0.58), so its deltas are about 1.65x
# larger and the sum-like merges' best lam sat on the grid's lower edge (0.1): widened for both sets.
EXTRA_LAMS = (0.05,)
CALIBRATED = {"k": 32, "steps": 120, "lr": 0.05, "l2": 0.0, "seed": 0, "items": 100}
# Identical evaluations of the plain set computed for issue 12 (same adapters, merge, items, harness).
PLAIN_REUSE = {
    "individual_{task}.test.json": "individual_{task}.items100.test.json",
    "cp_weighted_r16.lam0.167.test.json": "static.items100.test.json",
    "tsv_r48.lam0.750.test.json": "static_tsv_r48_lam0.75.items100.test.json",
    "knots_ties.lam1.000.test.json": "static_knots_ties_lam1.items100.test.json",
}
log = logging.getLogger("quality.osrm_eval")


def _reuse(adapters: str, path: Path, pattern: str, **fields) -> None:
    """Copy the identical issue-12 evaluation of the plain set to ``path`` (noted in the JSON)."""
    source = PLAIN_REUSE.get(pattern)
    if adapters != "plain" or path.exists() or source is None:
        return
    source_path = calibration.OUT / source.format(**fields)
    if source_path.exists():
        result = json.loads(source_path.read_text()) | {"reused_from": str(source_path.relative_to(HERE))}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))


def run_individual(base, tok, data, adapters: str) -> None:
    for task in TASKS:
        path = OUT / adapters / f"individual_{task}.test.json"
        _reuse(adapters, path, "individual_{task}.test.json", task=task)
        cached_eval(
            path,
            base,
            tok,
            {task: data[task]["test"]},
            load_lora_deltas(SETS[adapters] / task),
            keep_predictions=True,
            meta={"model": f"{adapters} individual_{task}", "split": "test"},
        )


def grid(spec_id: str) -> tuple:
    """The spec's ``lam`` grid of the main benchmark, widened below by ``EXTRA_LAMS`` (both sets)."""
    return (*EXTRA_LAMS, *{s.id: s for s in SPECS}[spec_id].lams)


def val_means(adapters: str, spec_id: str) -> dict | None:
    """``lam -> mean validation accuracy`` over the spec's grid, or None while incomplete."""
    means = {}
    for lam in grid(spec_id):
        path = OUT / adapters / f"{spec_id}.lam{lam_value(lam, len(TASKS)):.3f}.validation.json"
        if not path.exists():
            return None
        acc = json.loads(path.read_text())["accuracy"]
        means[lam] = sum(acc.values()) / len(acc)
    return means


def chosen_lam(adapters: str, spec_id: str):
    if spec_id in FIXED_LAM:
        return FIXED_LAM[spec_id]
    means = val_means(adapters, spec_id)
    if means is None:
        raise SystemExit(f"{adapters} {spec_id}: run --split validation first")
    lams = list(means)
    return max(lams, key=lambda lam: (means[lam], -lams.index(lam)))


def run_spec(base, tok, data, adapters: str, spec_id: str, split: str) -> None:
    from stages import _compute

    spec = {s.id: s for s in SPECS}[spec_id]
    n = len(TASKS)
    if split == "validation":
        todo = [] if spec_id in FIXED_LAM else list(grid(spec_id))
        paths = {
            lam: OUT / adapters / f"{spec_id}.lam{lam_value(lam, n):.3f}.validation.json" for lam in todo
        }
    else:
        lam = chosen_lam(adapters, spec_id)
        name = f"{spec_id}.lam{lam_value(lam, n):.3f}.test.json"
        paths = {lam: OUT / adapters / name}
        _reuse(adapters, paths[lam], name)
    paths = {lam: p for lam, p in paths.items() if not p.exists()}
    if not paths:
        return
    dirs = {t: SETS[adapters] / t for t in TASKS}
    factor_maps = {t: load_lora_factors(d) for t, d in dirs.items()}
    modules = sorted(set.intersection(*(set(f) for f in factor_maps.values())))
    factors = {m: [factor_maps[t][m] for t in TASKS] for m in modules}
    deltas, seconds, extra = _compute(spec, factors, base, dirs, {})
    for lam, path in paths.items():
        meta = {
            "set": adapters,
            "spec": spec_id,
            "lam": lam,
            "split": split,
            "merge_seconds": seconds,
            **extra,
        }
        scaled = {m: lam_value(lam, n) * d for m, d in deltas.items()}
        subset = _split(data, split)
        cached_eval(path, base, tok, subset, scaled, keep_predictions=split == "test", meta=meta)


def run_calibrated(base, tok, data, adapters: str) -> None:
    args = argparse.Namespace(**CALIBRATED)
    if adapters == "plain":  # issue 12's run of the same setting
        name = f"{calibration.setting_name(args)}.items{args.items}.test.json"
        source, path = calibration.OUT / name, OUT / "plain" / name
        if source.exists() and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)
            return
    saved = HERE / "cache" / f"calibrated_{adapters}"
    calibration.run_calibrated(base, tok, data, args, OUT / adapters, saved, adapters=SETS[adapters])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", choices=sorted(SETS), help="which adapters")
    parser.add_argument("--individual", action="store_true", help="each adapter on its own task (test)")
    parser.add_argument("--spec", choices=MERGE_SPECS, help="a static merge")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--calibrated", action="store_true", help=f"calibrated cp {CALIBRATED}")
    parser.add_argument("--summary", action="store_true", help="write results/osrm.json")
    args = parser.parse_args(argv)
    if (args.individual or args.spec or args.calibrated) and not args.set:
        parser.error("--individual, --spec and --calibrated need --set")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    if args.individual or args.spec or args.calibrated:
        base, tok = load()
        data = load_tasks()
        if args.individual:
            run_individual(base, tok, data, args.set)
        if args.spec:
            run_spec(base, tok, data, args.set, args.spec, args.split)
        if args.calibrated:
            run_calibrated(base, tok, data, args.set)
    if args.summary:
        from osrm_summary import markdown, summary

        result = summary()
        SUMMARY.write_text(json.dumps(result, indent=2) + "\n")
        print(markdown(result))


if __name__ == "__main__":
    main()

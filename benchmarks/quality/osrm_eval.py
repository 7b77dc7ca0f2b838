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

``--part clora_k12`` (default ``per_task``, the above): the same protocol on the K = 12 C-LoRA
libraries, ``plain`` = ``cache/clora_k12`` and ``osrm`` = ``cache/clora_k12_osrm``
(``library_build.py``; 30 steps per cluster). ``N`` is the number of adapters (12), so ``1/N`` = 0.083
and ``cat`` is the mean of the 12 cluster deltas (uniform weights, as the main table's ``cat`` row).
Specs: ``PART_SPECS``. Evaluations go to ``results/evals/osrm/<set>_clora_k12/``; the summary to
``results/osrm_k12.json``, normalised by the plain PER-TASK individual adapters
(``results/evals/osrm/plain/individual_*``, the per-task table's denominator). The plain library was
retrained (its cache was deleted); ``--check-reproduction`` evaluates its ``cat`` on test and compares
the predictions with the old ``results/evals/clora_k12/cat.test.json`` (``reproduction.json``). Only if
all 600 are identical are the old library's evaluations of the same (spec, lam, split) reused
(copied, marked ``reused_from``); otherwise everything is evaluated afresh. Commands::

    export BENCH_THREADS=1   # two processes at a time on this 2-core machine
    python benchmarks/quality/run.py --stage clora --k 12 &               # plain, ~40 min
    python benchmarks/quality/run.py --stage clora --k 12 --init osrm &   # osrm, ~55 min
    wait
    python benchmarks/quality/osrm_eval.py --part clora_k12 --check-reproduction
    for set in plain osrm; do   # the two sets side by side
      (
        E="python benchmarks/quality/osrm_eval.py --part clora_k12 --set $set"
        $E --spec cat --split test
        for spec in cp_weighted_r16 tsv_r48 knots_ties iso_cts_r48 iso_c_r48; do
          $E --spec $spec --split validation && $E --spec $spec --split test
        done
      ) &
    done
    wait
    python benchmarks/quality/osrm_eval.py --part clora_k12 --summary   # -> results/osrm_k12.json
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
from stages import EVALS, SPECS, _split, cached_eval, lam_value, reuse_evaluation  # noqa: E402
from tasks import TASKS, load_tasks  # noqa: E402
from train import ADAPTERS, load_lora_deltas, stacked_factors  # noqa: E402

OUT = EVALS / "osrm"
SUMMARY = HERE / "results" / "osrm.json"
SETS = {"plain": ADAPTERS, "osrm": OSRM_ADAPTERS}  # the per-task adapters; libraries: adapter_dirs()
# cp_iso_r48: the cp default since 0.2.0 (whitened, isotropic, rank sum r), added to both sets then
MERGE_SPECS = (
    "cat",
    "cp_weighted_r16",
    "tsv_r48",
    "knots_ties",
    "cp_whiten_r16",
    "iso_c_r48",
    "iso_cts_r48",
    "cp_iso_r48",
)
# issue 11's cp variants and the K = 12 full-rank specs: run on the plain sets (variants_summary.py)
VARIANT_SPECS = {
    "per_task": ("cp_shared_r16", "cp_iso_r16", "cp_rank_tol_r16"),
    "clora_k12": ("cp_shared_r16", "cp_iso_r96", "iso_c_r96", "iso_cts_r96"),
}
PARTS = ("per_task", "clora_k12")
PART_SPECS = {
    "per_task": MERGE_SPECS,
    "clora_k12": ("cat", "cp_weighted_r16", "tsv_r48", "knots_ties", "iso_c_r48", "iso_cts_r48"),
}
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


def out_dir(adapters: str, part: str = "per_task") -> Path:
    """Evaluations of one set: ``results/evals/osrm/<set>`` (per-task) or ``.../<set>_<part>``."""
    return OUT / adapters if part == "per_task" else OUT / f"{adapters}_{part}"


def summary_path(part: str = "per_task") -> Path:
    """``results/osrm.json`` (per-task) or ``results/osrm_k<K>.json`` (a library)."""
    return SUMMARY if part == "per_task" else HERE / "results" / f"osrm_{part.removeprefix('clora_')}.json"


def n_adapters(part: str = "per_task") -> int:
    """N of ``lam = 1/N``: the number of adapters merged (6 tasks, or the library's K clusters)."""
    from library_build import clora_k

    return len(TASKS) if part == "per_task" else clora_k(part)


def library_dir(adapters: str, part: str) -> Path:
    from library_build import clora_dir, clora_k

    return clora_dir(clora_k(part), "default" if adapters == "plain" else "osrm")


def adapter_dirs(adapters: str, part: str = "per_task") -> dict[str, Path]:
    """Name -> adapter folder of the adapters merged (the six tasks, or the library's clusters)."""
    if part == "per_task":
        return {t: SETS[adapters] / t for t in TASKS}
    from peft_cp_merge.library import load_library

    library = load_library(library_dir(adapters, part))
    dirs = {Path(d).name: Path(d) for d in library.adapter_dirs}
    if len(dirs) != n_adapters(part):
        raise SystemExit(f"{part} {adapters}: {len(dirs)} adapters, expected {n_adapters(part)}")
    return dirs


def _lam_name(spec_id: str, lam, n: int, split: str) -> str:
    return f"{spec_id}.lam{lam_value(lam, n):.3f}.{split}.json"


def reproduced(part: str) -> bool:
    """Whether ``--check-reproduction`` found the retrained plain library's cat predictions identical."""
    report = out_dir("plain", part) / "reproduction.json"
    return report.exists() and json.loads(report.read_text())["identical_predictions"]


def _reuse_old_library(adapters: str, part: str, path: Path) -> None:
    """Copy the old library run's evaluation of the same (spec, lam, split) to ``path``, if reproduced.

    Validation files have the same name in ``results/evals/<part>/``; a test file there is
    ``<spec>.test.json`` and is used only where its ``lam`` is the one chosen here.
    """
    if adapters != "plain" or part == "per_task" or path.exists() or not reproduced(part):
        return
    old = EVALS / part
    spec_id = path.name.partition(".lam")[0]
    if path.name.endswith(".validation.json"):
        source = old / path.name
    else:
        source = old / f"{spec_id}.test.json"
        if source.exists():
            old_lam = json.loads(source.read_text())["lam"]
            if _lam_name(spec_id, old_lam, n_adapters(part), "test") != path.name:
                return
    reuse_evaluation(source, path)


def _reuse(adapters: str, path: Path, pattern: str, **fields) -> None:
    """Copy the identical issue-12 evaluation of the plain set to ``path`` (noted in the JSON)."""
    source = PLAIN_REUSE.get(pattern)
    if adapters != "plain" or path.exists() or source is None:
        return
    reuse_evaluation(calibration.OUT / source.format(**fields), path)


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


def val_means(adapters: str, spec_id: str, part: str = "per_task") -> dict | None:
    """``lam -> mean validation accuracy`` over the spec's grid, or None while incomplete."""
    means = {}
    n = n_adapters(part)
    for lam in grid(spec_id):
        path = out_dir(adapters, part) / _lam_name(spec_id, lam, n, "validation")
        if not path.exists():
            return None
        acc = json.loads(path.read_text())["accuracy"]
        means[lam] = sum(acc.values()) / len(acc)
    return means


def chosen_lam(adapters: str, spec_id: str, part: str = "per_task"):
    if spec_id in FIXED_LAM:
        return FIXED_LAM[spec_id]
    means = val_means(adapters, spec_id, part)
    if means is None:
        raise SystemExit(f"{part} {adapters} {spec_id}: run --split validation first")
    lams = list(means)
    return max(lams, key=lambda lam: (means[lam], -lams.index(lam)))


def run_spec(base, tok, data, adapters: str, spec_id: str, split: str, part: str = "per_task") -> None:
    from stages import _compute

    spec = {s.id: s for s in SPECS}[spec_id]
    n, out = n_adapters(part), out_dir(adapters, part)
    if split == "validation":
        todo = [] if spec_id in FIXED_LAM else list(grid(spec_id))
        paths = {lam: out / _lam_name(spec_id, lam, n, "validation") for lam in todo}
        for path in paths.values():
            _reuse_old_library(adapters, part, path)
    else:
        lam = chosen_lam(adapters, spec_id, part)
        name = _lam_name(spec_id, lam, n, "test")
        paths = {lam: out / name}
        if part == "per_task":
            _reuse(adapters, paths[lam], name)
        else:
            _reuse_old_library(adapters, part, paths[lam])
    paths = {lam: p for lam, p in paths.items() if not p.exists()}
    if not paths:
        return
    dirs = adapter_dirs(adapters, part)
    factors = stacked_factors(dirs)
    deltas, seconds, extra = _compute(spec, factors, base, dirs, {})
    for lam, path in paths.items():
        meta = {
            "set": adapters,
            "part": part,
            "spec": spec_id,
            "lam": lam,
            "split": split,
            "merge_seconds": seconds,
            **extra,
        }
        scaled = {m: lam_value(lam, n) * d for m, d in deltas.items()}
        subset = _split(data, split)
        cached_eval(path, base, tok, subset, scaled, keep_predictions=split == "test", meta=meta)


def check_reproduction(base, tok, data, part: str) -> dict:
    """Test ``cat`` (1/N) of the retrained plain library; compare its predictions with the old run's."""
    # Never reused here: reproduction.json is not written yet.
    run_spec(base, tok, data, "plain", "cat", "test", part)
    new_path = out_dir("plain", part) / _lam_name("cat", "1/N", n_adapters(part), "test")
    old_path = EVALS / part / "cat.test.json"
    new, old = json.loads(new_path.read_text()), json.loads(old_path.read_text())
    if "reused_from" in new:
        raise SystemExit(f"{new_path} was reused; delete it to check the reproduction")
    pairs = {t: zip(new["predictions"][t], old["predictions"][t], strict=True) for t in TASKS}
    differ = {t: sum(a != b for a, b in pairs[t]) for t in TASKS}
    report = {
        "new": str(new_path.relative_to(HERE)),
        "old": str(old_path.relative_to(HERE)),
        "items": sum(len(new["predictions"][t]) for t in TASKS),
        "differing_predictions": differ,
        "identical_predictions": not any(differ.values()),
        "accuracy_new": new["accuracy"],
        "accuracy_old": old["accuracy"],
    }
    (out_dir("plain", part) / "reproduction.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("reproduction of %s: %s", part, report)
    return report


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
    parser.add_argument("--part", choices=PARTS, default="per_task", help="task adapters or a library")
    parser.add_argument("--set", choices=sorted(SETS), help="which adapters")
    parser.add_argument("--individual", action="store_true", help="each adapter on its own task (test)")
    all_specs = sorted({s for part in PARTS for s in (*PART_SPECS[part], *VARIANT_SPECS[part])})
    parser.add_argument("--spec", choices=all_specs, help="a static merge")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--calibrated", action="store_true", help=f"calibrated cp {CALIBRATED}")
    parser.add_argument(
        "--check-reproduction",
        action="store_true",
        help="libraries: the retrained plain library's cat on test against the old run's predictions",
    )
    parser.add_argument("--summary", action="store_true", help="write results/osrm.json (osrm_k12.json)")
    args = parser.parse_args(argv)
    if (args.individual or args.spec or args.calibrated) and not args.set:
        parser.error("--individual, --spec and --calibrated need --set")
    if args.part != "per_task" and (args.individual or args.calibrated):
        parser.error("--individual and --calibrated are per-task only")
    if args.part == "per_task" and args.check_reproduction:
        parser.error("--check-reproduction is for a library part")
    if args.spec and args.spec not in (*PART_SPECS[args.part], *VARIANT_SPECS[args.part]):
        parser.error(f"--part {args.part} runs {PART_SPECS[args.part] + VARIANT_SPECS[args.part]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    if args.individual or args.spec or args.calibrated or args.check_reproduction:
        base, tok = load()
        data = load_tasks()
        if args.check_reproduction:
            check_reproduction(base, tok, data, args.part)
        if args.individual:
            run_individual(base, tok, data, args.set)
        if args.spec:
            run_spec(base, tok, data, args.set, args.spec, args.split, args.part)
        if args.calibrated:
            run_calibrated(base, tok, data, args.set)
    if args.summary:
        from osrm_summary import markdown, summary

        result = summary(args.part)
        summary_path(args.part).write_text(json.dumps(result, indent=2) + "\n")
        print(markdown(result))


if __name__ == "__main__":
    main()

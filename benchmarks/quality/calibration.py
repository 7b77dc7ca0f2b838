"""Calibrated cp (preliminary): does ``peft_cp_merge.calibrate`` on a few train examples recover accuracy?

The default cp merge of the six per-task adapters (``add_weighted_adapter(tasks, [1/6] * 6, "cp",
combination_type="cp")``: rank ``min(2 max r, sum r) = 16``, weighted aggregation) is evaluated on the
test split, then calibrated (one gain per CP component and module, ``peft_cp_merge.calibrate``) on
``k`` examples per task from the TRAIN split (the first ``k`` of each task's train split, prompt format
and label masking of the adapters' training: ``train._batch``, loss on the answer and ``<|im_end|>``
only) and evaluated again, with the benchmark's own harness (``evaluate.evaluate``: base weights +
dense deltas, greedy, exact match). Nothing is chosen on test.

Every evaluation is cached as JSON under ``results/evals/calibration/`` (the calibration report is
stored with the calibrated model's evaluation) and skipped when present; the calibrated adapter is
saved under ``cache/calibrated/<setting>`` (gitignored). ``--summary`` only collects the cached
evaluations into ``results/calibration_prelim.json`` (per-task and mean accuracy, normalised accuracy
against the individual adapters of ``results/evals/reference/``, paired bootstrap CIs of calibrated
minus static, environment). Threads: ``BENCH_THREADS`` (default 1, see ``run.py``).

Commands (from the repository root)::

    python benchmarks/quality/calibration.py --static                  # static cp merge, test
    python benchmarks/quality/calibration.py --k 32 --steps 60 --lr 0.05   # calibrated, k = 32
    python benchmarks/quality/calibration.py --k 8 --steps 60 --lr 0.05    # second setting
    python benchmarks/quality/calibration.py --k 32 --l2 1.0               # or with the pull to 1
    python benchmarks/quality/calibration.py --individual              # re-evaluate the 6 adapters
    python benchmarks/quality/calibration.py --start iso --static       # the default after issue 11
    python benchmarks/quality/calibration.py --start iso --k 16 --steps 120 --lr 0.05   # calibrated from it
    python benchmarks/quality/calibration.py --summary                 # -> results/calibration_prelim.json

Several of these may run side by side (one process per core); ``--summary`` runs after each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from base_model import load  # noqa: E402
from report import bootstrap_gap, data_fingerprint, references, summarise  # noqa: E402
from run import environment  # noqa: E402
from stages import EVALS, cached_eval  # noqa: E402
from tasks import TASKS, load_tasks  # noqa: E402
from train import ADAPTERS, _batch, load_lora_deltas  # noqa: E402

OUT = EVALS / "calibration"
SUMMARY = HERE / "results" / "calibration_prelim.json"
CALIBRATED = HERE / "cache" / "calibrated"
MERGED = "cp"
# The static cp that calibration starts from, as measured: rank 16 = min(2 max r, sum r), weighted
# gains, no whitening (spelled out, so that a change of the cp defaults cannot change it).
STATIC_CP = {"cp_rank": 16, "cp_aggregation": "weighted", "cp_whiten": False, "cp_isotropic": False}
# Static merges calibration may start from (``--start``): name -> (add_weighted_adapter options, weight
# of each adapter). ``sum16`` is the one above at the weights of a mean (every number before issue 11's
# default change); ``iso`` is the whitened + isotropic cp at rank sum r = 48 at weights 1 (the default
# after issue 11). Results of ``iso`` carry ``_iso`` in their file names.
STARTS = {
    "sum16": (STATIC_CP, 1 / len(TASKS)),
    "iso": ({"cp_rank": 48, "cp_aggregation": "weighted", "cp_whiten": True, "cp_isotropic": True}, 1.0),
}
log = logging.getLogger("quality.calibration")


def test_split(data: dict, items: int) -> dict:
    """The first ``items`` test items of every task (100 = the whole test split)."""
    return {t: data[t]["test"][:items] for t in TASKS}


def calibration_examples(tok, data: dict, k: int) -> list[dict]:
    """The first ``k`` train items of every task, tokenised as in training (one unpadded row each)."""
    rows = []
    for task in TASKS:
        for example in data[task]["train"][:k]:
            batch = _batch(tok, [example])
            rows.append({key: value[0] for key, value in batch.items()})
    return rows


def suffix(start: str) -> str:
    """File-name mark of a start: none for ``sum16`` (the files written before ``--start``)."""
    return "" if start == "sum16" else f"_{start}"


def merged_model(base, adapters: Path = ADAPTERS, start_name: str = "sum16"):
    """A PeftModel (on a copy of ``base``) holding the six adapters and their static cp merge ``"cp"``."""
    import merges

    import peft_cp_merge  # noqa: F401  (registers combination_type="cp")

    options, weight = STARTS[start_name]
    peft_model = merges.peft_model_with(base, {t: adapters / t for t in TASKS})
    start = time.perf_counter()
    peft_model.add_weighted_adapter(
        list(TASKS), [weight] * len(TASKS), MERGED, combination_type="cp", **options
    )
    seconds = time.perf_counter() - start
    cfg = peft_model.peft_config[MERGED]
    log.info("cp merge: rank %d in %.1f s", cfg.r, seconds)
    return peft_model, {"merge_seconds": seconds, "cp_rank": cfg.r}


@torch.no_grad()
def deltas_of(peft_model, name: str) -> dict[str, torch.Tensor]:
    """Dense deltas of adapter ``name``, keyed by the base model's module names (as ``merges.peft_merge``)."""
    from peft.tuners.lora import LoraLayer

    return {
        key.removeprefix("base_model.model."): module.get_delta_weight(name).detach().float().clone()
        for key, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and name in module.lora_A
    }


def setting_name(args) -> str:
    mark = suffix(args.start)
    return f"calibrated{mark}_k{args.k}_s{args.steps}_lr{args.lr:g}_l2{args.l2:g}_seed{args.seed}"


def run_static(base, tok, data, items: int, out: Path = OUT, start_name: str = "sum16") -> None:
    path = out / f"static{suffix(start_name)}.items{items}.test.json"
    if path.exists():
        return
    peft_model, info = merged_model(base, start_name=start_name)
    cached_eval(
        path,
        base,
        tok,
        test_split(data, items),
        deltas_of(peft_model, MERGED),
        keep_predictions=True,
        meta={"model": f"static cp {STARTS[start_name]}", "split": "test", **info},
    )


def run_calibrated(
    base, tok, data, args, out: Path = OUT, saved: Path = CALIBRATED, adapters: Path = ADAPTERS
) -> None:
    from peft_cp_merge import calibrate

    name = setting_name(args)
    path = out / f"{name}.items{args.items}.test.json"
    if path.exists():
        return
    peft_model, info = merged_model(base, adapters, args.start)
    examples = calibration_examples(tok, data, args.k)
    report = calibrate(
        peft_model,
        MERGED,
        examples,
        steps=args.steps,
        lr=args.lr,
        l2=args.l2,
        seed=args.seed,
        batch_size=8,
        holdout=0.25,
        patience=3,
        progress=False,
    )
    log.info(
        "calibration: %s", {k: v for k, v in dataclasses.asdict(report).items() if k != "module_gain_mean"}
    )
    peft_model.save_pretrained(str(saved / name), selected_adapters=[MERGED])
    settings = {"k_per_task": args.k, "steps": args.steps, "lr": args.lr, "l2": args.l2, "seed": args.seed}
    options, weight = STARTS[args.start]
    settings["start"] = {"name": args.start, "options": options, "weight": weight}
    settings |= {"batch_size": 8, "holdout": 0.25, "patience": 3, "examples": "first k of each train split"}
    cached_eval(
        path,
        base,
        tok,
        test_split(data, args.items),
        deltas_of(peft_model, MERGED),
        keep_predictions=True,
        meta={
            "model": f"calibrated cp ({name})",
            "split": "test",
            "settings": settings,
            "calibration": dataclasses.asdict(report),
            "threads": torch.get_num_threads(),
            **info,
        },
    )


def run_individual(base, tok, data, items: int, out: Path = OUT) -> None:
    """Re-evaluate each adapter on its own task (the same harness; compare with results/evals/reference)."""
    for task in TASKS:
        cached_eval(
            out / f"individual_{task}.items{items}.test.json",
            base,
            tok,
            {task: data[task]["test"][:items]},
            load_lora_deltas(ADAPTERS / task),
            keep_predictions=True,
            meta={"model": f"individual_{task}", "split": "test"},
        )


def _gain_summary(calibration: dict) -> dict:
    """Kept-gain statistics of the report, and the mean module gain per projection type."""
    module_means = calibration["module_gain_mean"]
    by_kind: dict[str, list[float]] = {}
    for module, gain in module_means.items():
        by_kind.setdefault(module.rsplit(".", 1)[-1], []).append(gain)
    out = {k: v for k, v in calibration.items() if k != "module_gain_mean"}
    out["module_gain_mean_by_projection"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    return out


def _individual(items: int, out: Path = OUT) -> tuple[dict | None, str]:
    """Individual adapters' test results: re-evaluated here if present, else the reference JSONs."""
    mine = [out / f"individual_{t}.items{items}.test.json" for t in TASKS]
    if all(p.exists() for p in mine):
        results = [json.loads(p.read_text()) for p in mine]
        indiv = {
            "accuracy": {t: r["accuracy"][t] for t, r in zip(TASKS, results, strict=True)},
            "correct": {t: r["correct"][t] for t, r in zip(TASKS, results, strict=True)},
        }
        return indiv, f"re-evaluated here ({out.relative_to(HERE)}/individual_*)"
    indiv = references()["test"]["individual"]
    if indiv is None:
        return None, "not available"
    indiv = {
        "accuracy": dict(indiv["accuracy"]),
        "correct": {t: c[:items] for t, c in indiv["correct"].items()},
    }
    indiv["accuracy"] = {t: sum(c) / len(c) for t, c in indiv["correct"].items()}
    return indiv, "read from results/evals/reference/individual_*.test.json (not re-evaluated)"


def summary(items: int) -> dict:
    static_path = OUT / f"static.items{items}.test.json"
    if not static_path.exists():
        raise SystemExit(f"{static_path} missing: run --static first")
    static = json.loads(static_path.read_text())
    individual, individual_source = _individual(items)
    ones = {t: [1] * len(static["correct"][t]) for t in TASKS}  # normaliser 1: plain accuracy gaps

    def describe(result: dict) -> dict:
        out = {"accuracy": result["accuracy"], "mean_accuracy": sum(result["accuracy"].values()) / len(TASKS)}
        if individual:
            norm = summarise(result, individual)
            out |= {"normalised": norm["normalised"], "mean_normalised": norm["mean_normalised"]}
            rest = [v for t, v in norm["normalised"].items() if t != "add_sub"]  # add_sub: 0.1 alone
            out["mean_normalised_without_add_sub"] = sum(rest) / len(rest)
        out["eval_seconds"] = result["seconds"]
        return out

    statics = {"sum16": static}
    for name in STARTS:
        path = OUT / f"static{suffix(name)}.items{items}.test.json"
        if name != "sum16" and path.exists():
            statics[name] = json.loads(path.read_text())
    calibrated = {}
    for path in sorted(OUT.glob(f"calibrated_*.items{items}.test.json")):
        result = json.loads(path.read_text())
        start_name = result["settings"].get("start", {}).get("name", "sum16")
        if start_name not in statics:
            continue
        reference = statics[start_name]
        entry = describe(result) | {
            "settings": result["settings"],
            "calibration": _gain_summary(result["calibration"]),
        }
        entry["minus_static"] = {
            "mean_accuracy": bootstrap_gap(result["correct"], reference["correct"], ones),
            "per_task_accuracy": {t: result["accuracy"][t] - reference["accuracy"][t] for t in TASKS},
        }
        if individual:
            entry["minus_static"]["mean_normalised"] = bootstrap_gap(
                result["correct"], reference["correct"], individual["correct"]
            )
        same_settings_sum16 = path.with_name(
            path.name.replace(f"calibrated{suffix(start_name)}_", "calibrated_")
        )
        if start_name != "sum16" and same_settings_sum16.exists():  # the same calibration from sum16
            other = json.loads(same_settings_sum16.read_text())
            entry["minus_sum16_start"] = {
                "of": same_settings_sum16.name.removesuffix(f".items{items}.test.json"),
                "mean_accuracy": bootstrap_gap(result["correct"], other["correct"], ones),
            }
            if individual:
                entry["minus_sum16_start"]["mean_normalised"] = bootstrap_gap(
                    result["correct"], other["correct"], individual["correct"]
                )
        calibrated[path.name.removesuffix(f".items{items}.test.json")] = entry
    previous = EVALS / "per_task" / "cp_weighted_r16.test.json"
    same_as_previous = None
    if previous.exists() and items == 100:
        old = json.loads(previous.read_text())
        same_as_previous = {
            t: sum(a == b for a, b in zip(old["predictions"][t], static["predictions"][t], strict=True))
            for t in TASKS
        }
    out = {
        "question": "calibrated (peft_cp_merge.calibrate) vs static default cp merge of the 6 adapters",
        "test_items_per_task": items,
        "merge": {
            "call": f'add_weighted_adapter(tasks, [1/6]*6, "cp", combination_type="cp", **{STATIC_CP})',
            "cp_rank": static.get("cp_rank"),
            "merge_seconds": static.get("merge_seconds"),
        },
        "static": describe(statics["sum16"]),
        "static_other_starts": {
            name: {"options": STARTS[name][0], "weight": STARTS[name][1], **describe(result)}
            for name, result in statics.items()
            if name != "sum16"
        },
        "static_predictions_identical_to_previous_cp_weighted_r16_test": same_as_previous,
        "calibrated": calibrated,
        "individual": {
            "source": individual_source,
            **({"accuracy": individual["accuracy"]} if individual else {}),
        },
        "bootstrap": "paired over test items, within tasks, 2000 resamples, seed 0 (report.bootstrap_gap)",
        "environment": environment(),
        "data": data_fingerprint(),
    }
    SUMMARY.write_text(json.dumps(out, indent=2) + "\n")
    log.info("wrote %s", SUMMARY)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--static", action="store_true", help="evaluate the static cp merge")
    parser.add_argument("--individual", action="store_true", help="re-evaluate the individual adapters")
    parser.add_argument("--summary", action="store_true", help="only collect cached evaluations")
    parser.add_argument("--k", type=int, default=None, help="calibrate on k train examples per task")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--l2", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--items", type=int, default=100, help="test items per task (first N)")
    parser.add_argument("--start", choices=list(STARTS), default="sum16", help="static merge (STARTS)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("peft_cp_merge").setLevel(logging.INFO)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    if not args.summary and (args.static or args.individual or args.k):
        base, tok = load()
        data = load_tasks()
        if args.static:
            run_static(base, tok, data, args.items, start_name=args.start)
        if args.k:
            run_calibrated(base, tok, data, args)
        if args.individual:
            run_individual(base, tok, data, args.items)
    if (OUT / f"static.items{args.items}.test.json").exists():
        summary(args.items)


if __name__ == "__main__":
    main()

"""Calibrated cp against the few-shot baselines of issue 12, on the same examples and test items.

Every method sees the same ``k`` examples per task (the first ``k`` of each task's TRAIN split,
``calibration.calibration_examples``), the same step budget, batch size 8, held-out fraction 0.25
and early stopping (patience 3) as ``peft_cp_merge.calibrate``, and is scored on the same test items
(the first ``--items``, default all 100, per task) by the benchmark's harness (``stages.cached_eval``,
predictions kept for paired bootstrap CIs). Evaluations are cached as JSON under
``results/evals/calibration/`` and skipped when present. Methods (``--method``):

- ``soups``: LoRA-Soups / CAT-style learned weights, one per adapter and module, ``w`` initialised at
  the static mean 1/N (``fewshot_train``; default lr 0.05, calibrate's, on ``g = N w``).
- ``multitask``: a fresh multi-task LoRA trained from scratch on the same examples (the task adapters'
  LoRA config, ``--rank`` 8 or 16 with ``lora_alpha = 2 rank``; their lr 1.5e-3 and schedule).
- ``static``: a static merge of ``merges.py`` (``--spec``, ``--lam``) of the six adapters.
- ``cp``, ``cp_static``, ``individual``: calibrated cp, the static cp and the individual adapters,
  exactly as ``calibration.py`` computes them (same file and setting names).

``--summary`` collects every cached evaluation into ``results/fewshot.json`` and prints a Markdown
table (``fewshot_summary``). ``--scratch`` sends every output to ``scratch/`` (gitignored) instead,
for smoke tests: ``--scratch --items 2 --k 2 --steps 2``. Threads: ``BENCH_THREADS`` (default 1).

Commands (from the repository root; one process per core, each run 10-15 min)::

    python benchmarks/quality/calibration.py --static --individual   # static cp, individual: cached
    python benchmarks/quality/fewshot.py --method static --spec tsv_r48 --lam 0.75
    python benchmarks/quality/fewshot.py --method static --spec knots_ties --lam 1.0
    python benchmarks/quality/fewshot.py --method static --spec cat --lam 1/N   # = soups at step 0
    python benchmarks/quality/calibration.py --k 4 --steps 120 --lr 0.05    # calibrated cp
    python benchmarks/quality/calibration.py --k 16 --steps 120 --lr 0.05
    python benchmarks/quality/calibration.py --k 32 --steps 120 --lr 0.05   # cached already
    python benchmarks/quality/fewshot.py --method soups --k 4 --steps 120
    python benchmarks/quality/fewshot.py --method soups --k 16 --steps 120
    python benchmarks/quality/fewshot.py --method soups --k 32 --steps 120
    python benchmarks/quality/fewshot.py --method multitask --k 4 --steps 120
    python benchmarks/quality/fewshot.py --method multitask --k 16 --steps 120
    python benchmarks/quality/fewshot.py --method multitask --k 32 --steps 120
    python benchmarks/quality/fewshot.py --method multitask --k 32 --steps 120 --rank 16   # optional
    python benchmarks/quality/fewshot.py --summary                       # -> results/fewshot.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import calibration  # noqa: E402
import fewshot_train as ft  # noqa: E402
from base_model import load  # noqa: E402
from stages import cached_eval  # noqa: E402
from tasks import TASKS, load_tasks  # noqa: E402
from train import ADAPTERS, TrainConfig, stacked_factors  # noqa: E402

METHODS = ("soups", "multitask", "static", "cp", "cp_static", "individual")
DEFAULT_LR = {"soups": 5e-2, "cp": 5e-2, "multitask": TrainConfig.lr}
PROTOCOL = {"batch_size": 8, "holdout": 0.25, "patience": 3, "examples": "first k of each train split"}
log = logging.getLogger("quality.fewshot")


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where a run writes: evaluations, trained adapters, the summary."""

    evals: Path
    adapters: Path
    summary: Path

    @classmethod
    def of(cls, scratch: bool) -> Paths:
        if scratch:
            root = HERE / "scratch" / "fewshot"
            return cls(root / "evals", root / "adapters", root / "fewshot.json")
        return cls(calibration.OUT, HERE / "cache" / "fewshot", HERE / "results" / "fewshot.json")


def setting_name(args) -> str:
    """File stem of a run; the calibrated cp's is ``calibration.setting_name``'s."""
    if args.method == "soups":
        return f"soups_k{args.k}_s{args.steps}_lr{args.lr:g}_seed{args.seed}"
    if args.method == "multitask":
        return f"multitask_r{args.rank}_k{args.k}_s{args.steps}_lr{args.lr:g}_seed{args.seed}"
    if args.method == "static":
        return f"static_{args.spec}_lam{args.lam:g}"
    return calibration.setting_name(args)


def _settings(args) -> dict:
    return {"k_per_task": args.k, "steps": args.steps, "lr": args.lr, "seed": args.seed, **PROTOCOL}


def _evaluate(path: Path, base, tok, data, deltas, items: int, meta: dict) -> dict:
    test = calibration.test_split(data, items)
    meta = {"split": "test", "threads": torch.get_num_threads(), **meta}
    return cached_eval(path, base, tok, test, deltas, keep_predictions=True, meta=meta)


def run_soups(base, tok, data, args, paths: Paths) -> None:
    path = paths.evals / f"{setting_name(args)}.items{args.items}.test.json"
    if path.exists():
        return
    names = list(TASKS)
    peft_model = ft.soup_model(base, {t: ADAPTERS / t for t in names})
    gains = ft.add_soup_gains(peft_model, names)
    report = ft.fit_few_shot(
        peft_model,
        ft.SOUP,
        calibration.calibration_examples(tok, data, args.k),
        gains,
        ft.adam(args.lr),
        steps=args.steps,
        seed=args.seed,
        batch_size=PROTOCOL["batch_size"],
        holdout=PROTOCOL["holdout"],
        patience=PROTOCOL["patience"],
    )
    log.info("soups: %s", report)
    weights = ft.soup_weight_stats(gains, names)
    ft.bake_soup_gains(peft_model)
    meta = {
        "model": f"LoRA-Soups weights per adapter and module ({setting_name(args)})",
        "settings": _settings(args)
        | {"optimizer": "Adam", "parametrisation": "w = g / N, g initialised at 1"},
        "fit": dataclasses.asdict(report),
        "soup_weights": weights,
        "soup_rank": peft_model.peft_config[ft.SOUP].r,
    }
    _evaluate(path, base, tok, data, calibration.deltas_of(peft_model, ft.SOUP), args.items, meta)


def run_multitask(base, tok, data, args, paths: Paths) -> None:
    name = setting_name(args)
    path = paths.evals / f"{name}.items{args.items}.test.json"
    if path.exists():
        return
    peft_model = ft.multitask_model(base, rank=args.rank, seed=args.seed)
    cfg = TrainConfig()
    report = ft.fit_few_shot(
        peft_model,
        "default",
        calibration.calibration_examples(tok, data, args.k),
        ft.lora_params(peft_model),
        ft.adamw_warmup(args.lr, args.steps, cfg.warmup),
        steps=args.steps,
        seed=args.seed,
        clip=1.0,
        batch_size=PROTOCOL["batch_size"],
        holdout=PROTOCOL["holdout"],
        patience=PROTOCOL["patience"],
    )
    log.info("multitask: %s", report)
    peft_model.save_pretrained(str(paths.adapters / name))
    lora = peft_model.peft_config["default"]
    meta = {
        "model": f"multi-task LoRA from scratch on the few-shot examples ({name})",
        "settings": _settings(args)
        | {"rank": lora.r, "lora_alpha": lora.lora_alpha, "warmup": cfg.warmup, "optimizer": "AdamW, clip 1"},
        "fit": dataclasses.asdict(report),
    }
    _evaluate(path, base, tok, data, calibration.deltas_of(peft_model, "default"), args.items, meta)


def run_static(base, tok, data, args, paths: Paths) -> None:
    """A static merge of the retrained adapters: ``stages._compute`` at weights 1, scaled by ``lam``."""
    import merges
    from stages import SPECS, _compute

    path = paths.evals / f"{setting_name(args)}.items{args.items}.test.json"
    if path.exists():
        return
    spec = {s.id: s for s in SPECS}[args.spec]
    dirs = {t: ADAPTERS / t for t in TASKS}
    factors: merges.Factors = stacked_factors(dirs)
    deltas, seconds, extra = _compute(spec, factors, base, dirs, {})
    meta = {
        "model": f"static {spec.id} at lam {args.lam:g}",
        "spec": spec.id,
        "params": spec.params,
        "lam": args.lam,
        "merge_seconds": seconds,
        "adapters": "the six per-task adapters of cache/adapters",
        **extra,
    }
    scaled = {m: args.lam * d for m, d in deltas.items()}
    _evaluate(path, base, tok, data, scaled, args.items, meta)


def run(args, paths: Paths) -> None:
    base, tok = load()
    data = load_tasks()
    if args.method == "soups":
        run_soups(base, tok, data, args, paths)
    elif args.method == "multitask":
        run_multitask(base, tok, data, args, paths)
    elif args.method == "static":
        run_static(base, tok, data, args, paths)
    elif args.method == "cp":
        calibration.run_calibrated(base, tok, data, args, paths.evals, paths.adapters)
    elif args.method == "cp_static":
        calibration.run_static(base, tok, data, args.items, paths.evals)
    else:
        calibration.run_individual(base, tok, data, args.items, paths.evals)


def parse(argv=None) -> argparse.Namespace:
    from stages import SPECS, lam_value

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", choices=METHODS, help="what to train and evaluate")
    parser.add_argument("--summary", action="store_true", help="collect the cached evaluations")
    parser.add_argument("--k", type=int, default=None, help="train examples per task (soups, multitask, cp)")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps (soups, multitask, cp)")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default {DEFAULT_LR})")
    parser.add_argument("--l2", type=float, default=0.0, help="cp only: pull of the gains towards 1")
    parser.add_argument("--rank", type=int, default=TrainConfig.r, help="multitask: LoRA rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spec", choices=[s.id for s in SPECS], help="static: merge spec of merges.py")
    parser.add_argument("--lam", default=None, help="static: scaling coefficient (a number or 1/N)")
    parser.add_argument("--items", type=int, default=100, help="test items per task (first N)")
    parser.add_argument("--scratch", action="store_true", help="write under scratch/ (smoke tests)")
    args = parser.parse_args(argv)
    if not args.method and not args.summary:
        parser.error("give --method and/or --summary")
    if args.method in ("soups", "multitask", "cp") and not (args.k and args.k > 0 and args.steps > 0):
        parser.error(f"--method {args.method} needs --k >= 1 and --steps >= 1")
    if args.method == "static" and (args.spec is None or args.lam is None):
        parser.error("--method static needs --spec and --lam")
    if args.lam is not None:
        args.lam = lam_value(args.lam, len(TASKS))
    if args.lr is None:
        args.lr = DEFAULT_LR.get(args.method, 0.0)
    if args.rank < 1 or args.items < 1:
        parser.error(f"--rank and --items must be >= 1, got {args.rank}, {args.items}")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("peft_cp_merge").setLevel(logging.INFO)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    paths = Paths.of(args.scratch)
    if args.method:
        run(args, paths)
    if args.summary:
        from fewshot_summary import collect, markdown

        result = collect(paths.evals, args.items)
        paths.summary.parent.mkdir(parents=True, exist_ok=True)
        paths.summary.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", paths.summary)
        print(markdown(result))


if __name__ == "__main__":
    main()

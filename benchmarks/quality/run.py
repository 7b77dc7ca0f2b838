"""Quality benchmark driver: ``python benchmarks/quality/run.py --stage train|clora|reference|merge|report``.

Every stage caches its outputs (adapters under ``cache/``, evaluations under ``results/evals/``)
and skips finished work, so a rerun only does what is missing. ``--only`` restricts the train
stage to some adapters (to run two workers side by side).

Threads: 1 by default (``BENCH_THREADS``). On this shared 2-core machine, 2 OpenMP threads under
contention were measured 4-10x slower than 1 thread (threads spin-wait on each other).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from base_model import load  # noqa: E402
from library_build import INITS  # noqa: E402
from tasks import TASKS, load_tasks  # noqa: E402
from train import TrainConfig, train_adapter  # noqa: E402

RESULTS = HERE / "results"
EVALS = RESULTS / "evals"
MULTITASK_STEPS = {  # the first reference had half the per-task total (CPU budget); "full" has all of it
    "multitask": int(os.environ.get("BENCH_MULTITASK_STEPS", "120")),
    "multitask_full": 6 * TrainConfig.steps,
}
log = logging.getLogger("quality")


def environment() -> dict:
    import peft
    import transformers

    try:
        import peft_cp_merge

        cp_version = peft_cp_merge.__version__
    except ImportError:
        cp_version = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.uname().machine,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "peft_cp_merge": cp_version,
    }


def stage_train(only: list[str] | None) -> None:
    model, tok = load()
    data = load_tasks()
    cfg = TrainConfig()
    names = [*TASKS, *MULTITASK_STEPS]
    for name in only or [*TASKS, "multitask"]:
        if name not in names:
            raise SystemExit(f"Unknown adapter {name!r}; expected one of {names}")
        if name in MULTITASK_STEPS:
            mixed = [e for t in TASKS for e in data[t]["train"]]
            record = train_adapter(model, tok, mixed, name, cfg, steps=MULTITASK_STEPS[name])
        else:
            record = train_adapter(model, tok, data[name]["train"], name, cfg)
        log.info("trained %s: %s", name, record)


def stage_clora(k: int, init: str = "default") -> None:
    """C-LoRA: the library builder clusters the mixed training instructions and trains one LoRA each."""
    from library_build import build_clora

    model, tok = load()
    build_clora(model, tok, load_tasks(), k=k, init=init)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stage", required=True, choices=["train", "clora", "reference", "merge", "report"])
    parser.add_argument("--only", default=None, help="comma-separated adapter names (train stage)")
    parser.add_argument("--part", default=None, help="merge stage: per_task, clora (K=6) or clora_k<K>")
    parser.add_argument("--k", type=int, default=6, help="clora stage: number of clusters")
    parser.add_argument(
        "--init",
        default="default",
        choices=INITS,
        help="clora stage: adapter initialisation (osrm: cache/<part>_osrm, see library_build.py)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    start = time.perf_counter()
    if args.stage == "train":
        stage_train(args.only.split(",") if args.only else None)
    elif args.stage == "clora":
        stage_clora(args.k, args.init)
    elif args.stage == "reference":
        from stages import stage_reference

        stage_reference()
    elif args.stage == "merge":
        from stages import stage_merge

        stage_merge(args.part or "per_task")
    else:
        from report import write_report

        write_report()
    log.info("stage %s done in %.0f s", args.stage, time.perf_counter() - start)


if __name__ == "__main__":
    main()

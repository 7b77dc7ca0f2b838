"""More adapter seeds for the quality benchmark (issue 11's protocol: >= 3 seeds per task).

Seed 0 is ``cache/adapters`` (``train.py``). Seed ``s`` >= 1 trains the same six per-task LoRAs (same
LoraConfig, data, 60 steps, learning rate) with the LoRA initialisation drawn after
``torch.manual_seed(s)`` and the data order of ``TrainConfig(seed=s)``; adapters go to
``cache/adapters_seed<s>/<task>`` and are skipped when present.

Commands (from the repository root; about 6 min per adapter with 1 thread, two processes side by side)::

    python benchmarks/quality/seeds_train.py --seed 1 &
    python benchmarks/quality/seeds_train.py --seed 2
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from base_model import load  # noqa: E402
from tasks import TASKS, load_tasks  # noqa: E402
from train import TrainConfig, train_adapter  # noqa: E402

log = logging.getLogger("quality.seeds")


def seed_root(seed: int) -> Path:
    """Where seed ``seed``'s six adapters live (seed 0: the main benchmark's ``cache/adapters``)."""
    return HERE / "cache" / ("adapters" if seed == 0 else f"adapters_seed{seed}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, required=True, help="adapter seed, >= 1")
    parser.add_argument("--only", default=None, help="comma-separated tasks (default: all six)")
    args = parser.parse_args(argv)
    tasks = args.only.split(",") if args.only else list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or args.seed < 1:
        parser.error(f"unknown tasks {unknown} (expected {list(TASKS)}) or --seed {args.seed} < 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    base, tok = load()
    data = load_tasks()
    cfg = TrainConfig(seed=args.seed)
    for task in tasks:
        torch.manual_seed(1000 * args.seed + TASKS.index(task))  # the LoRA init (kaiming rows of lora_A)
        record = train_adapter(base, tok, data[task]["train"], task, cfg, root=seed_root(args.seed))
        log.info(
            "seed %d %s: loss %.3f -> %.3f", args.seed, task, record["loss_first10"], record["loss_last10"]
        )


if __name__ == "__main__":
    main()

"""OSRM-initialised per-task adapters for the quality benchmark (issue 14).

The six per-task LoRAs of ``train.py`` again (same LoraConfig, data, data order, seed and 60 steps),
except that before training each adapter's ``lora_A`` is set by ``peft_cp_merge.osrm_init`` against
the other five tasks' training inputs: every task contributes a seeded sample of ``--examples``
(default 52) training sequences (prompt + answer, as trained), the input second moments of all six
samples are computed once, and task ``t`` is initialised with ``total.minus(own_t)`` (260 other
examples, as the library builder does it). ``lora_A`` stays trainable (the paper's setting).

Adapters go to ``cache/adapters_osrm/<task>`` with ``train_record.json`` (training record + the OSRM
report) and are skipped when present. ``--only`` splits the tasks between processes.

Commands (from the repository root; about 6 min per adapter with 1 thread)::

    python benchmarks/quality/osrm_train.py --only add_sub,reverse_words,date_format &
    python benchmarks/quality/osrm_train.py --only unit_convert,json_lookup,bbc_topic
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from base_model import load  # noqa: E402
from tasks import END_OF_TURN, TASKS, chat, load_tasks  # noqa: E402
from train import TARGET_MODULES, TrainConfig, fit, lora_config  # noqa: E402

OSRM_ADAPTERS = HERE / "cache" / "adapters_osrm"
log = logging.getLogger("quality.osrm")


def osrm_samples(tok, data: dict, per_task: int, seed: int = 0) -> dict[str, list[dict]]:
    """Task -> a seeded sample of ``per_task`` training sequences as ``{"input_ids": [...]}``."""
    out = {}
    for index, task in enumerate(TASKS):
        train = data[task]["train"]
        chosen = sorted(random.Random(seed + index).sample(range(len(train)), per_task))
        out[task] = [
            {
                "input_ids": tok(
                    chat(train[i].prompt) + train[i].answer + END_OF_TURN, add_special_tokens=False
                ).input_ids
            }
            for i in chosen
        ]
    return out


def train_osrm_adapter(
    base, tok, data, task: str, samples, cfg: TrainConfig, cache: dict, *, root: Path = OSRM_ADAPTERS
) -> dict:
    """OSRM-initialise and train ``task``'s adapter; saved to ``root / task``."""
    from peft import get_peft_model

    from peft_cp_merge.osrm import input_moments, osrm_init

    out_dir = root / task
    record_path = out_dir / "train_record.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    model = get_peft_model(base, lora_config(cfg))
    start = time.perf_counter()
    if "total" not in cache:
        every = [row for rows in samples.values() for row in rows]
        cache["total"] = input_moments(model, "default", every, max_examples=len(every))
        cache["total_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
    own = input_moments(model, "default", samples[task], max_examples=len(samples[task]))
    report = osrm_init(model, "default", cache["total"].minus(own))
    init_seconds = time.perf_counter() - start
    log.info(
        "%s: OSRM init on %d examples, energy ratio %.2e (random rows %.2e), %.0f s",
        task,
        report.examples,
        report.energy_ratio_mean,
        report.replaced_energy_ratio_mean,
        init_seconds,
    )
    stats = fit(model, tok, data[task]["train"], cfg, steps=cfg.steps, tag=task)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    record = {
        "name": task,
        **stats,
        "config": asdict(cfg),
        "target_modules": TARGET_MODULES,
        "osrm": {
            "other_examples": report.examples,
            "tokens": report.tokens,
            "energy_ratio_mean": report.energy_ratio_mean,
            "energy_ratio_max": report.energy_ratio_max,
            "replaced_energy_ratio_mean": report.replaced_energy_ratio_mean,
            "init_seconds": init_seconds,
            "total_moments_seconds": cache.get("total_seconds"),
            "threads": torch.get_num_threads(),
        },
    }
    record_path.write_text(json.dumps(record, indent=2))
    model.unload()
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=None, help="comma-separated tasks (default: all six)")
    parser.add_argument("--examples", type=int, default=52, help="OSRM sample per task")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="training steps")
    parser.add_argument("--scratch", action="store_true", help="save under scratch/ (smoke tests)")
    args = parser.parse_args(argv)
    tasks = args.only.split(",") if args.only else list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or args.examples < 1:
        parser.error(f"unknown tasks {unknown} (expected {list(TASKS)}) or --examples < 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    base, tok = load()
    data = load_tasks()
    samples = osrm_samples(tok, data, args.examples)
    cache: dict = {}
    root = HERE / "scratch" / "adapters_osrm" if args.scratch else OSRM_ADAPTERS
    cfg = TrainConfig(steps=args.steps)
    for task in tasks:
        record = train_osrm_adapter(base, tok, data, task, samples, cfg, cache, root=root)
        log.info("trained %s: %s", task, {k: v for k, v in record.items() if k != "target_modules"})


if __name__ == "__main__":
    main()

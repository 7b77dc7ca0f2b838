"""Benchmark: OSRM initialisation of SmolLM2-135M adapters on the CPU (issue 14's speed target).

Six task adapters (the quality benchmark's tasks, all 7 projections, r = 8), each initialised against
256 examples of the other five tasks. Two ways, timed separately:

- ``library``: as ``build-library --init osrm`` does it when the statistics fit its memory budget:
  every task contributes a seeded sample of ceil(256 / 5) = 52 examples, each sample's moments are
  computed once and each task takes the sum of the other five (each example runs once);
- ``per_task``: ``osrm_init`` from scratch per task on 256 examples of the others (what a user of
  ``osrm_init`` in a training script does); slower, so ``--per-task N`` runs only N tasks.

Also times a plain forward pass over the same 256 examples, and the eigen-solve alone. The model
comes from the quality benchmark's cache (``benchmarks/quality/base_model.py``), offline. Writes
``benchmarks/results/osrm_speed.json`` with the machine, versions, date and times.

Usage:
    python benchmarks/osrm_speed.py --threads 1 --per-task 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "quality"))
MODEL_DIR = HERE / "quality" / "cache" / "smollm2-135m-instruct-fp32"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def task_rows(tokenizer, per_task: int) -> dict[str, list[dict]]:
    """Task -> the first ``per_task`` training examples, encoded as the adapters are trained on them."""
    from tasks import END_OF_TURN, chat, load_tasks

    rows = {}
    for task, splits in load_tasks().items():
        rows[task] = [
            {
                "input_ids": tokenizer(
                    chat(e.prompt) + e.answer + END_OF_TURN, add_special_tokens=False
                ).input_ids
            }
            for e in splits["train"][:per_task]
        ]
    return rows


def others(rows, task: str, n: int, seed: int) -> list[dict]:
    pool = [row for other, task_rows_ in rows.items() if other != task for row in task_rows_]
    return random.Random(seed).sample(pool, n)


def fresh(base, r: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    return get_peft_model(base, config)


def summary(report) -> dict:
    return {
        "examples": report.examples,
        "tokens": report.tokens,
        "energy_ratio_mean": report.energy_ratio_mean,
        "energy_ratio_max": report.energy_ratio_max,
        "replaced_energy_ratio_mean": report.replaced_energy_ratio_mean,
        "seconds": round(report.seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--examples", type=int, default=256, help="other examples per task")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--per-task", type=int, default=1, help="tasks timed the per_task way (0: none)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "osrm_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_cp_merge.osrm import bottom_eigenvectors, input_moments, osrm_init

    base = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    sample = math.ceil(args.examples / 5)
    rows = task_rows(tokenizer, max(sample, args.examples))
    record = {"threads": args.threads, "examples": args.examples, "rank": args.rank, "targets": TARGETS}

    batch = others(rows, "add_sub", args.examples, seed=0)
    record["tokens_of_the_examples"] = sum(len(r["input_ids"]) for r in batch)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(batch), 8):
            chunk = batch[i : i + 8]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(chunk):
                ids[j, : len(r["input_ids"])], mask[j, : len(r["input_ids"])] = (
                    torch.tensor(r["input_ids"]),
                    1,
                )
            base(input_ids=ids, attention_mask=mask)
    record["plain_forward_s"] = round(time.perf_counter() - start, 2)
    save(record, args.out)  # after every stage: an interrupted run still leaves its numbers

    # library way ("each", as build-library does it when the statistics fit): every task's sample
    # moments once, each task's others = the sum of the other samples' moments
    samples = {
        task: random.Random(k).sample(task_rows_, sample) for k, (task, task_rows_) in enumerate(rows.items())
    }
    model = fresh(base, args.rank)
    start = time.perf_counter()
    own = {task: input_moments(model, "default", s, max_examples=len(s)) for task, s in samples.items()}
    record["library_moments_s"] = round(time.perf_counter() - start, 2)
    one = next(iter(own.values()))
    record["groups"] = len(one.groups)
    reports = {}
    for index, task in enumerate(samples):
        if index:  # a fresh adapter per task, so that "replaced" compares with random rows
            model.unload()
            model = fresh(base, args.rank)
        parts = [moments for other, moments in own.items() if other != task]
        summed = parts[0]
        for part in parts[1:]:
            summed = summed.plus(part)
        reports[task] = summary(osrm_init(model, "default", summed))
        record["library_s"], record["library_tasks"] = round(time.perf_counter() - start, 2), reports
        save(record, args.out)

    start = time.perf_counter()
    for moment in one.sums:
        bottom_eigenvectors(moment, args.rank)
    record["eigen_solve_per_task_s"] = round(time.perf_counter() - start, 2)
    model.unload()
    save(record, args.out)

    per_task = {}
    for task in list(rows)[: args.per_task]:
        model = fresh(base, args.rank)
        per_task[task] = summary(osrm_init(model, "default", others(rows, task, args.examples, seed=1)))
        model.unload()
        record["per_task"] = per_task
        save(record, args.out)
    print(json.dumps({k: v for k, v in record.items() if k.endswith("_s")}))


def save(record: dict, out: Path) -> None:
    """Writes ``record`` with the machine, versions and date."""
    record["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }
    record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

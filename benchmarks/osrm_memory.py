"""Benchmark: the memory of OSRM statistics for a Mistral-7B-shaped model (issue 14).

Two parts, written to ``benchmarks/results/osrm_memory.json`` with the machine, versions and date:

- ``full``: the full Mistral-7B shape (32 layers, hidden 4,096, MLP 14,336, GQA 32/8 heads) built on
  the ``meta`` device (no memory, no weights) with a LoRA on all 7 projections: what
  ``statistics_gb`` reports for one pass, how ``max_memory_gb`` splits it into passes, and the largest
  pass. Computed, not run: a 7B forward pass on this 2-core CPU is out of reach.
- ``measured``: the same widths with ``--layers`` layers (random weights, float32), ``osrm_init`` on
  ``--examples`` random examples in fresh subprocesses, once with ``max_memory_gb=None`` (one pass)
  and once with ``--budget`` GB: peak resident memory (``ru_maxrss``), seconds, passes, and whether
  the rows are identical.

Usage:
    python benchmarks/osrm_memory.py --layers 2 --examples 16 --budget 1.0 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MISTRAL_7B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


def model(layers: int, device: str, rank: int = 16):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(MISTRAL_7B | {"num_hidden_layers": layers}))
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(config).eval()
    return get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))


def full_shape(budget_gb: float) -> dict:
    from peft_cp_merge.osrm import GIB, _d_in, _lora_model, _osrm_layers, statistics_gb
    from peft_cp_merge.osrm_statistics import module_passes, moment_bytes

    peft_model = model(MISTRAL_7B["num_hidden_layers"], "meta")
    layers = _osrm_layers(_lora_model(peft_model), "default", force=True)
    d_ins = {name: _d_in(layer, "default") for name, layer in layers.items()}
    passes = module_passes(d_ins, budget_gb * GIB)
    shared = sum(
        moment_bytes(d) for n, d in d_ins.items() if n.split(".")[-1] not in ("k_proj", "v_proj", "up_proj")
    )
    widest = max(d_ins.values())
    return {
        "modules": len(d_ins),
        "statistics_gb_without_sharing": statistics_gb(peft_model, "default"),
        "statistics_gb_with_sharing": shared / GIB,
        "max_memory_gb": budget_gb,
        "passes": len(passes),
        "largest_pass_gb": max(sum(moment_bytes(d_ins[n]) for n in p) for p in passes) / GIB,
        "eigen_solve_transient_gb": 3 * widest * widest * 8 / GIB,
        "note": "eigen-solve transient: the widest statistic in float64, a shifted copy, its Cholesky factor",
    }


def child(args) -> None:
    """One measured run in this process; prints a JSON line."""
    import time

    from peft_cp_merge import osrm_init

    torch.set_num_threads(args.threads)
    peft_model = model(args.layers, "cpu")
    gen = torch.Generator().manual_seed(1)
    rows = [
        {"input_ids": torch.randint(0, 32000, (32,), generator=gen).tolist()} for _ in range(args.examples)
    ]
    budget = None if args.child == "none" else float(args.child)
    start = time.perf_counter()
    report = osrm_init(peft_model, "default", rows, max_memory_gb=budget, progress=False)
    seconds = time.perf_counter() - start
    a = torch.cat([p.detach().flatten() for n, p in peft_model.named_parameters() if "lora_A" in n])
    torch.save(a, args.rows_out)
    print(
        json.dumps(
            {
                "max_memory_gb": budget,
                "seconds": round(seconds, 1),
                "groups": len(report.groups),
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "energy_ratio_mean": report.energy_ratio_mean,
            }
        )
    )


def measured(args) -> dict:
    out = {
        "layers": args.layers,
        "examples": args.examples,
        "tokens_per_example": 32,
        "threads": args.threads,
    }
    runs, rows = {}, {}
    for setting in ("none", str(args.budget)):
        path = HERE / "results" / f".osrm_memory_rows_{setting}.pt"
        cmd = [sys.executable, __file__, "--child", setting, "--rows-out", str(path)]
        cmd += [
            "--layers",
            str(args.layers),
            "--examples",
            str(args.examples),
            "--threads",
            str(args.threads),
        ]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        runs[setting] = json.loads(line)
        rows[setting] = torch.load(path)
        path.unlink()
    out["runs"] = runs
    out["rows_identical"] = bool(torch.equal(*rows.values()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--budget", type=float, default=1.0, help="max_memory_gb of the measured run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "osrm_memory.json")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    record = {"full_mistral_7b_shape": full_shape(8.0), "measured": measured(args)}
    record["machine"] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }
    record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

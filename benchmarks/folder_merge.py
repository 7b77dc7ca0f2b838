"""Merging adapter folders vs the in-memory engine: time and peak memory at Mistral-7B shapes.

Issue 3's target: merging the Mistral-7B-shaped set (32 layers x q, k, v, o, gate, up, down;
hidden 4096, kv 1024, intermediate 14336; N = 10 adapters of rank 16) from folders takes at most
1.5x the in-memory engine time (``merge_modules`` on the same tensors, already in memory) and peak
memory at most 2x the input files' size.

The adapters are random (seeded) and generated once into ``benchmarks/cache/folder_merge/`` (git
ignored). Each measurement runs in a fresh subprocess so that its RSS high-water mark
(``resource.getrusage``, ``ru_maxrss``) is its own; the RSS of a process that only imported torch,
peft and the package is measured too and reported beside it.

Usage::

    python benchmarks/folder_merge.py                       # full set (about 1.7 GB of fp32 files)
    python benchmarks/folder_merge.py --layers 4 --out /tmp/small.json   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from speed import MISTRAL_SHAPES

HERE = Path(__file__).resolve().parent
PROJECTIONS = {  # module path in a layer: (d_out, d_in) at Mistral-7B shapes
    f"{'mlp' if name in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{name}": shape
    for name, shape in MISTRAL_SHAPES.items()
}


def generate(cache: Path, *, layers: int, n_adapters: int, rank: int, dtype: str) -> list[Path]:
    """Write ``n_adapters`` random adapter folders (once; reused when present and complete)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    folders = []
    for i in range(n_adapters):
        folder = cache / f"L{layers}_N{n_adapters}_r{rank}_{dtype}" / f"adapter_{i:02d}"
        folders.append(folder)
        if (folder / "adapter_model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(layers):
            for proj, (d_out, d_in) in PROJECTIONS.items():
                key = f"base_model.model.model.layers.{layer}.{proj}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(
                    getattr(torch, dtype)
                )
                tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=gen) / rank).to(
                    getattr(torch, dtype)
                )
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=[p.split(".")[-1] for p in PROJECTIONS],
            base_model_name_or_path="mistral-7b-shaped",
            task_type="CAUSAL_LM",
        ).save_pretrained(str(folder))
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        del tensors
    return folders


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(mode: str, folders: list[str], rank: int, threads: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    from peft_cp_merge.folders.merging import iter_module_stacks, merge_adapter_folders
    from peft_cp_merge.folders.plan import plan_merge
    from peft_cp_merge.methods.cp import CPOptions, merge_modules

    sum_like = CPOptions.sum_like()  # the measured merge, spelled out

    weights = [1.0 / len(folders)] * len(folders)
    if mode == "imports":
        return {"peak_rss_bytes": _peak_rss_bytes()}
    if mode == "folder":
        with tempfile.TemporaryDirectory(dir=HERE / "cache") as tmp:
            start = time.perf_counter()
            result = merge_adapter_folders(
                folders, Path(tmp) / "merged", weights=weights, rank=rank, options=sum_like, progress=False
            )
            seconds = time.perf_counter() - start
        errors = [m.fit_error for m in result.modules.values()]
        return {
            "seconds": seconds,
            "peak_rss_bytes": _peak_rss_bytes(),
            "rel_error_mean": sum(errors) / len(errors),
            "modules": len(errors),
        }
    # "memory": every factor loaded first (not timed), then the engine alone is timed.
    plan = plan_merge(folders, weights=weights, rank=rank)
    stacks = next(iter_module_stacks(plan, group_bytes=2**62))  # one group: all modules
    module_weights = dict.fromkeys(stacks, weights)
    start = time.perf_counter()
    merged = merge_modules(stacks, module_weights, rank=rank, options=sum_like)
    seconds = time.perf_counter() - start
    errors = [m.fit_error for m in merged.values()]
    return {
        "seconds": seconds,
        "peak_rss_bytes": _peak_rss_bytes(),
        "rel_error_mean": sum(errors) / len(errors),
        "modules": len(errors),
    }


def run_worker(mode: str, folders: list[Path], rank: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--rank", str(rank), "--threads", str(threads)]
    command += ["--folders", *map(str, folders)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--n-adapters", type=int, default=10)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16, help="CP rank R of the merged adapter")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per mode, alternating; medians are reported"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "folder_merge.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folders", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folders, args.rank, args.threads)))
        return

    import peft
    import torch

    folders = generate(
        HERE / "cache" / "folder_merge",
        layers=args.layers,
        n_adapters=args.n_adapters,
        rank=args.lora_rank,
        dtype=args.dtype,
    )
    input_bytes = sum((f / "adapter_model.safetensors").stat().st_size for f in folders)
    imports = run_worker("imports", folders, args.rank, args.threads)
    runs = {"folder": [], "memory": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(run_worker(mode, folders, args.rank, args.threads))
            print(mode, runs[mode][-1], flush=True)
    median = {mode: statistics.median(r["seconds"] for r in results) for mode, results in runs.items()}
    peak = max(r["peak_rss_bytes"] for r in runs["folder"])
    result = {
        "benchmark": "folder_merge",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "peft": peft.__version__,
        "threads": args.threads,
        "config": {
            "layers": args.layers,
            "projections": list(PROJECTIONS),
            "n_adapters": args.n_adapters,
            "lora_rank": args.lora_rank,
            "cp_rank": args.rank,
            "dtype": args.dtype,
            "method": "cp",
        },
        "input_bytes": input_bytes,
        "imports_peak_rss_bytes": imports["peak_rss_bytes"],
        "runs": runs,
        "folder_seconds_median": median["folder"],
        "memory_seconds_median": median["memory"],
        "time_ratio": median["folder"] / median["memory"],
        "folder_peak_rss_bytes": peak,
        "peak_rss_over_input": peak / input_bytes,
        "peak_rss_above_imports_over_input": (peak - imports["peak_rss_bytes"]) / input_bytes,
        "targets": {"time_ratio_max": 1.5, "peak_rss_over_input_max": 2.0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "machine")}, indent=2))


if __name__ == "__main__":
    main()

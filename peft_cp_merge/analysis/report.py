"""Present an :class:`~.analysis.InterferenceReport`: a compact table, JSON, and PNG plots.

The table lists the worst modules first (by TSV's relative interference ``sti_rel``) and a summary
by layer depth; the CP columns are at the first requested rank, the fit (``err@R``) at every rank.
A legend under the table says how to read each column (:func:`column_legend`); in particular
``STI_rel`` is not a fraction capped at 1 (see :mod:`.analysis`).

The plots give every metric its own axes and y scale, and each axes and figure carries a sentence
on how to read it: :func:`interference_figure` (one panel per metric, by layer depth) and
:func:`fit_figure` (CP fit error against the rank). :func:`plot_report` writes them as
``interference_by_layer.png`` and ``fit_vs_rank.png``. Plots need matplotlib (the ``plot`` extra);
without it they raise an ImportError that says how to install it.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .metrics import InterferenceReport, ModuleInterference

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "column_legend",
    "fit_figure",
    "format_report",
    "interference_figure",
    "layer_summary",
    "plot_report",
    "report_to_dict",
    "write_report_json",
]

_PLOT_HINT = (
    "matplotlib is not installed; install it (`pip install matplotlib`, or the [plot] extra) for the plots"
)

# Measured scale of STI_rel for six rank-8 adapters at SmolLM2-135M widths (benchmarks/quality).
_STI_SCALE = "six rank-8 adapters: unrelated random ones 0.2-0.7, trained task adapters 1.8-9, median 4.2"


def _identical_reference(n_adapters: int) -> str:
    """What ``STI_rel`` is for ``n_adapters`` identical adapters, ``(N - 1)^2``, as a phrase."""
    return f"N identical adapters give (N-1)^2 (here N = {n_adapters}: {(n_adapters - 1) ** 2})"


def column_legend(n_adapters: int) -> dict[str, str]:
    """One sentence per metric on how to read it, keyed by its column name in the table.

    Args:
        n_adapters: Number of adapters analysed (``N``), for the reference values that depend on it.

    Returns:
        ``{"max|cos|", "STI_rel", "CP-STI@R", "spec@R", "err@R"}`` -> explanation.
    """
    return {
        "max|cos|": (
            "largest |cosine| between two adapters' deltas: 0 = unrelated directions, "
            "1 = the same delta up to scale."
        ),
        "STI_rel": (
            "TSV interference: the |overlaps| between singular directions of different adapters, "
            "weighted by singular value, over the sum of singular values; 0 = mutually orthogonal "
            "subspaces (no interference). A sum over pairs of adapters and of directions, not a fraction "
            f"capped at 1: two identical adapters give 1, {_identical_reference(n_adapters)}, and two "
            "different adapters spanning the same subspaces give more than 1 unless their singular "
            "directions line up one to one (the |overlaps| add up without cancelling). So above 1 does "
            "NOT mean worse than identical adapters: the value grows with N and the rank; compare "
            f"modules and layers of one report ({_STI_SCALE})."
        ),
        "CP-STI@R": (
            "the same sum over the rank-R CP components, over sum(lambda), counting only overlaps "
            "between components of different adapters (components the adapters share are common "
            "knowledge): 0 for orthogonal and for identical adapters (unless R leaves room to split "
            "shared components per adapter). Not capped at 1 either (at most (R-1)^2) and it grows "
            "with R, so compare it at one R and not with STI_rel."
        ),
        "spec@R": (
            "lambda-weighted share of each CP component's loadings on a single adapter: "
            "1 = every component belongs to one adapter, 1/N = every component shared equally."
        ),
        "err@R": (
            "relative error of the rank-R CP fit: 0 = exact, 1 = nothing captured; a CP merge at "
            "rank R starts from it, so pick the smallest R whose error you accept."
        ),
    }


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


def _legend_lines(n_adapters: int, width: int = 100) -> list[str]:
    """The legend under the table: each column's explanation, wrapped under a hanging indent."""
    lines = ["How to read the columns (definitions: peft_cp_merge.analysis.metrics):"]
    for column, text in column_legend(n_adapters).items():
        lines += textwrap.wrap(
            text, width=width, initial_indent=f"  {column:<9} ", subsequent_indent=" " * 12
        )
    return lines


def format_report(report: InterferenceReport, *, top: int = 15) -> str:
    """The compact text table: inputs, the ``top`` worst modules, the summary by layer depth, a legend.

    The legend says how to read each column, in particular that ``STI_rel`` is 0 for orthogonal
    adapters, 1 for two identical ones, and not capped at 1.

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
    lines += ["", *_legend_lines(len(report.adapters))]
    return "\n".join(lines)


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or an ImportError that says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(_PLOT_HINT) from exc
    return plt


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width=width))


def _from_zero(ax, values: Sequence[float]) -> None:
    """Y axis from 0 (= no interference, exact fit) with headroom, and rounding noise kept flat."""
    ax.set_ylim(0, max(0.05, 1.1 * max(values, default=0.0)))


def interference_figure(report: InterferenceReport) -> Figure:
    """Interference by layer depth: one panel (axes, own y scale) per metric, each with a reading hint.

    Panels, top to bottom: max |cos|, STI_rel, CP-STI_rel (one line per rank) and CP specificity
    (one line per rank), each the mean over a layer's modules. The axes title of each panel says how
    to read it, the figure caption how to read the whole.

    Args:
        report: The report to plot.

    Returns:
        The matplotlib figure (close it with ``matplotlib.pyplot.close`` when done).

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    plt = _pyplot()
    rows = layer_summary(report)
    n = len(report.adapters)
    labels = ["-" if row["layer"] is None else str(row["layer"]) for row in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(4, 1, figsize=(9, 12), sharex=True, layout="constrained")
    cos_ax, sti_ax, cp_ax, spec_ax = axes
    cos_ax.plot(x, [row["max_abs_cosine"] for row in rows], marker="^", color="C2")
    cos_ax.set(ylabel="max |cos|")
    cos_ax.set_title(
        "max |cos|: 0 = the adapters' deltas point in unrelated directions, 1 = the same delta up to scale.",
        loc="left",
        fontsize=9,
    )
    sti_ax.plot(x, [row["sti_rel"] for row in rows], marker="o", color="C0")
    sti_ax.set(ylabel="TSV STI_rel")
    sti_ax.set_title(
        _wrap(
            "STI_rel: 0 = orthogonal subspaces, higher = more overlap. A sum of |overlaps| over pairs of "
            "adapters and directions, not capped at 1: two identical adapters give 1, "
            f"{_identical_reference(n)}, and many partial overlaps add up past 1, so above 1 does NOT "
            "mean worse than identical adapters. Compare layers with each other.",
            110,
        ),
        loc="left",
        fontsize=9,
    )
    for k, rank in enumerate(report.ranks):
        cp_ax.plot(x, [row["cp"][k]["cp_sti_rel"] for row in rows], marker="s", label=f"R={rank}")
        spec_ax.plot(x, [row["cp"][k]["specificity"] for row in rows], marker="d", label=f"R={rank}")
    cp_ax.set(ylabel="CP-STI_rel")
    cp_ax.set_title(
        _wrap(
            "CP-STI_rel: the same sum over the CP components of different adapters; 0 for orthogonal "
            "adapters, and for identical ones when R leaves no room to split their shared components per "
            "adapter (shared components are not interference). It grows with R: compare at one R.",
            110,
        ),
        loc="left",
        fontsize=9,
    )
    spec_ax.set(ylabel="CP specificity", xlabel="layer")
    spec_ax.set_title(
        f"specificity: 1 = every CP component belongs to one adapter, 1/N = {1 / n:.2f} = all shared.",
        loc="left",
        fontsize=9,
    )
    for ax in (cp_ax, spec_ax):
        ax.legend(fontsize=8, title="CP rank", title_fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    _from_zero(cos_ax, [row["max_abs_cosine"] for row in rows])
    _from_zero(sti_ax, [row["sti_rel"] for row in rows])
    _from_zero(cp_ax, [cp["cp_sti_rel"] for row in rows for cp in row["cp"]])
    spec_ax.set_xticks(x, labels)
    fig.suptitle(f"Interference of {n} adapters by layer depth")
    fig.supxlabel(
        _wrap(
            "How to read: one panel per metric, each with its own y scale; every point is the mean over "
            "the layer's modules (x: layer index, '-': modules without one). Higher = more interference "
            "in the top three panels, more adapter-specific CP components in the bottom one.",
            120,
        ),
        fontsize=9,
    )
    return fig


def fit_figure(report: InterferenceReport) -> Figure:
    """Relative error of the CP fit against the CP rank (one axes, one metric), with a reading hint.

    Args:
        report: The report to plot.

    Returns:
        The matplotlib figure (close it with ``matplotlib.pyplot.close`` when done).

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    for m in report.modules:
        ax.plot(report.ranks, [c.rel_error for c in m.cp], color="0.8", linewidth=0.8)
    means = [_mean([m.cp[k].rel_error for m in report.modules]) for k in range(len(report.ranks))]
    ax.plot(report.ranks, means, color="C0", marker="o", linewidth=2, label="mean over modules")
    ax.set(xlabel="CP rank R", ylabel="relative error of the CP fit", title="CP fit error vs rank")
    ax.set_xticks(list(report.ranks))
    _from_zero(ax, [c.rel_error for m in report.modules for c in m.cp])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.supxlabel(
        _wrap(
            "How to read: grey = one module, blue = the mean. 0 = the rank-R CP fit reproduces the "
            "adapters exactly, 1 = it captures nothing; a CP merge at rank R starts from this error, "
            "so pick the smallest R whose error you accept.",
            95,
        ),
        fontsize=9,
    )
    return fig


def plot_report(report: InterferenceReport, out_dir: str | os.PathLike) -> list[Path]:
    """Write :func:`interference_figure` and :func:`fit_figure` to ``out_dir``.

    Args:
        report: The report to plot.
        out_dir: An existing folder.

    Returns:
        The paths written: ``out_dir/interference_by_layer.png`` and ``out_dir/fit_vs_rank.png``.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    paths = []
    for name, build in (("interference_by_layer.png", interference_figure), ("fit_vs_rank.png", fit_figure)):
        fig = build(report)
        try:
            fig.savefig(out_dir / name, dpi=120)
        finally:
            plt.close(fig)
        paths.append(out_dir / name)
    return paths

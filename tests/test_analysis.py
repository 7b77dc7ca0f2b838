"""Interference metrics on planted adapters whose answers are known exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import orthonormal, write_adapter

from peft_cp_merge.analysis.metrics import analyze_adapter_folders, pairwise_cosine, subspace_interference
from peft_cp_merge.analysis.report import (
    column_legend,
    format_report,
    layer_summary,
    plot_report,
    write_report_json,
)
from peft_cp_merge.engine.compression import LoraStack, compress
from peft_cp_merge.methods.core_space import core_slices

NAMES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")
D_OUT, D_IN, R = 10, 9, 2


def planted(tmp_path, *, orthogonal: bool):
    """Two rank-2 adapters per module: in orthogonal subspaces, or identical."""
    gen = torch.Generator().manual_seed(0)
    factors = [{}, {}]
    for name in NAMES:
        q_out, q_in = orthonormal(D_OUT, 2 * R, gen), orthonormal(D_IN, 2 * R, gen)
        for i in range(2):
            block = slice(R * i, R * (i + 1))
            mix_B, mix_A = (torch.randn(R, R, generator=gen, dtype=torch.float64) for _ in range(2))
            factors[i][name] = (mix_A @ q_in[:, block].T, q_out[:, block] @ mix_B)
        if not orthogonal:
            factors[1][name] = factors[0][name]
    return [write_adapter(tmp_path / f"ad{i}", factors[i], r=R, lora_alpha=4) for i in range(2)]


def test_adapters_in_orthogonal_subspaces_do_not_interfere(tmp_path):
    report = analyze_adapter_folders(planted(tmp_path, orthogonal=True), ranks=[4], progress=False)
    assert [m.name for m in report.modules] == list(NAMES)
    for module in report.modules:
        assert module.cosine[0][1] == pytest.approx(0.0, abs=1e-12)
        assert module.sti == pytest.approx(0.0, abs=1e-10)
        (cp,) = module.cp
        assert cp.rel_error == pytest.approx(0.0, abs=1e-8)
        assert cp.cp_sti_rel == pytest.approx(0.0, abs=1e-8)
        assert cp.specificity == pytest.approx(1.0, abs=1e-8)


def test_identical_adapters_have_cosine_one_and_share_every_cp_component(tmp_path):
    report = analyze_adapter_folders(planted(tmp_path, orthogonal=False), ranks=[2], progress=False)
    for module in report.modules:
        assert module.cosine[0][1] == pytest.approx(1.0, abs=1e-12)
        assert module.sti_rel == pytest.approx(1.0, abs=1e-10)
        (cp,) = module.cp
        assert cp.rel_error == pytest.approx(0.0, abs=1e-8)
        assert cp.cp_sti_rel == pytest.approx(0.0, abs=1e-8)  # shared, not interfering
        assert cp.specificity == pytest.approx(0.5, abs=1e-8)


def test_cosine_in_the_core_equals_the_dense_cosine():
    gen = torch.Generator().manual_seed(1)
    lora_A = [torch.randn(1, r, 13, generator=gen, dtype=torch.float64) for r in (3, 2, 4)]
    lora_B = [torch.randn(1, 17, r, generator=gen, dtype=torch.float64) for r in (3, 2, 4)]
    stack = LoraStack(lora_A, lora_B, [0.5, -2.0, 1.0])
    norms, cosine = pairwise_cosine(core_slices(compress(stack).core))
    dense = stack.to_dense()[0].flatten(0, 1).T  # (N, d_out * d_in)
    torch.testing.assert_close(norms[0], dense.norm(dim=1))
    unit = dense / dense.norm(dim=1, keepdim=True)
    torch.testing.assert_close(cosine[0], unit @ unit.T)


def test_report_table_json_and_layer_summary(tmp_path):
    folders = planted(tmp_path, orthogonal=True)
    report = analyze_adapter_folders(folders, ranks=[2, 4], progress=False)
    text = format_report(report)
    assert "Worst 2 modules (by STI_rel)" in text
    assert "err@2" in text
    assert "err@4" in text
    assert [row["layer"] for row in layer_summary(report)] == [0, 1]
    data = json.loads(write_report_json(report, tmp_path / "r.json").read_text())
    assert data["ranks"] == [2, 4]
    assert data["modules"][0]["cp"][1]["rank"] == 4


def test_report_legend_says_how_to_read_each_column_and_that_sti_is_not_capped_at_one(tmp_path):
    report = analyze_adapter_folders(planted(tmp_path, orthogonal=True), ranks=[2], progress=False)
    text = format_report(report)
    table, legend = text.split("How to read the columns")
    assert "err@2" in table
    flat = " ".join(legend.split())  # undo the wrapping
    for column in ("max|cos|", "STI_rel", "CP-STI@R", "spec@R", "err@R"):
        assert f"  {column} " in legend
    assert "0 = mutually orthogonal subspaces" in flat
    assert "two identical adapters give 1" in flat
    assert "N identical adapters give (N-1)^2 (here N = 2: 1)" in flat
    assert "not a fraction capped at 1" in flat
    assert "above 1 does NOT mean worse than identical adapters" in flat
    assert column_legend(6)["STI_rel"].count("(here N = 6: 25)") == 1


def test_n_identical_adapters_have_sti_rel_n_minus_one_squared():
    """The reference value the legend quotes: STI_rel is not capped at 1."""
    gen = torch.Generator().manual_seed(2)
    lora_A = torch.randn(1, R, D_IN, generator=gen, dtype=torch.float64)
    lora_B = torch.randn(1, D_OUT, R, generator=gen, dtype=torch.float64)
    for n in (2, 3, 4):
        stack = LoraStack([lora_A] * n, [lora_B] * n, [1.0] * n)
        _, sti_rel = subspace_interference(core_slices(compress(stack).core)[0])
        assert sti_rel == pytest.approx((n - 1) ** 2, rel=1e-9)


def _saved_figures(monkeypatch) -> dict[str, object]:
    """Record every figure :func:`plot_report` saves, by file name."""
    from matplotlib.figure import Figure

    saved, savefig = {}, Figure.savefig

    def record(fig, fname, *args, **kwargs):
        saved[Path(fname).name] = fig
        return savefig(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


def test_plots_have_one_axes_per_metric_and_say_how_to_read_them(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    report = analyze_adapter_folders(planted(tmp_path, orthogonal=True), ranks=[2, 4], progress=False)
    saved = _saved_figures(monkeypatch)
    paths = plot_report(report, tmp_path)
    assert [p.name for p in paths] == ["interference_by_layer.png", "fit_vs_rank.png"]
    assert all(p.stat().st_size > 0 for p in paths)

    by_layer = saved["interference_by_layer.png"]
    ylabels = [ax.get_ylabel() for ax in by_layer.axes]
    assert ylabels == ["max |cos|", "TSV STI_rel", "CP-STI_rel", "CP specificity"]
    lines = [[line.get_label() for line in ax.get_lines()] for ax in by_layer.axes]
    assert [len(labels) for labels in lines] == [1, 1, 2, 2]  # the CP metrics: one line per rank
    assert lines[2] == lines[3] == ["R=2", "R=4"]
    hints = [" ".join(ax.get_title(loc="left").split()) for ax in by_layer.axes]
    assert all(hints), "every panel says how to read it"
    assert "not capped at 1: two identical adapters give 1" in hints[1]
    assert "above 1 does NOT mean worse than identical adapters" in hints[1]
    assert "0 for orthogonal adapters, and for identical ones" in hints[2]
    assert by_layer.get_supxlabel().startswith("How to read:")

    (fit_ax,) = saved["fit_vs_rank.png"].axes
    assert fit_ax.get_ylabel() == "relative error of the CP fit"
    assert saved["fit_vs_rank.png"].get_supxlabel().startswith("How to read:")


def test_plots_are_written_or_explained(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    report = analyze_adapter_folders(planted(tmp_path, orthogonal=True), ranks=[2, 4], progress=False)
    paths = plot_report(report, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install matplotlib"):
        plot_report(report, tmp_path)


def test_bad_ranks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="ranks must be positive integers"):
        analyze_adapter_folders(planted(tmp_path, orthogonal=True), ranks=[0], progress=False)

"""End to end: ``peft-cp-merge merge`` / ``analyze`` on tiny adapters saved by PEFT."""

from __future__ import annotations

import json
import runpy
import sys
import warnings

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from testing_utils import save_peft_adapter, tiny_base, write_adapter

import peft_cp_merge  # noqa: F401  (registers combination_type="cp")
from peft_cp_merge import cli
from peft_cp_merge.cli import main
from peft_cp_merge.folders import merging as folder_merge

WEIGHTS = [0.7, 0.4]
TOKENS = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def adapters(tmp_path):
    """Two PEFT adapters of different ranks, alphas, patterns and rsLoRA on all layer kinds."""
    base = tiny_base()
    first = save_peft_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8, alpha_pattern={"lin1": 3})
    second = save_peft_adapter(
        base, tmp_path / "b", seed=2, r=3, lora_alpha=5, rank_pattern={"lin2": 2}, use_rslora=True
    )
    return [str(first), str(second)]


def in_memory(adapters, combination_type, **kwargs) -> PeftModel:
    model = PeftModel.from_pretrained(tiny_base(), adapters[0], adapter_name="a")
    model.load_adapter(adapters[1], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "merged", combination_type=combination_type, **kwargs)
    model.set_adapter("merged")
    return model


def loaded(out) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", UserWarning
        )  # e.g. PEFT's "Unexpected keyword arguments" in the config
        return PeftModel.from_pretrained(tiny_base(), str(out))


def deltas(model, adapter) -> dict[str, torch.Tensor]:
    return {
        name: layer.get_delta_weight(adapter)
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and (adapter in layer.lora_A or adapter in layer.lora_embedding_A)
    }


def merge(*args) -> int:
    return main(["merge", *map(str, args), "--no-progress"])


def test_cp_merge_from_folders_equals_the_in_memory_merge(adapters, tmp_path):
    out = tmp_path / "out"
    assert merge(*adapters, "--weights", *WEIGHTS, "--rank", 5, "--out", out) == 0
    expected = in_memory(adapters, "cp", cp_rank=5)
    got = loaded(out)
    assert got.peft_config["default"].r == got.peft_config["default"].lora_alpha == 5
    expected_deltas, got_deltas = deltas(expected, "merged"), deltas(got, "default")
    assert expected_deltas.keys() == got_deltas.keys()
    for name, delta in got_deltas.items():  # the same batches, the same arithmetic: bit for bit
        assert torch.equal(delta, expected_deltas[name]), name
    torch.testing.assert_close(got(TOKENS), expected(TOKENS), rtol=1e-5, atol=1e-5)


def test_default_and_sum_like_cp_from_folders_equal_their_in_memory_merges(adapters, tmp_path, capsys):
    default, sum_like = tmp_path / "default", tmp_path / "sum_like"
    assert merge(*adapters, "--weights", *WEIGHTS, "--out", default) == 0
    assert "departs from the sum on purpose" in capsys.readouterr().out
    assert merge(*adapters, "--weights", *WEIGHTS, "--no-whiten", "--no-isotropic", "--out", sum_like) == 0
    assert "on purpose" not in capsys.readouterr().out
    for out, options in ((default, {}), (sum_like, {"cp_whiten": False, "cp_isotropic": False})):
        expected = in_memory(adapters, "cp", **options)
        got = loaded(out)
        assert got.peft_config["default"].r == 7  # the default rank: sum r = 4 + 3
        torch.testing.assert_close(got(TOKENS), expected(TOKENS), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(loaded(default)(TOKENS), loaded(sum_like)(TOKENS), atol=1e-4)


def test_cat_merge_is_the_exact_weighted_sum(adapters, tmp_path):
    out = tmp_path / "out"
    assert merge(*adapters, "--weights", *WEIGHTS, "--method", "cat", "--out", out) == 0
    reference = PeftModel.from_pretrained(tiny_base(), adapters[0], adapter_name="a")
    reference.load_adapter(adapters[1], adapter_name="b")
    first, second = deltas(reference, "a"), deltas(reference, "b")
    got = deltas(loaded(out), "default")
    assert got.keys() == first.keys()
    for name, value in got.items():
        torch.testing.assert_close(
            value, WEIGHTS[0] * first[name] + WEIGHTS[1] * second[name], rtol=1e-5, atol=1e-6
        )


def test_svd_merge_equals_peft_svd(tmp_path):
    base = tiny_base()
    targets = ["lin1", "lin2"]  # PEFT's own "svd" fails on Conv1d layers
    folders = [
        str(save_peft_adapter(base, tmp_path / n, seed=s, target_modules=targets))
        for n, s in (("a", 1), ("b", 2))
    ]
    out = tmp_path / "out"
    assert merge(*folders, "--weights", *WEIGHTS, "--method", "svd", "--rank", 3, "--out", out) == 0
    expected = in_memory(folders, "svd", svd_rank=3)
    torch.testing.assert_close(loaded(out)(TOKENS), expected(TOKENS), rtol=1e-5, atol=1e-5)


def test_provenance_is_recorded_beside_the_config(adapters, tmp_path):
    out = tmp_path / "out"
    assert merge(*adapters, "--weights", *WEIGHTS, "--method", "tsv", "--rank", 4, "--out", out) == 0
    info = json.loads((out / "merge_info.json").read_text())
    assert (info["method"], info["rank"], [i["weight"] for i in info["inputs"]]) == ("tsv", 4, WEIGHTS)
    assert set(info["module_stats"]) == {"conv", "emb", "lin1", "lin2"}
    assert "sum_i w_i dW_i" in info["rel_error_meaning"]
    assert "```json" in (out / "README.md").read_text()
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["rank_pattern"], config["alpha_pattern"], config["use_rslora"]) == ({}, {}, False)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "1", "--rank", "4"], "Got 1 weights for 2 adapters"),
        (["--weights", "1", "1", "--method", "cat", "--rank", "4"], "do not pass a rank"),
        (["--weights", "1", "1", "--rank", "8"], "rank 8 is above 7"),
        (["--weights", "0", "0", "--rank", "4"], "All weights are zero"),
        (["--weights", "1", "1", "--rank", "4", "--device", "gpu0"], "Unknown device 'gpu0'"),
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_written(adapters, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["merge", *adapters, *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_without_rank_each_method_takes_its_default(adapters, tmp_path):
    for method, expected in (("cp", 7), ("svd", 4), ("cat", 7)):  # cp: min(2 max r, sum r); svd: max r
        out = tmp_path / method
        assert merge(*adapters, "--weights", *WEIGHTS, "--method", method, "--out", out) == 0
        assert json.loads((out / "merge_info.json").read_text())["rank"] == expected


def test_different_base_models_are_refused_unless_allowed(tmp_path, capsys):
    factors = {"fc": (torch.randn(2, 5), torch.randn(3, 2))}
    first = write_adapter(tmp_path / "a", factors, r=2, lora_alpha=2, base="org/base-7b")
    second = write_adapter(tmp_path / "b", factors, r=2, lora_alpha=2, base="org/other-7b")
    out = tmp_path / "out"
    assert merge(first, second, "--weights", 1, 1, "--rank", 2, "--out", out) == 2
    err = capsys.readouterr().err
    assert "'org/base-7b'" in err
    assert "'org/other-7b'" in err
    assert not out.exists()
    with pytest.warns(UserWarning, match="different base models"):
        assert (
            merge(first, second, "--weights", 1, 1, "--rank", 2, "--out", out, "--allow-different-base") == 0
        )
    assert (out / "adapter_model.safetensors").exists()


def test_dora_adapter_is_refused(tmp_path, capsys):
    base = tiny_base()
    plain = save_peft_adapter(base, tmp_path / "a", seed=1, target_modules=["lin1"])
    dora = save_peft_adapter(base, tmp_path / "b", seed=2, target_modules=["lin1"], use_dora=True)
    assert merge(plain, dora, "--weights", 1, 1, "--rank", 2, "--out", tmp_path / "out") == 2
    assert "use_dora=True is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_overwrite_and_only_a_merge_is_replaced(adapters, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert merge(*adapters, "--weights", *WEIGHTS, "--rank", 3, "--out", out) == 2
    assert "exists" in capsys.readouterr().err
    assert merge(*adapters, "--weights", *WEIGHTS, "--rank", 3, "--out", out, "--overwrite") == 2
    assert "was not written by peft-cp-merge" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert merge(*adapters, "--weights", *WEIGHTS, "--rank", 3, "--out", out, "--overwrite") == 0
    assert merge(*adapters, "--weights", *WEIGHTS, "--rank", 2, "--out", out, "--overwrite") == 0
    assert json.loads((out / "merge_info.json").read_text())["rank"] == 2


@pytest.mark.parametrize("overwrite", [False, True])
def test_interrupted_write_leaves_no_partial_adapter(adapters, tmp_path, monkeypatch, overwrite):
    out = tmp_path / "out"
    if overwrite:  # an earlier merge of ours, to be replaced
        out.mkdir()
        (out / "merge_info.json").write_text('{"tool": "peft-cp-merge 0.1.0"}')
    real, calls = folder_merge._merge_group, []

    def fail_on_second_group(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(folder_merge, "_merge_group", fail_on_second_group)
    flags = ["--overwrite"] if overwrite else []
    # One tiny module per group: the file is half written when the interrupt comes.
    assert (
        merge(*adapters, "--weights", *WEIGHTS, "--rank", 3, "--out", out, "--group-mb", 1e-6, *flags) == 130
    )
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", *(["out"] if overwrite else [])]
    if overwrite:
        assert [p.name for p in out.iterdir()] == ["merge_info.json"]


def test_dry_run_prints_the_plan_and_writes_nothing(adapters, tmp_path, capsys):
    out = tmp_path / "out"
    assert merge(*adapters, "--weights", *WEIGHTS, "--rank", 5, "--out", out, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "emb   embedding" in text
    assert "4 modules, 480 merged parameters" in text  # 5 * ((8 + 24) + (8 + 20) + (12 + 8) + (4 + 12))
    assert not out.exists()


def test_analyze_writes_table_json_and_plots(adapters, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    report = tmp_path / "report"
    assert main(["analyze", *adapters, "--rank", "2", "4", "--out", str(report), "--no-progress"]) == 0
    assert "By layer depth" in capsys.readouterr().out
    assert sorted(p.name for p in report.iterdir()) == [
        "fit_vs_rank.png",
        "interference_by_layer.png",
        "report.json",
    ]
    assert json.loads((report / "report.json").read_text())["ranks"] == [2, 4]


def test_python_dash_m_help(monkeypatch, capsys):
    # In-process ``python -m peft_cp_merge merge --help``: __main__ calls main() and exits with its code.
    monkeypatch.setattr(sys, "argv", ["peft_cp_merge", "merge", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("peft_cp_merge", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: peft-cp-merge merge ")
    assert "--weights" in out


def test_python_dash_m_exits_with_the_status_main_returns(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["peft_cp_merge"])
    monkeypatch.setattr(cli, "main", lambda: cli.EXIT_FAULT)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("peft_cp_merge", run_name="__main__")
    assert exit_info.value.code == cli.EXIT_FAULT


@pytest.mark.cuda
def test_cuda_merge_matches_cpu(adapters, tmp_path):
    """Where the merge is unique (rank 7 = sum of the ranks: exact), CUDA and CPU give the same deltas.

    Below that, a rank-5 fit of these random adapters has no unique answer: on an H200 the ALS
    iterates of the two devices drifted apart under rounding within 50 sweeps, with or without the
    line search, to fits equal to four digits. So there the devices must agree on the fit.
    """
    common = [*adapters, "--weights", *WEIGHTS]
    assert merge(*common, "--rank", 7, "--out", tmp_path / "cpu") == 0
    assert merge(*common, "--rank", 7, "--out", tmp_path / "cuda", "--device", "cuda") == 0
    for cpu, cuda in zip(
        deltas(loaded(tmp_path / "cpu"), "default").values(),
        deltas(loaded(tmp_path / "cuda"), "default").values(),
        strict=True,
    ):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-5)
    errors = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"rank5_{device}"
        assert merge(*common, "--rank", 5, "--out", out, "--device", device) == 0
        info = json.loads((out / "merge_info.json").read_text())
        errors[device] = [stats["rel_error"] for _, stats in sorted(info["module_stats"].items())]
    assert errors["cuda"] == pytest.approx(errors["cpu"], rel=1e-2)

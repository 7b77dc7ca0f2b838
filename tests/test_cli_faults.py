"""The command line under bad input, faults and concurrency: nothing lost, nothing half-said.

Every expected failure ends as one line ``peft-cp-merge: error: ...`` with exit status 2 (bad input)
or 1 (a fault while working), never a traceback, and leaves the inputs and the output as they were.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from testing_utils import save_peft_adapter, tiny_base, write_adapter

from peft_cp_merge import __version__
from peft_cp_merge.cli import main
from peft_cp_merge.folders import merging as folder_merge
from peft_cp_merge.folders.output import output_lock
from peft_cp_merge.methods import METHODS

TOKENS = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def folder(tmp_path):
    """A user's folder holding two adapters (ranks 4 and 3: every module's total rank is 7)."""
    base = tiny_base()
    root = tmp_path / "adapters"
    save_peft_adapter(base, root / "a", seed=1, r=4, lora_alpha=8)
    save_peft_adapter(base, root / "b", seed=2, r=3, lora_alpha=6)
    return root


def run(*args) -> int:
    return main([*map(str, args), "--no-progress"])


def merge(folder, out, *extra) -> int:
    return run("merge", folder / "a", folder / "b", "--weights", 0.5, 0.5, "--out", out, *extra)


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("peft-cp-merge: error: ")]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err), err
    return errors[0]


def poison(adapter_dir, value: float, key_part: str = "lin1.lora_B") -> None:
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if key_part in k)
    tensors[key][0, 0] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_an_output_around_the_inputs_is_refused_and_they_stay_intact(folder, capsys, flags):
    before = snapshot(folder)
    (folder / "notes.txt").write_text("mine")
    assert merge(folder, folder, "--rank", 4, *flags) == 2  # a typo for --out adapters/merged
    assert "contains the input" in one_error_line(capsys)
    assert snapshot(folder) == before | {"notes.txt": b"mine"}


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("../adapters/a/merged", "lies inside the input"),
        (".", "current directory"),
        ("..", "contains the input"),
        ("../notes.txt/x", "is a file"),
    ],
)
def test_other_unsafe_outputs_are_refused(folder, capsys, monkeypatch, out, message):
    (folder.parent / "work").mkdir()
    monkeypatch.chdir(folder.parent / "work")
    (folder.parent / "notes.txt").write_text("mine")
    assert merge(folder, out, "--rank", 4, "--overwrite") == 2
    assert message in one_error_line(capsys)


def test_overwrite_replaces_a_previous_merge_but_not_other_content(folder, tmp_path, capsys):
    out = tmp_path / "merged"
    assert merge(folder, out, "--rank", 4) == 0
    assert merge(folder, out, "--rank", 2, "--overwrite") == 0
    assert json.loads((out / "merge_info.json").read_text())["rank"] == 2
    (out / "merge_info.json").unlink()  # no longer recognisably ours
    assert merge(folder, out, "--rank", 4, "--overwrite") == 2
    assert "was not written by peft-cp-merge" in one_error_line(capsys)


def test_a_merge_while_another_writes_the_same_output_fails_cleanly(folder, tmp_path, capsys):
    out = tmp_path / "merged"
    with output_lock(out):
        assert merge(folder, out, "--rank", 4) == 2
        assert "being written by another peft-cp-merge process" in one_error_line(capsys)
    assert not out.exists()


def test_of_two_concurrent_merges_exactly_one_succeeds_and_its_output_loads(
    folder, tmp_path, monkeypatch, capsys
):
    out, real = tmp_path / "merged", folder_merge._merge_group
    first_inside, second_done = threading.Event(), threading.Event()

    def slow_first(*args, **kwargs):  # the first merge waits, mid-write, until the second has ended
        if not first_inside.is_set():
            first_inside.set()
            second_done.wait(timeout=120)
        return real(*args, **kwargs)

    monkeypatch.setattr(folder_merge, "_merge_group", slow_first)
    codes = {}
    first = threading.Thread(target=lambda: codes.setdefault("first", merge(folder, out, "--rank", 4)))
    first.start()
    assert first_inside.wait(timeout=120)
    codes["second"] = merge(folder, out, "--rank", 4)
    second_done.set()
    first.join(timeout=120)
    assert codes == {"first": 0, "second": 2}
    assert "being written by another peft-cp-merge process" in one_error_line(capsys)
    assert merge(folder, out, "--rank", 4) == 2  # and once it is written, it exists
    assert "exists" in one_error_line(capsys)
    model = PeftModel.from_pretrained(tiny_base(), str(out))
    assert torch.isfinite(model(TOKENS)).all()


def test_leftovers_of_a_killed_merge_are_removed_by_the_next(folder, tmp_path):
    out = tmp_path / "merged"
    leftover = tmp_path / ".merged.1a2b3c4d5e6f.partial"  # what SIGKILL leaves (no cleanup runs)
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    assert merge(folder, out, "--rank", 4) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "merged"]


def test_sigterm_removes_the_partial_output(folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    real = folder_merge._merge_group

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(folder_merge, "_merge_group", terminated)
    assert merge(folder, out, "--rank", 4) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_by_every_method_naming_the_adapter(
    folder, tmp_path, capsys, method, value
):
    poison(folder / "b", value)
    rank = [] if method == "cat" else ["--rank", 4]
    assert merge(folder, tmp_path / "merged", "--method", method, *rank) == 2
    line = one_error_line(capsys)
    assert f"{folder / 'b'}: module 'lin1': lora_B has 1 non-finite value(s)" in line
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapters"]


def test_huge_values_are_refused_naming_the_adapter_in_dry_run_and_analyze(folder, tmp_path, capsys):
    poison(folder / "a", 1e30, "lin2.lora_A")
    assert merge(folder, tmp_path / "merged", "--rank", 4, "--dry-run") == 2
    assert f"{folder / 'a'}: module 'lin2': lora_A has values up to 1e+30" in one_error_line(capsys)
    assert run("analyze", folder / "a", folder / "b", "--rank", 2) == 2
    assert "lora_A has values up to 1e+30" in one_error_line(capsys)


def test_a_rank_above_every_total_rank_is_refused_in_dry_run(folder, tmp_path, capsys):
    assert merge(folder, tmp_path / "merged", "--rank", 1000000, "--dry-run") == 2
    assert "rank 1000000 is above 7" in one_error_line(capsys)
    assert merge(folder, tmp_path / "merged", "--rank", 7, "--dry-run") == 0


def test_all_zero_weights_are_refused(folder, tmp_path, capsys):
    assert (
        run("merge", folder / "a", folder / "b", "--weights", 0, 0, "--rank", 4, "--out", tmp_path / "m") == 2
    )
    assert "All weights are zero" in one_error_line(capsys)


def test_unreadable_files_are_named(folder, tmp_path, capsys):
    weights = folder / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert merge(folder, tmp_path / "merged", "--rank", 4) == 2
    line = one_error_line(capsys)
    assert f"{folder / 'a'}: adapter_model.safetensors is truncated or not a safetensors file" in line
    (folder / "b" / "adapter_config.json").write_text("{not json")
    assert (
        run("merge", folder / "b", folder / "a", "--weights", 1, 1, "--rank", 4, "--out", tmp_path / "m") == 2
    )
    assert f"{folder / 'b'}: adapter_config.json cannot be read: JSONDecodeError" in one_error_line(capsys)


def test_a_full_disk_is_a_one_line_fault_and_leaves_nothing(folder, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "merged"))

    monkeypatch.setattr(folder_merge, "_write_provenance", full)
    assert merge(folder, tmp_path / "merged", "--rank", 4) == 1
    assert "No space left on device" in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["adapters"]


def test_an_unexpected_error_is_one_line_and_v_shows_the_traceback(folder, tmp_path, monkeypatch, capsys):
    def bug(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(folder_merge, "_merge_group", bug)
    assert merge(folder, tmp_path / "merged", "--rank", 4) == 1
    assert "unexpected TypeError: a bug (run with -v for the traceback)" in one_error_line(capsys)
    assert merge(folder, tmp_path / "merged", "--rank", 4, "-v") == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["analyze", "A", "B", "--top", "0"], "expected an integer >= 1, got '0'"),
        (["analyze", "A", "B", "--top", "-3"], "expected an integer >= 1, got '-3'"),
        (["merge", "A", "B", "--weights", "1", "nan", "--out", "X"], "expected a finite number, got 'nan'"),
        (["merge", "A", "B", "--weights", "1", "1", "--rank", "0", "--out", "X"], "got '0'"),
        (["merge", "A", "B", "--weights", "1", "1", "--group-mb", "0", "--out", "X"], "a number > 0"),
    ],
)
def test_bad_numbers_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu0", "cuda:99"])
def test_a_bad_or_absent_device_is_refused_before_any_work(folder, tmp_path, capsys, device):
    assert merge(folder, tmp_path / "merged", "--rank", 4, "--device", device) == 2
    assert f"'{device}'" in one_error_line(capsys)


def test_analyze_refuses_to_write_into_an_adapter_folder(folder, capsys):
    assert run("analyze", folder / "a", folder / "b", "--out", folder / "b") == 2
    assert "is the input" in one_error_line(capsys)
    other = folder.parent / "other"
    save_peft_adapter(tiny_base(), other, seed=3)
    assert run("analyze", folder / "a", folder / "b", "--out", other) == 2
    assert "holds an adapter" in one_error_line(capsys)


def test_merge_info_records_iterations_and_a_warning_names_unconverged_modules(folder, tmp_path, capsys):
    out = tmp_path / "merged"
    flags = ("--n-iter-max", 1, "--init", "random", "--no-whiten", "--no-isotropic")  # sum-like
    with pytest.warns(UserWarning, match=r"4 of 4 modules stopped at n_iter_max=1 before converging"):
        assert merge(folder, out, "--rank", 4, *flags) == 0
    info = json.loads((out / "merge_info.json").read_text())
    assert info["not_converged"] == ["conv", "emb", "lin1", "lin2"]
    assert {m["n_iter"] for m in info["module_stats"].values()} == {1}
    assert all(0 < m["rel_error"] < 1 and 0 < m["fit_error"] < 1 for m in info["module_stats"].values())


def test_rel_error_means_the_distance_to_the_weighted_sum_for_every_method(tmp_path):
    gen = torch.Generator().manual_seed(0)
    factors = [{"fc": (torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen))} for _ in range(2)]
    dirs = [write_adapter(tmp_path / n, f, r=2, lora_alpha=2) for n, f in zip("ab", factors, strict=True)]
    exact = 0.5 * factors[0]["fc"][1] @ factors[0]["fc"][0] + 0.5 * factors[1]["fc"][1] @ factors[1]["fc"][0]
    for method, rank in (("cp", 2), ("svd", 2), ("tsv", 3), ("cat", None)):
        out = tmp_path / method
        flags = ["--rank", rank] if rank else []
        assert run("merge", *dirs, "--weights", 0.5, 0.5, "--method", method, "--out", out, *flags) == 0
        merged = load_file(str(out / "adapter_model.safetensors"))
        delta = merged["base_model.model.fc.lora_B.weight"] @ merged["base_model.model.fc.lora_A.weight"]
        expected = float((delta - exact).norm() / exact.norm())
        stats = json.loads((out / "merge_info.json").read_text())["module_stats"]["fc"]
        assert stats["rel_error"] == pytest.approx(expected, rel=1e-3, abs=1e-6), method


def test_outputs_follow_the_umask_and_list_target_modules_sorted(folder, tmp_path):
    previous = os.umask(0o022)
    try:
        assert merge(folder, tmp_path / "merged", "--rank", 4) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o755
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["conv", "emb", "lin1", "lin2"]


def test_warnings_are_one_line_in_the_command_line():
    from peft_cp_merge.cli import _format_warning

    text = _format_warning(UserWarning("4 of 4 modules stopped"), UserWarning, "x.py", 3)
    assert text == "peft-cp-merge: warning: 4 of 4 modules stopped\n"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"peft-cp-merge {__version__}"


def test_boolean_method_options_have_a_no_form_and_reach_the_merge(folder, tmp_path):
    outs = {}
    for name, flags in (("searched", []), ("plain", ["--no-line-search"])):
        outs[name] = tmp_path / name
        assert merge(folder, outs[name], "--rank", 4, "--init", "random", *flags) == 0
    info = json.loads((outs["plain"] / "merge_info.json").read_text())
    assert info["options"]["line_search"] is False
    searched, plain = (load_file(str(out / "adapter_model.safetensors")) for out in outs.values())
    assert any(not torch.equal(searched[key], plain[key]) for key in searched)

"""Output folders: no data loss, no half-written output, no race, no leftovers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from peft_cp_merge.folders import output as output_folder
from peft_cp_merge.folders.output import MARKER, OutputError, atomic_directory, check_output_dir, output_lock


def ours(folder):
    """A folder as this tool leaves it: with its marker file."""
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"tool": "peft-cp-merge 0.1.0"}))
    return folder


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"

    def interrupted_write():
        with atomic_directory(out) as tmp:
            (tmp / "half.json").write_text("{}")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_write()
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_replaced_only_on_request(tmp_path):
    out = ours(tmp_path / "out")
    with pytest.raises(FileExistsError, match="exists"), atomic_directory(out):
        pass
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_overwrite_refuses_a_folder_the_tool_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / MARKER).write_text(json.dumps({"tool": "someone else"}))
    with (
        pytest.raises(OutputError, match="was not written by peft-cp-merge"),
        atomic_directory(out, overwrite=True),
    ):
        pytest.fail("the block must not run")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_overwrite_accepts_an_empty_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "x").write_text("x")
    assert [p.name for p in out.iterdir()] == ["x"]


@pytest.mark.parametrize(
    ("out", "inputs", "message"),
    [
        ("adapters", ["adapters/a", "adapters/b"], "contains the input"),
        ("adapters/a", ["adapters/a", "adapters/b"], "is the input"),
        ("adapters/a/merged", ["adapters/a", "adapters/b"], "lies inside the input"),
        (".", [], "current directory"),
        ("..", [], "current directory"),
        ("file.txt/merged", [], "is a file"),
    ],
)
def test_unsafe_outputs_are_refused_even_with_overwrite(tmp_path, monkeypatch, out, inputs, message):
    monkeypatch.chdir(tmp_path)
    for name in inputs:
        os.makedirs(name)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match=message):
        check_output_dir(out, inputs, overwrite=True)


def test_a_second_writer_fails_at_once_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    busy = r"being written by another peft-cp-merge process \(pid \d+\)"
    with output_lock(out), pytest.raises(OutputError, match=busy), atomic_directory(out):
        pytest.fail("the block must not run")
    assert not out.exists()
    with atomic_directory(out) as tmp:  # the lock is free again once its holder is done
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# Loads output_folder.py alone (it needs only the standard library): no torch import, a fast subprocess.
KILLED_WRITER = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("output_folder", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with module.atomic_directory(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 100)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_leftovers_of_a_killed_writer_are_removed_by_the_next(tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(KILLED_WRITER)
    done = subprocess.run([sys.executable, "-c", script, str(out), output_folder.__file__], check=False)
    assert done.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert any(name.endswith(".partial") for name in left), left  # SIGKILL runs no cleanup
    other = tmp_path / ".out.x.0123abcd.partial"  # belongs to an output named "out.x": not ours to touch
    other.mkdir()
    with atomic_directory(out) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "out"]


def test_an_output_moved_aside_and_never_restored_is_put_back(tmp_path):
    out = tmp_path / "out"
    aside = ours(tmp_path / ".out.0a1b2c3d4e5f.old")  # killed between the two renames of a replacement
    with pytest.warns(UserWarning, match="Restored"), pytest.raises(FileExistsError), atomic_directory(out):
        pass
    assert (out / MARKER).exists()
    assert not aside.exists()


def test_new_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_atomic_write_text_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "library.json"
    output_folder.atomic_write_text(path, "old")
    output_folder.atomic_write_text(path, "new")
    assert path.read_text() == "new"

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output_folder.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        output_folder.atomic_write_text(path, "half")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["library.json"]  # no temporary file left

"""The ``upstream/`` patches apply to the installed PEFT, their tests pass, and the plugin uses the hook.

Two copies of the installed ``peft`` package (as ``src/peft`` of a PEFT checkout, with an empty
``tests/``) get the patch series: ``b`` patch 0001 (the combination-type hook), ``c`` 0001 + 0002
(PEFT's own "cp"). ``upstream/check.py`` then runs, in a subprocess, the patches' own test files on
each copy together with ``test_upstream_binding.py``, which checks that this package registers "cp"
through the hook (``b``) or leaves PEFT's own "cp" in place (``c``). The unpatched PEFT of this
process is the wrapper path, which ``test_upstream_binding.py`` and ``test_peft_binding.py`` cover
directly. When a new PEFT release breaks a patch, this fails; ``upstream/README.md`` says how to
refresh them.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest

REPO = Path(__file__).resolve().parents[1]
SERIES = (
    REPO / "upstream" / "0001-combination-type-hook" / "peft.patch",
    REPO / "upstream" / "0002-cp-combination-type" / "peft.patch",
)


def _apply(patch: Path, tree: Path) -> None:
    if shutil.which("git"):
        # GIT_CEILING_DIRECTORIES: never mistake a repository above the temp folder for this tree
        env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)}
        command = ["git", "apply", "--verbose", str(patch)]
    elif shutil.which("patch"):
        env, command = None, ["patch", "-p1", "--forward", "--batch", "-i", str(patch)]
    else:
        pytest.skip("neither git nor patch is installed: the upstream patches cannot be applied")
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{patch.relative_to(REPO)} does not apply to peft {peft.__version__}:\n" + (
        done.stdout + done.stderr
    )


def test_patches_apply_and_their_tests_pass_with_the_plugin_on_the_hook(tmp_path):
    installed = Path(peft.__file__).parent
    shutil.copytree(installed, tmp_path / "b" / "src" / "peft", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "b" / "tests").mkdir()
    _apply(SERIES[0], tmp_path / "b")
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    _apply(SERIES[1], tmp_path / "c")

    done = subprocess.run(
        [sys.executable, str(REPO / "upstream" / "check.py"), str(tmp_path)],
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Exit status 0 also means the copies were imported: their tests import register_combination_type,
    # and test_upstream_binding.py fails on a PEFT without the hook when told to expect one.
    assert done.returncode == 0, f"PEFT {peft.__version__} with the upstream patches:\n{done.stdout[-8000:]}"
    assert done.stdout.count(" passed") == 2, done.stdout[-8000:]

"""Run the patches' own tests on patched PEFT trees, with this package's binding checks, in one process.

Usage::

    bash upstream/refresh.sh unpack WORK   # WORK/b: PEFT + 0001, WORK/c: PEFT + 0001 + 0002
    python upstream/check.py WORK

Each tree's ``src`` goes first on ``sys.path`` in turn (PEFT and this package are imported afresh,
torch and transformers once), and pytest runs the tree's patch tests plus
``tests/test_upstream_binding.py`` with ``PEFT_CP_MERGE_EXPECT`` set to what the plugin must do
there: register "cp" through the hook (``b``), or leave PEFT's own "cp" alone (``c``).
Exit status 0 when everything passed. ``tests/test_upstream.py`` runs this in a subprocess.
"""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BINDING_TESTS = REPO / "tests" / "test_upstream_binding.py"
# tree, what the plugin must do there, the patches' test files
RUNS = (
    ("b", "hook", ("tests/test_lora_combination_types.py",)),
    ("c", "peft", ("tests/test_lora_combination_types.py", "tests/test_lora_cp_merge.py")),
)


def _forget(work: Path) -> None:
    """Drop PEFT, this package and every test module from ``sys.modules``, so the next tree starts afresh."""
    roots = (str(work), str(REPO / "tests"))
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if name.split(".")[0] in ("peft", "peft_cp_merge") or path.startswith(roots):
            del sys.modules[name]


def main(work: Path) -> int:
    sys.path.insert(0, str(REPO / "tests"))  # conftest.py imports testing_utils
    failed = False
    for tree, expect, test_files in RUNS:
        src = str(work / tree / "src")
        _forget(work)
        sys.path.insert(0, src)
        os.environ["PEFT_CP_MERGE_EXPECT"] = expect
        args = ["-q", "-p", "no:cacheprovider", "--import-mode=importlib", "-c", os.devnull]
        args += ["--rootdir", str(work / tree), *(str(work / tree / f) for f in test_files)]
        args.append(str(BINDING_TESTS))
        print(f"== PEFT + patches in {work / tree} (plugin: {expect})", flush=True)
        failed |= pytest.main(args) != 0
        sys.path.remove(src)
    return int(failed)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]).resolve()))

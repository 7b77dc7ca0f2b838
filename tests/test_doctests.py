"""The docstring examples of every module of the package run and print what they show.

One test per module, found with ``pkgutil.walk_packages``. Modules of the ``library`` subpackage
import its extra (``pip install 'peft-cp-merge[library]'``) and are skipped without it; examples
that need files or models are marked ``# doctest: +SKIP`` in the docstrings. Not run through
``--doctest-modules``, which would import those modules whether or not the extra is installed.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest
import torch

import peft_cp_merge

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Module name prefix -> modules its import needs beyond the core dependencies (pyproject extras).
EXTRAS = {
    "peft_cp_merge.library": ("accelerate", "transformers", "sentence_transformers", "sklearn"),
}

# ``python -m peft_cp_merge`` runs the command line on import; test_cli.py runs it in-process.
NOT_IMPORTABLE = {"peft_cp_merge.__main__"}


def _package_modules() -> list[str]:
    """Every module of the package, subpackages included, without importing what needs an extra.

    ``walk_packages`` imports subpackages to list their modules; a subpackage whose import fails
    (an extra is missing) is listed again from its folder, so the same tests exist, and are skipped,
    in every environment.
    """
    failed: list[str] = []
    names = [peft_cp_merge.__name__]
    names += [
        info.name
        for info in pkgutil.walk_packages(peft_cp_merge.__path__, "peft_cp_merge.", onerror=failed.append)
    ]
    for package in failed:
        locations = importlib.util.find_spec(package).submodule_search_locations
        names += [
            info.name for info in pkgutil.walk_packages(locations, f"{package}.", onerror=failed.append)
        ]
    return sorted(set(names) - NOT_IMPORTABLE)


MODULES = _package_modules()


def test_every_layer_of_the_package_is_collected():
    for name in ("engine.als", "methods.cp", "folders.output", "analysis.report", "library.merging", "cli"):
        assert f"peft_cp_merge.{name}" in MODULES


@pytest.mark.parametrize("module_name", MODULES)
# cluster_embeddings' example asks k-means for 3 clusters of 2 distinct points (it then keeps K=2).
@pytest.mark.filterwarnings("ignore:Number of distinct clusters")  # sklearn ConvergenceWarning
def test_docstring_examples(module_name):
    for prefix, requirements in EXTRAS.items():
        if module_name == prefix or module_name.startswith(f"{prefix}."):
            for requirement in requirements:
                pytest.importorskip(requirement, reason=f"{module_name} needs the [library] extra")
    module = importlib.import_module(module_name)
    torch.manual_seed(0)  # examples draw random tensors: the same ones on every run
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module, module_name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)

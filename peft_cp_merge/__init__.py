"""peft-cp-merge: merge LoRA adapters by a joint CP (PARAFAC) decomposition of their deltas.

``import peft_cp_merge`` adds ``combination_type="cp"`` to PEFT's ``add_weighted_adapter``::

    import peft_cp_merge  # noqa: F401

    model.add_weighted_adapter(["math", "code"], [1.0, 1.0], "merged", combination_type="cp", cp_rank=16)

The engine (:func:`cp_als`, :func:`compress`, :func:`merge_modules`) knows nothing of PEFT and works on
plain tensors; :func:`add_cp_weighted_adapter` is the same merge without patching PEFT.
"""

from importlib.metadata import PackageNotFoundError, version

from .compression import LoraCore, LoraStack, compress
from .cp_als import CPResult, cp_als
from .merge import MergedLora, merge_modules
from .peft_binding import CPMergeReport, add_cp_weighted_adapter, is_registered, register, unregister

try:
    __version__ = version("peft-cp-merge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

register()

__all__ = [
    "CPMergeReport",
    "CPResult",
    "LoraCore",
    "LoraStack",
    "MergedLora",
    "__version__",
    "add_cp_weighted_adapter",
    "compress",
    "cp_als",
    "is_registered",
    "merge_modules",
    "register",
    "unregister",
]

"""peft-cp-merge: merge LoRA adapters by a joint CP (PARAFAC) decomposition of their deltas.

``import peft_cp_merge`` adds ``combination_type="cp"`` to PEFT's ``add_weighted_adapter``::

    import peft_cp_merge  # noqa: F401

    model.add_weighted_adapter(["math", "code"], [1.0, 1.0], "merged", combination_type="cp")

The layers, each importing only the ones before it (``docs/design.md`` has the maths):

- :mod:`.engine`: the decomposition, torch only (:func:`compress`, :func:`cp_als`);
- :mod:`.methods`: one module per merge method and their registry (:data:`METHODS`,
  :func:`merge_modules` and :class:`CPOptions` for ``"cp"``);
- :mod:`.input_checks` and :mod:`.peft_binding`: ``add_weighted_adapter(..., combination_type="cp")``;
  :func:`add_cp_weighted_adapter` is the same merge without patching PEFT;
- :mod:`.calibration`: :func:`calibrate` learns each component's gain of a "cp" adapter from a few
  examples (base model and CP factors frozen) and bakes it into ``lora_A``;
- :mod:`.osrm`: :func:`osrm_init` starts a new adapter's ``lora_A`` where the other tasks' inputs
  have the least energy (OSRM), so that it interferes less once merged;
- :mod:`.folders`: adapter folders read, planned, merged and written without a base model;
- :mod:`.analysis`: where adapters interfere; :mod:`.library`: clustered adapter libraries;
- :mod:`.cli`: the ``peft-cp-merge`` command line.
"""

from ._version import __version__
from .calibration import CalibrationReport, calibrate
from .engine.als import CPResult, cp_als
from .engine.compression import LoraCore, LoraStack, compress
from .methods import METHODS, CPOptions, MergedLora, get_method, merge_modules
from .osrm import OSRMReport, osrm_init
from .peft_binding import CPMergeReport, add_cp_weighted_adapter, is_registered, register, unregister

register()

__all__ = [
    "METHODS",
    "CPMergeReport",
    "CPOptions",
    "CPResult",
    "CalibrationReport",
    "LoraCore",
    "LoraStack",
    "MergedLora",
    "OSRMReport",
    "__version__",
    "add_cp_weighted_adapter",
    "calibrate",
    "compress",
    "cp_als",
    "get_method",
    "is_registered",
    "merge_modules",
    "osrm_init",
    "register",
    "unregister",
]

"""The decomposition engine: exact compression of LoRA stacks and batched CP-ALS. Torch only.

Nothing here knows of PEFT, adapter folders or merge methods; everything works on plain tensors
with the batch dimension first (the math: ``docs/design.md`` sections 2 and 3).

- :mod:`.compression`: :class:`LoraStack`, the exact core :func:`compress` / :func:`compress_many`,
  :func:`lift` back to the adapters' space.
- :mod:`.operators`: the dense tensor and the factored core behind one ALS interface.
- :mod:`.starts`: the ALS starts (``gevd``, ``svd``, ``random``).
- :mod:`.als`: :func:`cp_als`, :class:`CPResult`, :func:`canonicalize`.
"""

from .als import CPResult, canonicalize, check_options, cp_als
from .compression import CompressedLora, LoraCore, LoraStack, compress, compress_many, lift
from .starts import INITS

__all__ = [
    "INITS",
    "CPResult",
    "CompressedLora",
    "LoraCore",
    "LoraStack",
    "canonicalize",
    "check_options",
    "compress",
    "compress_many",
    "cp_als",
    "lift",
]

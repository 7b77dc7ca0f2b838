"""The merge methods, one module each, and their registry.

Each method module declares one :class:`~.base.MergeMethod` record named ``METHOD``: its name, a
one-line help, a frozen options dataclass, its default rank and a function that merges many modules
at once. :data:`METHODS` lists them, in the order the command line shows them; the PEFT binding, the
folder merge, the library merge and the command line read nothing else. Adding a method is one new
module here plus its tests (see ``CONTRIBUTING.md``).

Example:
    >>> sorted(METHODS)
    ['cat', 'cp', 'iso_c', 'iso_cts', 'svd', 'tsv']
    >>> get_method("svd").default_rank([8, 4])
    8
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from . import cat, cp, iso_c, iso_cts, svd, tsv
from .base import MergedLora, MergeMethod, NoOptions
from .cp import CPOptions, merge_modules

__all__ = [
    "METHODS",
    "CPOptions",
    "MergeMethod",
    "MergedLora",
    "NoOptions",
    "get_method",
    "merge_modules",
]

METHODS: Mapping[str, MergeMethod] = MappingProxyType(
    {module.METHOD.name: module.METHOD for module in (cp, cat, svd, tsv, iso_c, iso_cts)}
)


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``.

    Raises:
        ValueError: An unknown name; the message lists the known ones.
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown method {name!r}; expected one of {list(METHODS)}") from None

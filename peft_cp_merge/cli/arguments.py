"""Argument types and argument groups shared by the ``peft-cp-merge`` subcommands.

Numbers are checked by argparse (a usage error, exit status 2) and method options are generated
from each registered method's options dataclass, so a new method needs no change here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable

from ..folders.merging import DEFAULT_GROUP_BYTES
from ..methods import METHODS

__all__ = ["add_common", "add_method_options", "finite", "method_options", "positive", "positive_int"]


def number(kind: Callable[[str], float], low: float, *, inclusive: bool = True, what: str):
    """An argparse type: a number of ``kind`` at least ``low`` (or above it), with a clear error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = number(int, 1, what="an integer >= 1")
non_negative = number(float, 0.0, what="a finite number >= 0")
positive = number(float, 0.0, inclusive=False, what="a number > 0")
finite = number(float, -math.inf, what="a finite number")


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where to compute: cpu (default), cuda, or cuda:N")
    parser.add_argument(
        "--allow-different-base",
        action="store_true",
        help="accept adapters whose configs name different base models (a warning instead of an error)",
    )
    parser.add_argument(
        "--group-mb",
        type=positive,
        default=DEFAULT_GROUP_BYTES / 2**20,
        help="MiB of adapter factors read at a time; bounds peak memory (default %(default)g)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")


_OPTION_TYPES = {"int": int, "float": finite, "str": str}


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One argument group per method with options, generated from its options dataclass."""
    seen: set[str] = set()
    for method in METHODS.values():
        fields = [f for f in dataclasses.fields(method.options_type) if f.name not in seen]
        if not fields:
            continue
        group = parser.add_argument_group(
            f"{method.name} options (checked by {method.options_type.__name__})"
        )
        for field in fields:
            seen.add(field.name)
            flag, help_text = f"--{field.name.replace('_', '-')}", field.metadata.get("help", "")
            if str(field.type) == "bool":  # --name / --no-name; None when not given
                group.add_argument(
                    flag,
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help=f"{help_text} (default {'on' if field.default else 'off'})",
                )
                continue
            group.add_argument(
                flag,
                type=_OPTION_TYPES[str(field.type)],
                choices=field.metadata.get("choices"),
                help=f"{help_text} (default {field.default!r})",
            )


def method_options(args: argparse.Namespace) -> dict[str, object]:
    """The method options given on the command line (the others keep their defaults)."""
    names = {f.name for m in METHODS.values() for f in dataclasses.fields(m.options_type)}
    return {name: getattr(args, name) for name in sorted(names) if getattr(args, name, None) is not None}

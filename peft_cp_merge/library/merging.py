"""Merging a finished adapter library into one adapter (the "cp" method by default), in one step."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import LoraConfig

from ..methods import get_method
from .manifest import load_library

__all__ = ["WEIGHTINGS", "LibraryMergeInputs", "library_merge_inputs", "library_weights", "merge_library"]

WEIGHTINGS = ("size", "uniform")


def library_weights(
    sizes: Sequence[int], weights: str | Sequence[float] = "size", *, per_adapter: bool = False
) -> list[float]:
    """Merge weights for clusters of the given sizes.

    ``"size"`` (the default) gives cluster ``i`` the weight ``n_i / n``: the merge is then the
    data-weighted average of the adapters, which to first order is the update that training one
    adapter on all the data would make (its loss is the size-weighted sum of the cluster losses).
    ``"uniform"`` gives every cluster ``1 / k``, favouring rare clusters. The weights sum to 1 in
    both cases, so a library whose adapters agree merges to that common adapter.

    With ``per_adapter=True`` (methods that keep every adapter at its own strength, such as the
    default ``"cp"``: :attr:`.MergeMethod.per_adapter_weights`) the same proportions are scaled to
    average 1 (sum ``k``): ``k n_i / n`` and 1.

    Args:
        sizes: Examples per cluster.
        weights: ``"size"``, ``"uniform"`` or one explicit weight per cluster (used as given).
        per_adapter: Scale the named weightings to mean 1 instead of sum 1.

    Raises:
        ValueError: For an unknown name, or explicit weights of the wrong length or not finite.

    Example:
        >>> library_weights([30, 10])
        [0.75, 0.25]
        >>> library_weights([30, 10], per_adapter=True)
        [1.5, 0.5]
    """
    if isinstance(weights, str):
        if weights not in WEIGHTINGS:
            raise ValueError(
                f"Unknown weights {weights!r}; expected one of {WEIGHTINGS} or one number per cluster."
            )
        scale = len(sizes) if per_adapter else 1
        total = sum(sizes)
        return [scale * (size / total if weights == "size" else 1 / len(sizes)) for size in sizes]
    weights = [float(w) for w in weights]
    if len(weights) != len(sizes) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"Need {len(sizes)} finite weights, one per cluster; got {weights}.")
    return weights


@dataclass(frozen=True)
class LibraryMergeInputs:
    """What merging a library hands to ``merge_adapter_folders``.

    Attributes:
        adapter_dirs: The cluster adapter folders, in cluster order.
        weights: One merge weight per cluster.
        rank: Rank of the merged adapter (None for the "cat" method, which keeps every component).
    """

    adapter_dirs: tuple[Path, ...]
    weights: tuple[float, ...]
    rank: int | None


def library_merge_inputs(
    lib_dir: str | os.PathLike,
    *,
    weights: str | Sequence[float] = "size",
    rank: int | None = None,
    method: str = "cp",
    options: Any = None,
) -> LibraryMergeInputs:
    """Resolves a library into adapter folders, merge weights and a rank.

    Args:
        lib_dir: A complete library written by `build_library`.
        weights: See `library_weights`; named weightings average 1 for methods whose weights are
            per adapter (the default ``"cp"``, ``"tsv"``, ``"iso_c"``, ``"iso_cts"``), else sum to 1.
        rank: Rank of the merged adapter. None: for ``"cp"`` the default of
            ``add_cp_weighted_adapter`` (`peft_cp_merge.methods.cp.default_rank` of the cluster
            adapters' ranks), for ``"svd"`` and ``"tsv"`` the largest cluster adapter rank (PEFT's
            svd default), and no rank for ``"cat"``.
        method: The merge method the inputs are for.
        options: That method's options (as for ``merge_adapter_folders``; ``None``: its defaults).

    Raises:
        FileNotFoundError: If ``lib_dir`` is not a library.
        ValueError: If the library is incomplete, or for bad weights or options.
    """
    merge_method = get_method(method)
    per_adapter = merge_method.per_adapter_weights(merge_method.make_options(options))
    library = load_library(lib_dir)
    if not library.manifest.complete:
        raise ValueError(
            f"The library in {str(lib_dir)!r} is incomplete; run build_library again to finish it."
        )
    merge_weights = library_weights(library.manifest.sizes, weights, per_adapter=per_adapter)
    if rank is None and merge_method.takes_rank:
        configs = [LoraConfig.from_pretrained(str(folder)) for folder in library.adapter_dirs]
        ranks = [max([config.r, *config.rank_pattern.values()]) for config in configs]
        rank = merge_method.default_rank(ranks)
    return LibraryMergeInputs(library.adapter_dirs, tuple(merge_weights), rank)


def merge_library(
    lib_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rank: int | None = None,
    weights: str | Sequence[float] = "size",
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
):
    """Merges every cluster adapter of a library into one adapter folder with the "cp" method.

    Args:
        lib_dir: A complete library written by `build_library`.
        out_dir: The merged adapter folder to write.
        rank: CP rank of the merged adapter; None for the default (`default_rank`: the sum of the
            cluster adapters' ranks).
        weights: See `library_weights`; cluster-size-proportional by default, averaging 1 for the
            default cp options (each cluster adapter at about its own strength) and summing to 1 for
            ``options={"whiten": False, "isotropic": False}`` (the sum-like cp).
        overwrite: Replace an existing ``out_dir``.
        progress: Show a progress bar.
        **options: Passed on to ``peft_cp_merge.folders.merging.merge_adapter_folders`` (e.g.
            ``device``, ``options``).

    Returns:
        The ``MergeResult`` of ``merge_adapter_folders``.

    Raises:
        FileNotFoundError: If ``lib_dir`` is not a library.
        ValueError: If the library is incomplete, or for bad weights or options.

    Example:
        >>> result = merge_library("my_library", "merged_adapter")  # doctest: +SKIP
        >>> result.out_dir  # doctest: +SKIP
        PosixPath('merged_adapter')
    """
    from ..folders.merging import merge_adapter_folders

    inputs = library_merge_inputs(lib_dir, weights=weights, rank=rank, options=options.get("options"))
    return merge_adapter_folders(
        inputs.adapter_dirs,
        out_dir,
        weights=list(inputs.weights),
        method="cp",
        rank=inputs.rank,
        overwrite=overwrite,
        progress=progress,
        **options,
    )

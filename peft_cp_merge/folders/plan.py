"""Checking and planning a merge of PEFT LoRA adapter folders, before any tensor is read.

:func:`plan_merge` opens the folders (config and safetensors header only), checks that they can be
merged into one adapter (same base model, same shapes per module, nothing unsupported, consistent
ranks) and decides every module's output: the :class:`MergePlan` that
:func:`.merge_adapter_folders` carries out and ``--dry-run`` prints.

The merged adapter follows PEFT's ``add_weighted_adapter``: rank ``r = lora_alpha = R`` (scaling 1),
no rsLoRA, no rank or alpha patterns, ``target_modules`` the exact list of modules that any input
adapts, every other config field copied from the first input. In each module the adapters present
enter with PEFT's scaling (``lora_alpha / r`` or ``/ sqrt(r)``, patterns resolved per module).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig

from ..input_checks import check_merge_weights, check_rank_bound
from ..methods import get_method
from .reading import AdapterError, AdapterFolder, FactorShapes, module_sort_key, open_adapter_folder

__all__ = ["MergePlan", "ModulePlan", "plan_merge"]
# Config fields that the merged adapter copies from the first input, so all inputs must agree.
_SHARED_FIELDS = ("fan_in_fan_out", "layer_replication")


@dataclass(frozen=True)
class ModulePlan(FactorShapes):
    """How one module is merged.

    Attributes:
        name: Module name in the base model.
        kind: ``"linear"``, ``"embedding"`` or ``"conv"``.
        adapters: Indices of the input adapters that adapt this module.
        ranks: Their ranks.
        scales: Their PEFT scalings.
        shape_A: File shape of the merged A; ``shape_B`` likewise.
    """

    name: str
    kind: str
    adapters: tuple[int, ...]
    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    shape_A: tuple[int, ...]
    shape_B: tuple[int, ...]
    key_A: str
    key_B: str

    @property
    def out_params(self) -> int:
        return self.rank * (self.d_in + self.d_out)


@dataclass(frozen=True)
class MergePlan:
    """A validated merge: inputs, weights, method, output rank and every module's plan.

    Attributes:
        adapters: The opened input folders.
        weights: One merge weight per adapter.
        method: A registered method name (:data:`peft_cp_merge.methods.METHODS`).
        rank: Rank of the merged adapter (``R``; for ``"cat"`` the largest total rank of a module).
        modules: Module plans in natural name order.
        dtype: dtype of the written factors (the inputs' dtype, promoted if they differ).
    """

    adapters: tuple[AdapterFolder, ...]
    weights: tuple[float, ...]
    method: str
    rank: int
    modules: tuple[ModulePlan, ...]
    dtype: torch.dtype

    @property
    def input_bytes(self) -> int:
        return sum(adapter.nbytes for adapter in self.adapters)

    def merged_config(self) -> LoraConfig:
        """The merged adapter's config, built as PEFT's ``add_weighted_adapter`` builds it."""
        return replace(
            self.adapters[0].config,
            r=self.rank,
            lora_alpha=self.rank,
            target_modules=[m.name for m in self.modules],
            rank_pattern={},
            alpha_pattern={},
            use_rslora=False,
            use_dora=False,
            layers_to_transform=None,
            layers_pattern=None,
            exclude_modules=None,
        )

    def format_table(self) -> str:
        """A plain-text table of the inputs and of what each module becomes."""
        lines = [
            f"Method {self.method}, output rank {self.rank}, dtype {str(self.dtype).removeprefix('torch.')}"
        ]
        for i, (adapter, w) in enumerate(zip(self.adapters, self.weights, strict=True)):
            c = adapter.config
            lines.append(
                f"  [{i}] {adapter.path}  weight {w:g}  r {c.r}  lora_alpha {c.lora_alpha:g}  "
                f"{len(adapter.modules)} modules  {adapter.nbytes / 2**20:.1f} MiB"
            )
        width = max(len(m.name) for m in self.modules)
        lines.append(
            f"{'module':<{width}}  {'kind':<9}  {'d_out x d_in':>13}  {'adapters (ranks)':<24}  params"
        )
        for m in self.modules:
            present = ",".join(f"{a}({r})" for a, r in zip(m.adapters, m.ranks, strict=True))
            shape = f"{m.d_out}x{m.d_in}"
            lines.append(f"{m.name:<{width}}  {m.kind:<9}  {shape:>13}  {present:<24}  {m.out_params:,}")
        total = sum(m.out_params for m in self.modules)
        mib = self.input_bytes / 2**20
        lines.append(f"{len(self.modules)} modules, {total:,} merged parameters, inputs {mib:.1f} MiB")
        return "\n".join(lines)


def _check_inputs(
    adapter_dirs: Sequence[str | os.PathLike], weights: Sequence[float], method: str, rank: int | None
) -> None:
    if len(adapter_dirs) < 2:
        raise ValueError(f"Need at least 2 adapter folders to merge, got {len(adapter_dirs)}")
    resolved = [Path(d).resolve() for d in adapter_dirs]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"The same adapter folder is given twice: {[str(d) for d in adapter_dirs]}")
    check_merge_weights(weights, len(adapter_dirs))
    merge_method = get_method(method)
    if not merge_method.takes_rank and rank is not None:
        raise ValueError(
            f"method {method!r} keeps every component (rank = sum of the ranks); do not pass a rank"
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"method {method!r} needs a positive integer rank, got {rank!r}")


def _check_same_base(adapters: Sequence[AdapterFolder], allow_different_base: bool) -> None:
    bases = [(a.config.base_model_name_or_path, a.config.revision) for a in adapters]
    for adapter, base in zip(adapters[1:], bases[1:], strict=True):
        if base == bases[0]:
            continue
        message = (
            f"Adapters were trained on different base models: {adapters[0].path} on {bases[0][0]!r} "
            f"(revision {bases[0][1]!r}), {adapter.path} on {base[0]!r} (revision {base[1]!r})"
        )
        if not allow_different_base:
            raise AdapterError(
                message + "; pass allow_different_base (--allow-different-base) if they share one"
            )
        warnings.warn(message + "; merging anyway (allow_different_base)", stacklevel=3)
    for field in _SHARED_FIELDS:
        values = [getattr(a.config, field) for a in adapters]
        if any(v != values[0] for v in values):
            by_folder = {str(a.path): v for a, v in zip(adapters, values, strict=True)}
            raise AdapterError(f"Adapters disagree on {field}: {by_folder}")


def _module_plans(
    adapters: Sequence[AdapterFolder], rank: int | None, method: str
) -> tuple[tuple[ModulePlan, ...], int]:
    names = sorted({n for a in adapters for n in a.modules}, key=module_sort_key)
    present = {n: [i for i, a in enumerate(adapters) if n in a.modules] for n in names}
    ranks = {n: [adapters[i].modules[n].rank for i in present[n]] for n in names}
    if rank is None:
        rank = max(get_method(method).default_rank(r) for r in ranks.values())
    check_rank_bound(rank, {n: sum(r) for n, r in ranks.items()})
    out_rank = rank
    plans = []
    for name in names:
        ref_index = present[name][0]
        ref = adapters[ref_index].modules[name]
        for i in present[name][1:]:
            other = adapters[i].modules[name]
            if (other.kind, other.d_out, other.shape_A[1:]) != (ref.kind, ref.d_out, ref.shape_A[1:]):
                raise AdapterError(
                    f"Module {name!r} has different shapes: {adapters[ref_index].path} {ref.kind} "
                    f"A {ref.shape_A} B {ref.shape_B}, {adapters[i].path} {other.kind} "
                    f"A {other.shape_A} B {other.shape_B}"
                )
        ranks = tuple(adapters[i].modules[name].rank for i in present[name])
        for i, r in zip(present[name], ranks, strict=True):
            if adapters[i].config_rank(name) != r:
                raise AdapterError(
                    f"{adapters[i].path}: module {name!r} has rank {r} in the file but "
                    f"{adapters[i].config_rank(name)} in the config"
                )
        shape_A, shape_B = ref.file_shapes(out_rank)
        plans.append(
            ModulePlan(
                name=name,
                kind=ref.kind,
                adapters=tuple(present[name]),
                ranks=ranks,
                scales=tuple(adapters[i].scaling(name) for i in present[name]),
                shape_A=shape_A,
                shape_B=shape_B,
                key_A=ref.key_A,
                key_B=ref.key_B,
            )
        )
    return tuple(plans), out_rank


def plan_merge(
    adapter_dirs: Sequence[str | os.PathLike],
    *,
    weights: Sequence[float],
    rank: int | None = None,
    method: str = "cp",
    allow_different_base: bool = False,
) -> MergePlan:
    """Open and check the input folders and plan the merge, reading no tensor.

    Args:
        adapter_dirs: PEFT LoRA adapter folders (at least 2).
        weights: One merge weight per adapter.
        rank: Rank ``R`` of the merged adapter; ``None`` for the method's default (the largest over
            modules of its ``default_rank``; for ``"cp"`` ``sum r_i``). Must be ``None``
            for ``"cat"``.
        method: A registered method name (:data:`peft_cp_merge.methods.METHODS`).
        allow_different_base: Merge adapters whose configs name different base models (with a
            warning) instead of refusing.

    Returns:
        The :class:`MergePlan`; ``plan.format_table()`` describes it.

    Raises:
        ValueError: Bad arguments: see :mod:`.input_checks` for the weights and the rank bound (a rank
            above every module's total input rank ``sum r_i`` is refused).
        AdapterError: An unreadable or unsupported adapter, different base models, or a module with
            different shapes in two adapters.

    Example:
        >>> plan = plan_merge(["a", "b"], weights=[0.5, 0.5], rank=16)  # doctest: +SKIP
        >>> print(plan.format_table())  # doctest: +SKIP
    """
    _check_inputs(adapter_dirs, weights, method, rank)
    weights = check_merge_weights(weights, len(adapter_dirs))
    adapters = tuple(open_adapter_folder(d) for d in adapter_dirs)
    _check_same_base(adapters, allow_different_base)
    if len({a.config.task_type for a in adapters}) > 1:
        warnings.warn(
            f"Adapters have different task types {[a.config.task_type for a in adapters]}; the merged "
            f"adapter takes the first one's ({adapters[0].config.task_type})",
            stacklevel=2,
        )
    modules, out_rank = _module_plans(adapters, rank, method)
    dtype = adapters[0].dtype
    for adapter in adapters[1:]:
        dtype = torch.promote_types(dtype, adapter.dtype)
    return MergePlan(adapters, tuple(weights), method, out_rank, modules, dtype)

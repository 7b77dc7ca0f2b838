"""What every merge method shares: the merged module, the method record, and small exact helpers.

A merge method is declared by one :class:`MergeMethod` record in its own module (``cp.py``,
``cat.py``, ``svd.py``, ``tsv.py``): its name, a one-line help, a frozen options dataclass validated
in ``__post_init__``, its default rank, and a function that merges many modules at once. The
registry in :mod:`peft_cp_merge.methods` lists them; the PEFT binding, the folder merge, the library
merge, ``analyze`` and the command line all read it (``docs/design.md`` section 4 and 5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..engine.compression import LoraCore, LoraStack

__all__ = ["MergeMethod", "MergedLora", "NoOptions", "pad_rank", "stack_weights", "weighted_sum_error"]


@dataclass(frozen=True)
class MergedLora:
    """One module's merged adapter: ``delta = lora_B @ lora_A`` (scaling 1).

    Attributes:
        lora_A: ``(R, d_in)``.
        lora_B: ``(d_out, R)``.
        rel_error: The one meaning of "relative error" for every method:
            ``||delta - sum_i w_i dW_i||_F / ||sum_i w_i dW_i||_F``, the distance of the merged delta
            to the exact weighted sum (PEFT's ``"cat"``). 0 for ``"cat"``; for methods that rescale
            on purpose (TSV, disjoint CP) it says how far they moved from the plain sum.
        fit_error: The method's own fit: the CP fit ``||T - T_hat|| / ||T||`` of the stacked deltas
            for ``"cp"``, the share of the merged delta dropped by the rank truncation for ``"svd"``
            and ``"tsv"``, 0 for ``"cat"``; ``None`` where a method fits nothing.
        n_iter: ALS sweeps run (``"cp"`` only).
        converged: Whether the ALS met its tolerance before ``n_iter_max`` (``"cp"`` only).
        rank: Components fitted for this module before zero padding (``"cp"`` only; below the
            adapter's rank where the module has fewer inputs or ``rank_tol`` chose fewer).
    """

    lora_A: Tensor
    lora_B: Tensor
    rel_error: float | None = None
    fit_error: float | None = None
    n_iter: int | None = None
    converged: bool | None = None
    rank: int | None = None


@dataclass(frozen=True)
class NoOptions:
    """Options of a method that has none."""


# merge(stacks, weights, *, rank, options, device, progress) -> {module: MergedLora}
MergeFn = Callable[..., dict[str, MergedLora]]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as the registry knows it.

    Attributes:
        name: The ``combination_type`` / ``--method`` name.
        help: One line for ``--help`` and the docs.
        options_type: Frozen dataclass of the method's options, validated in ``__post_init__``;
            each field's ``metadata["help"]`` (and ``metadata["choices"]``) feeds the command line.
        default_rank: Module input ranks ``r_i`` -> the default output rank.
        takes_rank: Whether a rank may be given (``"cat"`` keeps every component: no).
        merge: ``merge(stacks, weights, *, rank, options, device=None, progress=False)`` with
            ``stacks``: module name -> one-module :class:`~.engine.compression.LoraStack`,
            ``weights``: module name -> that module's merge weights; returns module name ->
            :class:`MergedLora` of rank exactly ``rank`` (zero-padded where a module has less).
        per_adapter_weights: Options -> whether a weight of 1 keeps an adapter at its own strength
            (each adapter's directions kept, as in task arithmetic), so that natural weights are about
            1 each. ``False`` (the default): the merge is a weighted sum, natural weights sum to 1
            (an average). Default weights that the package chooses (a library's cluster sizes)
            follow it.
    """

    name: str
    help: str
    options_type: type
    default_rank: Callable[[Sequence[int]], int]
    takes_rank: bool
    merge: MergeFn
    per_adapter_weights: Callable[[Any], bool] = lambda options: False

    def make_options(self, options: Any = None) -> Any:
        """The method's options from ``None``, a mapping of field values, or an options object.

        Raises:
            ValueError: Unknown option names or a bad value (from the dataclass's own check).
        """
        if options is None:
            return self.options_type()
        if isinstance(options, self.options_type):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(
                f"Options of method {self.name!r} must be a {self.options_type.__name__} or a mapping, "
                f"got {type(options).__name__}"
            )
        known = [f.name for f in dataclasses.fields(self.options_type)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for method {self.name!r}; expected some of {known}"
            )
        return self.options_type(**options)


def stack_weights(stacks: Mapping[str, LoraStack], weights: Mapping[str, Sequence[float] | Tensor]) -> dict:
    """Check one-module stacks against their merge weights; return the weights as float64 tensors.

    Raises:
        ValueError: ``weights`` not a mapping over the same modules, a stack of batch size other than
            1, or a module whose weight count differs from its adapter count.
    """
    if not isinstance(stacks, Mapping) or not isinstance(weights, Mapping):
        raise ValueError(
            "stacks and weights must both be mappings from module name to a LoraStack / its merge weights, "
            f"got {type(stacks).__name__} and {type(weights).__name__}"
        )
    if set(stacks) != set(weights):
        raise ValueError(f"stacks and weights name different modules: {sorted(set(stacks) ^ set(weights))}")
    out = {}
    for name, stack in stacks.items():
        if stack.shape[0] != 1:
            raise ValueError(f"Module {name!r}: expected a stack of batch size 1, got {stack.shape[0]}")
        w = torch.as_tensor(weights[name], dtype=torch.float64).flatten()
        if w.numel() != stack.shape[3]:
            raise ValueError(f"Module {name!r}: {w.numel()} weights for {stack.shape[3]} adapters")
        out[name] = w
    return out


def pad_rank(merged: MergedLora, rank: int) -> MergedLora:
    """Zero-pad a merged module to ``rank`` components (exact: the extra components are zero)."""
    missing = rank - merged.lora_A.shape[0]
    if missing <= 0:
        return merged
    lora_A = torch.cat([merged.lora_A, merged.lora_A.new_zeros(missing, merged.lora_A.shape[1])])
    lora_B = torch.cat([merged.lora_B, merged.lora_B.new_zeros(merged.lora_B.shape[0], missing)], dim=1)
    return dataclasses.replace(merged, lora_A=lora_A, lora_B=lora_B)


def weighted_sum_error(delta_core: Tensor, core: LoraCore, merge_weights: Tensor) -> Tensor:
    """``||delta - sum_i w_i dW_i||_F / ||sum_i w_i dW_i||_F`` from core coordinates, batched.

    With orthonormal core bases the distance in core coordinates is the distance of the full
    ``d_out x d_in`` matrices, so this is exact without forming them.

    Args:
        delta_core: ``(batch, M, M)`` merged deltas in core coordinates (``Q_B^T delta Q_A``).
        core: The compressed core of the stacks.
        merge_weights: ``w`` ``(batch, N)``.

    Returns:
        ``(batch,)`` float64 relative distances (the absolute one where the weighted sum is zero).
    """
    left, right = core.left.to(torch.float64), core.right.to(torch.float64)
    ranks = torch.tensor(core.ranks, device=left.device)
    column_weights = torch.repeat_interleave(merge_weights.to(left), ranks, dim=1)
    target = (left * column_weights[:, None, :]) @ right.mT
    norm = torch.linalg.matrix_norm(target)
    distance = torch.linalg.matrix_norm(delta_core.to(target) - target)
    return torch.where(norm > 0, distance / torch.where(norm > 0, norm, 1.0), distance)

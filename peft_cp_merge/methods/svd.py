"""``"svd"``: the weighted sum ``sum_i w_i dW_i`` truncated to rank ``R`` by its SVD (PEFT's ``"svd"``).

Computed exactly in the compressed core (:mod:`.core_space`); ``rel_error`` is the truncation error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.compression import LoraStack, compress
from .base import MergedLora, MergeMethod, NoOptions
from .core_space import check_rank, core_slices, module_weights, per_module, truncated

__all__ = ["METHOD", "merge_svd"]


@torch.no_grad()
def merge_svd(stack: LoraStack, weights: Sequence[float] | Tensor, *, rank: int) -> MergedLora:
    """The weighted sum ``sum_i w_i dW_i`` truncated to rank ``rank`` by its SVD (PEFT's ``"svd"``).

    Args:
        stack: One module's adapters (batch size 1).
        weights: ``(N,)`` merge weights.
        rank: Rank of the result; above the sum's rank the factors are padded with zeros.

    Returns:
        :class:`.MergedLora` with ``lora_B = U_R S_R^(1/2)``, ``lora_A = S_R^(1/2) V_R^T``.

    Example:
        >>> stack = LoraStack([torch.randn(1, 2, 5)] * 2, [torch.randn(1, 3, 2)] * 2, [1.0, 1.0])
        >>> merge_svd(stack, [0.5, 0.5], rank=2).lora_B.shape
        torch.Size([3, 2])
    """
    check_rank(rank)
    w = module_weights(stack, weights)
    compressed = compress(stack)
    delta = torch.einsum("n,nij->ij", w.to(compressed.core.left), core_slices(compressed.core)[0])
    return truncated(stack, compressed, delta, rank, w)


METHOD = MergeMethod(
    name="svd",
    help="the weighted sum truncated to rank R by its SVD (PEFT's svd; default R = max r)",
    options_type=NoOptions,
    default_rank=max,
    takes_rank=True,
    merge=per_module(merge_svd),
)

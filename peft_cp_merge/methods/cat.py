"""``"cat"``: the exact weighted sum ``sum_i w_i dW_i`` as one LoRA of rank ``M = sum_i r_i``.

PEFT's ``"cat"``: the factors are concatenated, no decomposition at all. Every module is zero-padded
to the largest ``M`` of any module (exact: the extra components are zero).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.compression import LoraStack
from .base import MergedLora, MergeMethod, NoOptions
from .core_space import module_weights, per_module

__all__ = ["METHOD", "merge_cat"]


@torch.no_grad()
def merge_cat(stack: LoraStack, weights: Sequence[float] | Tensor) -> MergedLora:
    """The exact weighted sum ``sum_i w_i s_i B_i A_i`` as one LoRA of rank ``M = sum_i r_i``.

    Args:
        stack: One module's adapters (batch size 1), scalings in ``stack.scales``.
        weights: ``(N,)`` merge weights.

    Returns:
        ``lora_A = [w_1 s_1 A_1; ...]`` ``(M, d_in)``, ``lora_B = [B_1 ... B_N]`` ``(d_out, M)``, exactly
        as PEFT's ``"cat"``.

    Example:
        >>> stack = LoraStack([torch.randn(1, 2, 5)] * 2, [torch.randn(1, 3, 2)] * 2, [1.0, 1.0])
        >>> merge_cat(stack, [0.5, 0.5]).lora_A.shape
        torch.Size([4, 5])
    """
    w = module_weights(stack, weights)
    factors = (w * stack.scales[0].to(w)).tolist()
    lora_A = torch.cat([f * a[0] for f, a in zip(factors, stack.lora_A, strict=True)])
    return MergedLora(lora_A=lora_A, lora_B=stack.cat_B()[0], rel_error=0.0, fit_error=0.0)


METHOD = MergeMethod(
    name="cat",
    help="the exact weighted sum, rank = the largest sum of the adapters' ranks (no --rank)",
    options_type=NoOptions,
    default_rank=sum,
    takes_rank=False,
    merge=per_module(merge_cat, takes_rank=False),
)

"""``"tsv"``: Task Singular Vectors merging (TSV-Merge), computed in the compressed core.

Per adapter SVD ``G_i = U_i S_i V_i^T`` (all components: a LoRA's rank is already low),
``U = [U_1 ... U_N]`` and ``V = [V_1 ... V_N]`` replaced by their polar factors (the nearest matrices
with orthonormal columns), ``dW = U_perp diag(w_1 S_1, ..., w_N S_N) V_perp^T``, then truncated to
rank ``R`` by its SVD. The paper's global scale ``alpha`` is the merge weights' job here: with
adapters in mutually orthogonal subspaces ``U_perp = U`` and the result is the weighted sum. An
adapter with weight 0 is left out of the polar factors, so it changes nothing.

Reference:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.compression import LoraStack, compress
from .base import MergedLora, MergeMethod, NoOptions
from .core_space import check_rank, core_slices, module_weights, per_module, polar, task_svd, truncated

__all__ = ["METHOD", "merge_tsv"]


@torch.no_grad()
def merge_tsv(stack: LoraStack, weights: Sequence[float] | Tensor, *, rank: int) -> MergedLora:
    """Task Singular Vectors merge (see the module docstring), truncated to rank ``rank``.

    Args:
        stack: One module's adapters (batch size 1).
        weights: ``(N,)`` merge weights; they scale each adapter's singular values.
        rank: Rank of the result; above the merged delta's rank the factors are padded with zeros.

    Returns:
        :class:`.MergedLora`.

    Example:
        >>> stack = LoraStack([torch.randn(1, 2, 5)] * 2, [torch.randn(1, 3, 2)] * 2, [1.0, 1.0])
        >>> merge_tsv(stack, [1.0, 1.0], rank=3).lora_A.shape
        torch.Size([3, 5])
    """
    check_rank(rank)
    w = module_weights(stack, weights)
    compressed = compress(stack)
    svd = task_svd(core_slices(compressed.core)[0])
    sigma = w.to(svd.S)[svd.owner] * svd.S
    used = sigma != 0  # an adapter with weight 0 does not turn the others' directions
    delta = (polar(svd.U[:, used]) * sigma[used]) @ polar(svd.V[:, used]).T
    return truncated(stack, compressed, delta, rank, w)


METHOD = MergeMethod(
    name="tsv",
    help="Task Singular Vectors merge (decorrelated per-adapter SVDs), truncated to rank R (default max r)",
    options_type=NoOptions,
    default_rank=max,
    takes_rank=True,
    merge=per_module(merge_tsv),
    per_adapter_weights=lambda options: True,
)

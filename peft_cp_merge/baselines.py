"""Exact reference merges of one module's LoRA adapters, computed in the compressed core space.

With ``dW_i = Q_B G_i Q_A^T`` (:mod:`.compression`), where ``Q_B`` and ``Q_A`` have orthonormal
columns, every inner product, norm and SVD of a linear combination of the ``dW_i`` is that of the
same combination of the ``M x M`` core slices ``G_i``. So these merges never form a
``d_out x d_in`` matrix:

- :func:`merge_cat`: PEFT's ``"cat"``, the exact weighted sum ``sum_i w_i dW_i`` of rank
  ``M = sum_i r_i`` (factors concatenated; no decomposition at all).
- :func:`merge_svd`: PEFT's ``"svd"``, the weighted sum truncated to rank ``R`` by its SVD.
- :func:`merge_tsv`: Task Singular Vectors merging (TSV-Merge): per adapter SVD
  ``G_i = U_i S_i V_i^T`` (all components: a LoRA's rank is already low), ``U = [U_1 ... U_N]`` and
  ``V = [V_1 ... V_N]`` replaced by their polar factors (the nearest matrices with orthonormal
  columns), ``dW = U_perp diag(w_1 S_1, ..., w_N S_N) V_perp^T``, then truncated to rank ``R`` by
  its SVD. The paper's global scale ``alpha`` is the merge weights' job here: with adapters in
  mutually orthogonal subspaces ``U_perp = U`` and the result is the weighted sum.

Each returns a :class:`~.merge.MergedLora` with scaling 1: ``rel_error`` is the relative distance to
the exact weighted sum (0 for ``cat``, the truncation error for ``svd``), ``fit_error`` the relative
Frobenius norm dropped by the rank truncation (0 for ``cat``).

References:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
    Panariello et al., "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .compression import CompressedLora, LoraCore, LoraStack, compress, lift
from .merge import MergedLora, weighted_sum_error

__all__ = ["TaskSVD", "core_slices", "merge_cat", "merge_svd", "merge_tsv", "polar", "task_svd"]


@dataclass(frozen=True)
class TaskSVD:
    """The adapters' singular vectors in core coordinates, concatenated (one module).

    Attributes:
        U: ``(M, K)`` left singular vectors of every ``G_i``, adapter after adapter.
        S: ``(K,)`` their singular values.
        V: ``(M, K)`` right singular vectors.
        owner: ``(K,)`` the adapter each component comes from.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    owner: Tensor


def core_slices(core: LoraCore) -> Tensor:
    """The core's frontal slices ``G_i = left[:, blk_i] @ right[:, blk_i]^T``: ``(batch, N, M, M)``."""
    left = core.left.split(core.ranks, dim=2)
    right = core.right.split(core.ranks, dim=2)
    return torch.stack([lb @ rb.mT for lb, rb in zip(left, right, strict=True)], dim=1)


def task_svd(slices: Tensor) -> TaskSVD:
    """SVD of each slice ``G_i`` (``slices``: ``(N, M, M)``), keeping the non-zero components.

    Components with a singular value below ``M * eps`` times the largest of all slices are dropped:
    their singular vectors are arbitrary and would only add noise to the polar factors.
    """
    u, s, vh = torch.linalg.svd(slices)
    keep = s > slices.shape[-1] * torch.finfo(s.dtype).eps * s.max().clamp_min(torch.finfo(s.dtype).tiny)
    owner = torch.arange(slices.shape[0], device=s.device)[:, None].expand_as(s)
    return TaskSVD(U=u.mT[keep].T, S=s[keep], V=vh[keep].T, owner=owner[keep])


def polar(x: Tensor) -> Tensor:
    """The polar factor ``P Q^T`` of ``x = P D Q^T``: the nearest matrix with orthonormal columns.

    When ``x`` is rank-deficient (adapters that share directions) the polar factor is not unique;
    this returns the canonical one, the partial isometry on the range of ``x`` (singular values below
    ``max(x.shape) * eps`` times the largest are dropped), so two identical adapters merge to their
    mean weight instead of picking up arbitrary directions.
    """
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    keep = s > max(x.shape) * torch.finfo(s.dtype).eps * s.max()
    return p[:, keep] @ qh[keep]


def _merge_weights(stack: LoraStack, weights: Sequence[float] | Tensor) -> Tensor:
    """Check that ``stack`` is one module and return the weights as a float64 ``(N,)`` tensor."""
    if stack.shape[0] != 1:
        raise ValueError(f"Expected a stack of batch size 1 (one module), got {stack.shape[0]}")
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != stack.shape[3]:
        raise ValueError(f"{w.numel()} weights for {stack.shape[3]} adapters")
    return w


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")


def _truncated(
    stack: LoraStack, compressed: CompressedLora, delta: Tensor, rank: int, weights: Tensor
) -> MergedLora:
    """Rank-``rank`` SVD truncation of the core-space delta ``(M, M)``, lifted to ``lora_A``/``lora_B``."""
    u, s, vh = torch.linalg.svd(delta)
    kept = min(rank, s.numel())
    rel_error = float(
        weighted_sum_error(((u[:, :kept] * s[:kept]) @ vh[:kept])[None], compressed.core, weights[None])[0]
    )
    root = s[:kept].sqrt()
    out_dtype = stack.lora_A[0].dtype
    lora_B = lift((u[:, :kept] * root)[None], stack.cat_B(), compressed.basis_B, out_dtype=out_dtype)[0]
    lora_A = lift((vh[:kept].mT * root)[None], stack.cat_A().mT, compressed.basis_A, out_dtype=out_dtype)[0].T
    if kept < rank:
        lora_A = torch.cat([lora_A, lora_A.new_zeros(rank - kept, lora_A.shape[1])])
        lora_B = torch.cat([lora_B, lora_B.new_zeros(lora_B.shape[0], rank - kept)], dim=1)
    total = s.square().sum()
    fit_error = float((s[kept:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return MergedLora(lora_A=lora_A, lora_B=lora_B, rel_error=rel_error, fit_error=fit_error)


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
    w = _merge_weights(stack, weights)
    factors = (w * stack.scales[0].to(w)).tolist()
    lora_A = torch.cat([f * a[0] for f, a in zip(factors, stack.lora_A, strict=True)])
    return MergedLora(lora_A=lora_A, lora_B=stack.cat_B()[0], rel_error=0.0, fit_error=0.0)


@torch.no_grad()
def merge_svd(stack: LoraStack, weights: Sequence[float] | Tensor, *, rank: int) -> MergedLora:
    """The weighted sum ``sum_i w_i dW_i`` truncated to rank ``rank`` by its SVD (PEFT's ``"svd"``).

    Args:
        stack: One module's adapters (batch size 1).
        weights: ``(N,)`` merge weights.
        rank: Rank of the result; above the sum's rank the factors are padded with zeros.

    Returns:
        :class:`~.merge.MergedLora` with ``lora_B = U_R S_R^(1/2)``, ``lora_A = S_R^(1/2) V_R^T``.

    Example:
        >>> stack = LoraStack([torch.randn(1, 2, 5)] * 2, [torch.randn(1, 3, 2)] * 2, [1.0, 1.0])
        >>> merge_svd(stack, [0.5, 0.5], rank=2).lora_B.shape
        torch.Size([3, 2])
    """
    _check_rank(rank)
    w = _merge_weights(stack, weights)
    compressed = compress(stack)
    delta = torch.einsum("n,nij->ij", w.to(compressed.core.left), core_slices(compressed.core)[0])
    return _truncated(stack, compressed, delta, rank, w)


@torch.no_grad()
def merge_tsv(stack: LoraStack, weights: Sequence[float] | Tensor, *, rank: int) -> MergedLora:
    """Task Singular Vectors merge (see the module docstring), truncated to rank ``rank``.

    Args:
        stack: One module's adapters (batch size 1).
        weights: ``(N,)`` merge weights; they scale each adapter's singular values.
        rank: Rank of the result; above the merged delta's rank the factors are padded with zeros.

    Returns:
        :class:`~.merge.MergedLora`.

    Example:
        >>> stack = LoraStack([torch.randn(1, 2, 5)] * 2, [torch.randn(1, 3, 2)] * 2, [1.0, 1.0])
        >>> merge_tsv(stack, [1.0, 1.0], rank=3).lora_A.shape
        torch.Size([3, 5])
    """
    _check_rank(rank)
    w = _merge_weights(stack, weights)
    compressed = compress(stack)
    svd = task_svd(core_slices(compressed.core)[0])
    sigma = w.to(svd.S)[svd.owner] * svd.S
    delta = (polar(svd.U) * sigma) @ polar(svd.V).T
    return _truncated(stack, compressed, delta, rank, w)

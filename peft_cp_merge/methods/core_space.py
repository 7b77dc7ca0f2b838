"""The compressed core space that the ``cat``, ``svd`` and ``tsv`` merges (and ``analyze``) work in.

With ``dW_i = Q_B G_i Q_A^T`` (:mod:`.compression`), where ``Q_B`` and ``Q_A``
have orthonormal columns, every inner product, norm and SVD of a linear combination of the ``dW_i``
is that of the same combination of the ``M x M`` core slices ``G_i``. So merges written here never
form a ``d_out x d_in`` matrix (``docs/design.md`` sections 2 and 5): :func:`core_slices`, the
per-adapter SVDs :func:`task_svd`, the polar factor :func:`polar`, and :func:`truncated`, the
rank-``R`` SVD truncation of a core-space delta lifted back to LoRA factors.

References:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
    Panariello et al., "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..engine.compression import CompressedLora, LoraCore, LoraStack, lift
from .base import MergedLora, pad_rank, stack_weights, weighted_sum_error

__all__ = [
    "TaskSVD",
    "check_rank",
    "core_slices",
    "module_weights",
    "per_module",
    "polar",
    "task_svd",
    "truncated",
]


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
    mean weight instead of picking up arbitrary directions. Leading batch dimensions are allowed
    (``(..., M, K)``), each matrix with its own cutoff.
    """
    if x.shape[-1] == 0 or x.shape[-2] == 0:  # no columns (e.g. every adapter at weight 0): nothing
        return x.clone()
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    keep = s > max(x.shape[-2:]) * torch.finfo(s.dtype).eps * s.amax(dim=-1, keepdim=True)
    return (p * keep[..., None, :].to(p.dtype)) @ qh


def module_weights(stack: LoraStack, weights: Sequence[float] | Tensor) -> Tensor:
    """Check that ``stack`` is one module and return the weights as a float64 ``(N,)`` tensor."""
    if stack.shape[0] != 1:
        raise ValueError(f"Expected a stack of batch size 1 (one module), got {stack.shape[0]}")
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != stack.shape[3]:
        raise ValueError(f"{w.numel()} weights for {stack.shape[3]} adapters")
    return w


def check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")


def truncated(
    stack: LoraStack, compressed: CompressedLora, delta: Tensor, rank: int, weights: Tensor
) -> MergedLora:
    """Rank-``rank`` SVD truncation of the core-space delta ``(M, M)``, lifted to ``lora_A``/``lora_B``.

    ``rel_error`` is the distance to the weighted sum with ``weights``; ``fit_error`` the share of
    ``delta`` dropped by the truncation. Zero-padded to ``rank`` where ``delta`` has fewer components.
    """
    u, s, vh = torch.linalg.svd(delta)
    kept = min(rank, s.numel())
    rel_error = float(
        weighted_sum_error(((u[:, :kept] * s[:kept]) @ vh[:kept])[None], compressed.core, weights[None])[0]
    )
    root = s[:kept].sqrt()
    out_dtype = stack.lora_A[0].dtype
    lora_B = lift((u[:, :kept] * root)[None], stack.cat_B(), compressed.basis_B, out_dtype=out_dtype)[0]
    lora_A = lift((vh[:kept].mT * root)[None], stack.cat_A().mT, compressed.basis_A, out_dtype=out_dtype)[0].T
    total = s.square().sum()
    fit_error = float((s[kept:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return pad_rank(MergedLora(lora_A=lora_A, lora_B=lora_B, rel_error=rel_error, fit_error=fit_error), rank)


def per_module(merge_one: Callable[..., MergedLora], *, takes_rank: bool = True):
    """A registry ``merge`` function from a one-module merge ``merge_one(stack, weights[, rank=])``.

    Modules are merged one by one (on ``device`` if given, results back where each stack lives) and
    zero-padded to ``rank``.
    """

    def merge(
        stacks: Mapping[str, LoraStack],
        weights: Mapping[str, Sequence[float] | Tensor],
        *,
        rank: int,
        options: object = None,
        device: torch.device | str | None = None,
        progress: bool | None = False,
    ) -> dict[str, MergedLora]:
        stack_weights(stacks, weights)
        out = {}
        for name, stack in stacks.items():
            home = stack.lora_A[0].device
            work = stack if device is None else stack.to(device)
            merged = (
                merge_one(work, weights[name], rank=rank) if takes_rank else merge_one(work, weights[name])
            )
            merged = pad_rank(merged, rank)
            out[name] = MergedLora(
                lora_A=merged.lora_A.to(home),
                lora_B=merged.lora_B.to(home),
                rel_error=merged.rel_error,
                fit_error=merged.fit_error,
            )
        return out

    return merge

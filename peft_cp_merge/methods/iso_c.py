"""``"iso_c"``: Isotropic merging in the common subspace (Iso-C), computed in the compressed core.

Task arithmetic in core coordinates, ``S = sum_i w_i G_i`` (``M x M``), has the SVD
``S = U diag(sigma) V^T``. Iso-C keeps the singular vectors and flattens the spectrum:

    dW = sigma_bar U_R V_R^T,    sigma_bar = (sigma_1 + ... + sigma_R) / R

over the ``R`` largest non-zero singular values of ``S`` (``R`` = the rank asked for, or fewer where
``S`` has fewer non-zero ones). Every kept direction gets the same singular value: directions that
the sum under-represents (the tasks that lose to the dominant ones) are lifted to the mean, the
dominant ones lowered to it, and the nuclear norm ``sum sigma`` of the kept part is preserved.

**Source.** Marczak et al. (ICML 2025), Iso-C; the authors' code (``github.com/danielm1405/iso-merging``,
``src/utils/iso.py``, ``iso_c``) sums the task vectors, takes ``U, S, V = svd(sum)`` and returns
``U diag(mean(S)) V``, then adds it to the base model times a global ``alpha``. Deviations, all
forced by LoRA inputs or by a rank:

- The mean runs over the *non-zero* spectrum. The authors average all ``min(d_out, d_in)`` singular
  values of a full fine-tuning delta, all non-zero there; a sum of LoRA deltas has rank at most
  ``M = sum r_i``, and its exact zeros would shrink the mean by ``M / min(d_out, d_in)`` while their
  arbitrary singular vectors entered the result at full weight. Values at or below
  ``1e3 * M * eps`` times the largest weighted adapter delta's norm (the constant of ``compress``'s ``rcond``)
  count as zero: the isotropic step would raise a rounding-level direction to the mean, and a sum
  whose adapters cancel is the zero delta, not its rounding errors flattened.
- ``rank R`` keeps the ``R`` largest components before flattening, so the result is Iso-C of PEFT's
  ``"svd"`` merge at rank ``R``. At the default ``R = M`` (``default_rank=sum``) nothing is
  truncated and this is exactly the paper's Iso-C. ``iso_cts`` with ``common_space_fraction=1``
  equals this at every rank.
- The paper's ``alpha`` is the merge weights' job: weights ``w_i = lam`` for all ``i`` give
  ``lam`` times the paper's Iso-C of the plain sum (``Iso-C(lam S) = lam Iso-C(S)`` for any real
  ``lam``); other weights scale each adapter's contribution to ``S`` before the SVD.

**Default rank: ``sum r_i``** (the largest rank a module's sum can have). Truncating first would
drop exactly the weak directions of the sum that Iso-C exists to lift; ``max r_i`` (the ``svd`` and
``tsv`` default) would keep only the dominant tasks' share of the spectrum.

Reference:
    Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind: Isotropic
    Model Merging with Common and Task-Specific Subspaces", ICML 2025 (arXiv:2502.04959).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.compression import CompressedLora, LoraStack, compress, lift
from .base import MergedLora, MergeMethod, NoOptions, pad_rank, weighted_sum_error
from .core_space import check_rank, core_slices, module_weights, per_module

__all__ = ["METHOD", "lift_components", "merge_iso_c", "nonzero", "share_outside"]

ZERO_RTOL = 1e3
"""Singular values at or below ``ZERO_RTOL * M * eps`` times their reference count as zero."""


def nonzero(s: Tensor, reference: Tensor, m: int) -> Tensor:
    """Mask of the singular values ``s`` above ``ZERO_RTOL * m * eps`` times ``reference`` (float64).

    ``reference`` broadcasts against ``s``: the norm of what was summed or projected to make the
    matrix (its rounding errors scale with it); with a zero reference nothing is kept.
    """
    return s > ZERO_RTOL * m * torch.finfo(s.dtype).eps * reference


def share_outside(total: Tensor, u: Tensor, v: Tensor) -> float:
    """``||S - P_u S P_v||_F / ||S||_F``: the share of ``total`` outside the spans of ``u`` and ``v``.

    ``u``, ``v``: ``(M, K)`` with orthonormal columns (or partial isometries), so ``u u^T`` and
    ``v v^T`` are orthogonal projectors. 0 for a zero ``total``.
    """
    norm = torch.linalg.matrix_norm(total)
    if norm == 0:
        return 0.0
    inside = (u @ (u.T @ total @ v)) @ v.T
    return float(torch.linalg.matrix_norm(total - inside) / norm)


def lift_components(
    stack: LoraStack,
    compressed: CompressedLora,
    u: Tensor,
    sigma: Tensor,
    v: Tensor,
    *,
    rank: int,
    weights: Tensor,
    fit_error: float,
) -> MergedLora:
    """The core-space delta ``u diag(sigma) v^T`` lifted to LoRA factors, zero-padded to ``rank``.

    Args:
        stack: The module's adapters (batch size 1).
        compressed: ``compress(stack)``.
        u: ``(M, K)`` left directions in core coordinates, ``K <= rank``.
        sigma: ``(K,)`` non-negative gains.
        v: ``(M, K)`` right directions.
        rank: Rank of the result.
        weights: ``(N,)`` merge weights (for ``rel_error``).
        fit_error: The method's own fit, stored as is.

    Returns:
        :class:`.MergedLora` with ``lora_B = Q_B u diag(sigma)^(1/2)``,
        ``lora_A = diag(sigma)^(1/2) v^T Q_A^T`` in the inputs' dtype.
    """
    rel_error = float(weighted_sum_error(((u * sigma) @ v.T)[None], compressed.core, weights[None])[0])
    root = sigma.sqrt()
    out_dtype = stack.lora_A[0].dtype
    lora_B = lift((u * root)[None], stack.cat_B(), compressed.basis_B, out_dtype=out_dtype)[0]
    lora_A = lift((v * root)[None], stack.cat_A().mT, compressed.basis_A, out_dtype=out_dtype)[0].T
    return pad_rank(MergedLora(lora_A=lora_A, lora_B=lora_B, rel_error=rel_error, fit_error=fit_error), rank)


@torch.no_grad()
def merge_iso_c(stack: LoraStack, weights: Sequence[float] | Tensor, *, rank: int) -> MergedLora:
    """Iso-C (see the module docstring): the weighted sum's top ``rank`` directions, flat spectrum.

    Args:
        stack: One module's adapters (batch size 1).
        weights: ``(N,)`` merge weights; they scale each adapter's delta in the sum before the SVD.
        rank: Directions kept; above the sum's rank the factors are padded with zeros.

    Returns:
        :class:`.MergedLora` whose non-zero singular values all equal ``sigma_bar``; ``fit_error`` is
        the share of the weighted sum dropped by the rank truncation (before flattening), 0 at the
        default rank.

    Example:
        >>> A = [torch.randn(1, 2, 5), torch.randn(1, 2, 5)]
        >>> B = [torch.randn(1, 6, 2), torch.randn(1, 6, 2)]
        >>> merged = merge_iso_c(LoraStack(A, B, [1.0, 1.0]), [1.0, 1.0], rank=4)
        >>> merged.lora_A.shape
        torch.Size([4, 5])
        >>> s = torch.linalg.svdvals(merged.lora_B @ merged.lora_A)  # flat: 4 equal singular values
        >>> print(f"{s[0] / s[3]:.4f}")
        1.0000
    """
    check_rank(rank)
    w = module_weights(stack, weights)
    compressed = compress(stack)
    tasks = core_slices(compressed.core)[0]
    tasks = w.to(tasks)[:, None, None] * tasks  # (N, M, M): w_i G_i
    total = tasks.sum(dim=0)
    u, s, vh = torch.linalg.svd(total)
    scale = torch.linalg.matrix_norm(tasks).max()
    kept = int(nonzero(s[:rank], scale, total.shape[-1]).sum())  # s is sorted: the non-zero ones lead
    u, v = u[:, :kept], vh[:kept].T
    sigma = s[:kept].mean().expand(kept) if kept else s[:0]
    return lift_components(
        stack, compressed, u, sigma, v, rank=rank, weights=w, fit_error=share_outside(total, u, v)
    )


METHOD = MergeMethod(
    name="iso_c",
    help="Iso-C: the weighted sum's top R singular directions with a flat spectrum (default R = sum r)",
    options_type=NoOptions,
    default_rank=sum,
    takes_rank=True,
    merge=per_module(merge_iso_c),
    per_adapter_weights=lambda options: True,
)

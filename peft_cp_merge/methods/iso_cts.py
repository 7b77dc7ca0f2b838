"""``"iso_cts"``: Isotropic merging in common and task-specific subspaces (Iso-CTS), in the core.

With ``S = sum_i w_i G_i`` (task arithmetic in core coordinates) and a budget of ``R`` directions
split into ``k`` common ones and ``s`` per adapter (:func:`subspace_sizes`):

1. Common subspace: the top ``k`` singular triplets ``(U_c, sigma_c, V_c)`` of ``S``.
2. Task-specific subspaces: each weighted delta projected off the common output directions,
   ``(I - U_c U_c^T) w_i G_i``, and its top ``s`` singular triplets ``(U_i, sigma_i, V_i)``.
3. ``U = [U_c, U_1, ..., U_N]`` and ``V = [V_c, V_1, ..., V_N]`` replaced by their polar factors
   (:func:`orthonormal_factor`, the nearest matrices with orthonormal columns, as TSV does).
4. ``dW = sigma_bar U_perp V_perp^T`` with ``sigma_bar`` the mean of all kept singular values
   ``[sigma_c, sigma_1, ..., sigma_N]``: one isotropic value for every direction.

Only non-zero singular triplets are kept (see :func:`.iso_c.nonzero`): an adapter whose residual off
the common subspace is zero adds no direction. An adapter of weight 0 is left out entirely (``N``
counts the others), so the result is the merge of the remaining adapters.

**Source.** Marczak et al. (ICML 2025), Iso-CTS, following the authors' code
(``github.com/danielm1405/iso-merging``, ``src/utils/iso.py``, ``iso_cts``): the split of the budget,
the left-side projection, the SVD-based orthogonalisation ``P Q^T`` and the mean over the
concatenated spectrum are theirs. Deviations, forced by LoRA inputs or by a rank:

- The budget is the rank ``R`` (default ``sum r_i``, the largest rank a module's sum can have),
  capped at the dimension the adapters span (``M = sum r_i`` unless their factors share
  directions), not ``min(d_out, d_in)``: like the authors' budget it is the dimension of the space
  the directions live in, so ``U`` and ``V`` can have orthonormal columns. A larger rank only pads.
- Zero singular triplets are dropped (the authors' full fine-tuning deltas have none), so the
  result may have fewer than ``R`` directions and is then zero-padded; the mean runs over the kept
  values. The canonical polar factor is used for a rank-deficient concatenation (adapters sharing
  directions), as in ``tsv``; the spectrum is exactly flat whenever ``U`` and ``V`` have full
  column rank (always, for adapters in general position) and for duplicated directions.
- The paper's ``alpha`` is the merge weights' job: weights ``w_i = lam`` for all ``i`` give ``lam``
  times the paper's Iso-CTS of the adapters. Other weights scale each adapter in ``S`` and its
  task-specific singular values (hence the common subspace and ``sigma_bar``); every adapter with a
  non-zero weight still gets up to ``s`` task-specific directions at ``sigma_bar``, as in the paper.

Reference:
    Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind: Isotropic
    Model Merging with Common and Task-Specific Subspaces", ICML 2025 (arXiv:2502.04959).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from ..engine.compression import LoraStack, compress
from ..input_checks import is_fraction
from .base import MergedLora, MergeMethod
from .core_space import check_rank, core_slices, module_weights, per_module
from .iso_c import lift_components, nonzero, share_outside

__all__ = ["METHOD", "IsoCTSOptions", "merge_iso_cts", "orthonormal_factor", "subspace_sizes"]


@dataclass(frozen=True)
class IsoCTSOptions:
    """Options of the ``"iso_cts"`` merge, checked when made.

    Example:
        >>> IsoCTSOptions().common_space_fraction
        0.8
        >>> IsoCTSOptions(common_space_fraction=1.5)
        Traceback (most recent call last):
        ...
        ValueError: common_space_fraction must be a number in [0, 1], got 1.5
    """

    common_space_fraction: float = field(
        default=0.8,
        metadata={"help": "share of the rank budget R given to the common subspace (the paper's value)"},
    )

    def __post_init__(self) -> None:
        value = self.common_space_fraction
        if not is_fraction(value):
            raise ValueError(f"common_space_fraction must be a number in [0, 1], got {value!r}")


def subspace_sizes(rank: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(k, s)``: common directions and directions per task for a budget of ``rank`` directions.

    The authors' rule with ``rank`` as the budget: ``k = floor(rank * fraction)``, then
    ``s = round((rank - k) / N)`` (Python's rounding, as theirs) so that the task-specific space
    divides evenly, and ``k = rank - N s`` takes the remainder. ``s`` is capped at ``rank // N`` so
    that ``k`` never goes negative (their code would slice with a negative ``k`` there).

    Example:
        >>> subspace_sizes(768, 8, 0.8)  # ViT-B: the paper's setting
        (616, 19)
        >>> subspace_sizes(16, 2, 0.8), subspace_sizes(7, 3, 0.0)
        ((12, 2), (1, 2))
    """
    check_rank(rank)
    common = int(rank * common_space_fraction)
    per_task = min(round((rank - common) / n_tasks), rank // n_tasks)
    return rank - n_tasks * per_task, per_task


def orthonormal_factor(x: Tensor) -> Tensor:
    """The polar factor ``P Q^T`` of ``x = P D Q^T`` ``(M, K)``, canonical where ``x`` is rank-deficient.

    :func:`.core_space.polar` with the zero cutoff of :func:`.iso_c.nonzero` (``1e3`` times looser):
    the columns come from separate SVDs, so a direction that two adapters share arrives twice, equal
    only up to rounding. Kept apart, the rounding difference would become a direction of its own at
    full weight ``sigma_bar``; merged, the shared direction gets ``sigma_bar`` once.
    """
    p, d, qh = torch.linalg.svd(x, full_matrices=False)
    keep = nonzero(d, d[:1], max(x.shape))
    return p[:, keep] @ qh[keep]


@torch.no_grad()
def merge_iso_cts(
    stack: LoraStack,
    weights: Sequence[float] | Tensor,
    *,
    rank: int,
    options: IsoCTSOptions | None = None,
) -> MergedLora:
    """Iso-CTS (see the module docstring) with a budget of ``rank`` directions.

    Args:
        stack: One module's adapters (batch size 1).
        weights: ``(N,)`` merge weights; each scales its adapter's delta before any SVD.
        rank: The budget ``R = k + N s`` of directions (capped at the dimension the adapters span);
            directions that turn out zero, and any rank above the cap, are zero-padded.
        options: :class:`IsoCTSOptions` or a mapping of its fields (default ``IsoCTSOptions()``).

    Returns:
        :class:`.MergedLora` whose non-zero singular values all equal ``sigma_bar`` (for inputs in
        general position); ``fit_error`` is the share of the weighted sum outside the merged
        subspaces, ``||S - P_U S P_V|| / ||S||``.

    Example:
        >>> A = [torch.randn(1, 2, 5), torch.randn(1, 2, 5)]
        >>> B = [torch.randn(1, 6, 2), torch.randn(1, 6, 2)]
        >>> options = {"common_space_fraction": 0.5}  # budget 3: 1 common + 1 per adapter
        >>> merged = merge_iso_cts(LoraStack(A, B, [1.0, 1.0]), [1.0, 1.0], rank=3, options=options)
        >>> merged.lora_A.shape
        torch.Size([3, 5])
        >>> s = torch.linalg.svdvals(merged.lora_B @ merged.lora_A)  # flat: 3 equal singular values
        >>> print(f"{s[0] / s[2]:.4f}")
        1.0000
    """
    options = METHOD.make_options(options)
    check_rank(rank)
    w = module_weights(stack, weights)
    compressed = compress(stack)
    active = w != 0  # a zero weight removes its adapter, from the budget's split too
    tasks = core_slices(compressed.core)[0][active.to(compressed.core.left.device)]
    tasks = w[active].to(tasks)[:, None, None] * tasks  # (N', M, M): w_i G_i
    total = tasks.sum(dim=0)
    m = total.shape[-1]
    budget = max(1, min(rank, int(compressed.rank_B[0]), int(compressed.rank_A[0])))  # 1: all-zero inputs
    common, per_task = subspace_sizes(budget, max(1, tasks.shape[0]), options.common_space_fraction)

    scales = torch.linalg.matrix_norm(tasks)  # (N',): ||w_i G_i||_F, the rounding scale
    u, s, vh = torch.linalg.svd(total)
    kept = int(nonzero(s[:common], scales.max(), m).sum()) if scales.numel() else 0
    u_c, s_c, v_c = u[:, :kept], s[:kept], vh[:kept].T

    residual = tasks - u_c @ (u_c.T @ tasks)  # (N', M, M): off the common output directions
    u_t, s_t, vh_t = torch.linalg.svd(residual)
    u_t, s_t, v_t = u_t.mT[:, :per_task], s_t[:, :per_task], vh_t[:, :per_task]  # (N', s, M), (N', s)
    keep = nonzero(s_t, scales[:, None], m)

    sigma = torch.cat([s_c, s_t[keep]])
    if sigma.numel() == 0:  # every w_i G_i is zero: the zero delta
        u = v = total.new_zeros(m, 0)
        return lift_components(stack, compressed, u, sigma, v, rank=rank, weights=w, fit_error=0.0)
    u = orthonormal_factor(torch.cat([u_c, u_t[keep].T], dim=1))
    v = orthonormal_factor(torch.cat([v_c, v_t[keep].T], dim=1))
    flat = sigma.mean().expand(sigma.numel())
    return lift_components(
        stack, compressed, u, flat, v, rank=rank, weights=w, fit_error=share_outside(total, u, v)
    )


def _merge(stacks, weights, *, rank, options=None, device=None, progress=False) -> dict[str, MergedLora]:
    merge_one = partial(merge_iso_cts, options=METHOD.make_options(options))
    return per_module(merge_one)(stacks, weights, rank=rank, device=device, progress=progress)


METHOD = MergeMethod(
    name="iso_cts",
    help="Iso-CTS: common + per-adapter subspaces, orthogonalised, flat spectrum (default R = sum r)",
    options_type=IsoCTSOptions,
    default_rank=sum,
    takes_rank=True,
    merge=_merge,
    per_adapter_weights=lambda options: True,
)

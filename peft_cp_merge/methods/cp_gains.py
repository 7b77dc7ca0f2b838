"""How a CP fit's loadings become the per-component gains of the merged delta.

For components ``r`` with CP weight ``lambda_r`` and unit loadings ``c_r`` (one entry per adapter),
and merge weights ``w``:

- ``"weighted"``: ``g_r = lambda_r sum_i w_i c_ir``; ``"disjoint"``: TIES per component (the
  sign of the sum elected, the agreeing contributions of at least :data:`DISJOINT_THRESHOLD` of the
  largest averaged).
- ``sharing_exponent = gamma``: ``g_r`` divided by ``n_r ** gamma``, with
  ``n_r = (sum_i |w_i c_ir|)^2 / sum_i (w_i c_ir)^2`` the effective number of adapters using ``r``.
- ``isotropic``: every non-zero ``|g_r|`` replaced by their mean, signs kept.

The maths and the measurements: ``docs/design.md`` section 4.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .iso_c import nonzero

__all__ = ["AGGREGATIONS", "DISJOINT_THRESHOLD", "aggregate_loadings", "component_gains"]

AGGREGATIONS = ("weighted", "disjoint")
DISJOINT_THRESHOLD = 0.1


def aggregate_loadings(weights: Tensor, loadings: Tensor, merge_weights: Tensor, aggregation: str) -> Tensor:
    """Per-component gains ``g`` of the merged delta.

    Args:
        weights: CP weights ``lambda`` ``(batch, R)``.
        loadings: Adapter loadings ``C`` ``(batch, N, R)``, unit columns.
        merge_weights: ``w`` ``(batch, N)``.
        aggregation: One of :data:`AGGREGATIONS`.

    Returns:
        ``(batch, R)``.
    """
    contributions = merge_weights[:, :, None].to(loadings) * loadings  # (batch, N, R)
    if aggregation == "weighted":
        return weights * contributions.sum(dim=1)
    if aggregation == "disjoint":
        elected = torch.sign(contributions.sum(dim=1, keepdim=True))
        largest = contributions.abs().amax(dim=1, keepdim=True)
        keep = (torch.sign(contributions) == elected) & (contributions.abs() >= DISJOINT_THRESHOLD * largest)
        kept = torch.where(keep, contributions, torch.zeros_like(contributions))
        return weights * kept.sum(dim=1) / keep.sum(dim=1).clamp_min(1)
    raise ValueError(f"Unknown aggregation {aggregation!r}; expected one of {list(AGGREGATIONS)}")


def component_gains(
    weights: Tensor,
    loadings: Tensor,
    merge_weights: Tensor,
    *,
    aggregation: str = "weighted",
    sharing_exponent: float = 0.0,
    isotropic: bool = False,
) -> Tensor:
    """Per-component gains of the merged delta (float64 inputs give float64).

    :func:`aggregate_loadings`, then the ``sharing_exponent`` and ``isotropic`` rules of the module
    docstring. Components whose gain is at most ``1e3 R eps`` times the largest (:func:`.iso_c.nonzero`)
    stay zero when flattened.

    Args:
        weights: CP weights ``lambda`` ``(batch, R)``.
        loadings: Adapter loadings ``C`` ``(batch, N, R)``, unit columns.
        merge_weights: ``w`` ``(batch, N)``.
        aggregation: One of :data:`AGGREGATIONS`.
        sharing_exponent: ``gamma`` from 0 (off) to 1.
        isotropic: Flatten the gain magnitudes to their mean.

    Returns:
        ``(batch, R)``.

    Example:
        >>> lam, c = torch.ones(1, 2), torch.tensor([[[1.0, 0.6], [0.0, 0.8]]])  # one shared component
        >>> component_gains(lam, c, torch.ones(1, 2))
        tensor([[1.0000, 1.4000]])
        >>> component_gains(lam, c, torch.ones(1, 2), sharing_exponent=1.0)
        tensor([[1.0000, 0.7143]])
        >>> component_gains(lam, c, torch.ones(1, 2), isotropic=True)
        tensor([[1.2000, 1.2000]])
    """
    gains = aggregate_loadings(weights, loadings, merge_weights, aggregation)
    if sharing_exponent:
        contributions = (merge_weights[:, :, None].to(loadings) * loadings).abs()
        squares = contributions.square().sum(dim=1)
        sharing = torch.where(squares > 0, contributions.sum(dim=1).square() / squares, 1.0)
        gains = gains / sharing.clamp_min(1.0) ** sharing_exponent
    if isotropic:
        magnitude = gains.abs()
        kept = nonzero(magnitude, magnitude.amax(dim=-1, keepdim=True), gains.shape[-1])
        mean = (magnitude * kept).sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True).clamp_min(1)
        gains = torch.where(kept, torch.sign(gains) * mean, torch.zeros_like(gains))
    return gains

"""Merging LoRA adapters from a joint CP decomposition of their stacked deltas.

For one module, the N adapters' deltas ``dW_i = s_i B_i A_i`` are stacked into ``T`` and fitted with
``T ~= sum_r lambda_r u_r o v_r o c_r`` (``c_r``: how much each adapter uses component ``r``). The merged
delta is ``dW = sum_r g_r u_r v_r^T`` with per-component gains ``g_r`` from the loadings:

- ``"weighted"`` (default): ``g_r = lambda_r sum_i w_i c_ir``. Without ``whiten`` and ``isotropic``,
  with a rank large enough for an exact fit this is exactly ``sum_i w_i dW_i`` (PEFT's ``"cat"``); a
  smaller rank denoises it jointly.
- ``"disjoint"``: TIES-style per component. Elect the sign of ``sum_i w_i c_ir``, keep the loadings
  that agree with it and are at least :data:`DISJOINT_THRESHOLD` of the component's largest
  ``|w_i c_ir|``, and average them: a component used by one adapter keeps its full strength,
  a shared one is not counted N times.

With ``whiten=True`` (the default; TSV's decorrelation in the CP basis) ``U = [u_1 ... u_R]`` and
``V = [v_1 ... v_R]`` (unit columns, canonical form) are replaced by their polar factors, the nearest
matrices with orthonormal columns, before the same gains are applied:
``dW = polar(U) diag(g) polar(V)^T``. Components that share directions then stop adding up in them
(two equal-gain components at cosine ``c`` on both sides: singular values ``g, g`` instead of
``g (1 + c), g (1 - c)``); already orthogonal components are unchanged. It runs on the core-space
factors, whose lifts are the same up to the orthonormal bases.

Two gain rules act on top of either aggregation (issue 11, ``docs/design.md`` §4):

- ``sharing_exponent=gamma``: each gain is divided by ``n_r ** gamma``, where
  ``n_r = (sum_i |w_i c_ir|)^2 / sum_i (w_i c_ir)^2`` (between 1 and N) is the effective number of
  adapters that use component ``r``. With ``gamma = 1`` and weights 1 every adapter keeps its own
  amount of every component: one used by a single adapter keeps ``lambda_r c_ir``, one spread evenly
  over N adapters gets ``lambda_r / sqrt(N)`` (each adapter's share) instead of N shares added up.
- ``isotropic=True`` (the default): every non-zero gain's magnitude is replaced by their mean (signs
  kept), Iso-C's flat spectrum in the CP basis; with ``whiten=True`` the merged delta's non-zero
  singular values are then all equal.

The defaults (``whiten=True``, ``isotropic=True``, rank ``sum r_i``) are the best cp variant of the
quality benchmark (:func:`default_rank`). They keep every adapter at its own strength: weights of about
1 each (not summing to 1, as for an average) are their natural scale. ``whiten=False,
isotropic=False`` is the sum-like joint CP of the first release (weights of a mean, a rank below
``sum r_i`` such as ``2 max r_i``).

A per-module rank (issue 11; off by default): with ``rank_tol = t > 0`` each module is also fitted at
the candidate ranks ``ceil(R k / 4)``, ``k = 1, 2, 3``, and keeps the smallest whose CP fit error is at
most ``t`` above its fit error at ``R`` (the elbow of its fit curve); the unused components are zero.

The merged adapter has rank ``R``: ``lora_B = U diag(sqrt|g|)``, ``lora_A = diag(sign(g) sqrt|g|) V^T``
and scaling 1 (``r = lora_alpha = R``). The maths and the measurements behind the defaults:
``docs/design.md`` sections 3, 4 and 9.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..engine.als import CPResult, canonicalize, check_options, check_rank, cp_als
from ..engine.compression import CompressedLora, LoraCore, LoraStack, compress_many, lift
from ..engine.starts import INITS
from ..input_checks import is_fraction
from .base import MergedLora, MergeMethod, pad_rank, stack_weights, weighted_sum_error
from .core_space import polar
from .cp_gains import AGGREGATIONS, DISJOINT_THRESHOLD, aggregate_loadings, component_gains

__all__ = [
    "AGGREGATIONS",
    "DISJOINT_THRESHOLD",
    "METHOD",
    "CPOptions",
    "aggregate_loadings",
    "component_gains",
    "default_rank",
    "merge_modules",
]

logger = logging.getLogger(__name__)


def default_rank(ranks: Sequence[int]) -> int:
    """The default CP rank for adapters of LoRA ranks ``ranks``: ``sum r_i``, where the CP is exact.

    Set from the quality benchmark (``benchmarks/quality``, issue 11's protocol: six rank-8 task
    adapters, three seeds, variant, rank and strength chosen on validation). With the default options
    (whitened, isotropic) at rank ``sum r_i`` the merge kept 0.677 of the individual adapters' accuracy,
    level with Iso-CTS (0.679) and above TSV (0.622), KnOTS-TIES (0.627) and the first release's
    default (sum-like gains at rank ``min(2 max r_i, sum r_i)``: 0.546); at rank ``2 max r_i`` the
    same options kept less (0.59 against 0.74 at ``sum r_i``, seed 0). At ``sum r_i`` the CP is each
    adapter's own components (no ALS runs); a smaller rank fits a joint CP-ALS that compresses
    directions the adapters share.

    Example:
        >>> default_rank([8, 8, 8, 8, 8, 8]), default_rank([8, 4]), default_rank([16])
        (48, 12, 16)
    """
    if not ranks or min(ranks) < 1:
        raise ValueError(f"Expected a non-empty sequence of positive LoRA ranks, got {list(ranks)}")
    return sum(ranks)


@dataclass(frozen=True)
class CPOptions:
    """Options of the ``"cp"`` merge, checked when made.

    Example:
        >>> CPOptions(aggregation="disjoint", n_iter_max=500).tol
        1e-05
        >>> CPOptions(init="best")
        Traceback (most recent call last):
        ...
        ValueError: Unknown init 'best'; expected one of ['gevd', 'random', 'svd']
    """

    aggregation: str = field(
        default="weighted",
        metadata={"help": "how adapter loadings become gains", "choices": AGGREGATIONS},
    )
    init: str = field(default="gevd", metadata={"help": "CP-ALS initialisation", "choices": INITS})
    n_iter_max: int = field(default=200, metadata={"help": "maximum ALS sweeps"})
    tol: float = field(
        default=1e-5, metadata={"help": "ALS stopping tolerance on the change of relative error"}
    )
    l2: float = field(default=0.0, metadata={"help": "relative ridge term of the ALS normal equations"})
    seed: int = field(default=0, metadata={"help": "seed of every random number"})
    line_search: bool = field(
        default=True, metadata={"help": "extrapolate after each ALS sweep (Bro's line search)"}
    )
    whiten: bool = field(
        default=True,
        metadata={"help": "replace the CP factors U, V by their polar factors (TSV-style decorrelation)"},
    )
    sharing_exponent: float = field(
        default=0.0,
        metadata={"help": "divide each gain by its number of sharing adapters to this power, 0 to 1"},
    )
    isotropic: bool = field(
        default=True,
        metadata={"help": "give every component the mean gain magnitude (Iso-C in the CP basis)"},
    )
    rank_tol: float = field(
        default=0.0,
        metadata={"help": "per-module rank: fewest components within this fit error of rank R (0: off)"},
    )

    @classmethod
    def sum_like(cls, **changes: object) -> CPOptions:
        """The first release's sum-like cp: whitening and the flat spectrum off, other fields as given.

        Its merge is ``sum_r lambda_r (sum_i w_i c_ir) u_r v_r^T``: at a rank of ``sum r_i`` or more
        exactly PEFT's ``"cat"``, below it a joint low-rank approximation of the weighted sum; weights
        that sum to 1 average the adapters. The benchmarks that measured it use this.

        Example:
            >>> options = CPOptions.sum_like(init="svd")
            >>> options.whiten, options.isotropic, options.init
            (False, False, 'svd')
        """
        return cls(**{"whiten": False, "isotropic": False, **changes})

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"Unknown aggregation {self.aggregation!r}; expected one of {list(AGGREGATIONS)}"
            )
        check_options(
            1, self.init, self.n_iter_max, self.tol, self.l2, self.seed, line_search=self.line_search
        )
        for name in ("whiten", "isotropic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("sharing_exponent", "rank_tol"):
            if not is_fraction(getattr(self, name)):
                raise ValueError(f"{name} must be a number from 0 to 1, got {getattr(self, name)!r}")


def _core_rel_errors(core: LoraCore, result: CPResult, merge_weights: Tensor, options: CPOptions) -> Tensor:
    """Distance of each merged delta to the weighted sum, computed in the core (``(batch,)``).

    The merged delta ``sum_r g_r u_r v_r^T`` is rebuilt from the core-space factors with the same
    canonical form and gains as the lifted ones (norms agree because the bases are orthonormal;
    signs and order do not change the sum), so no ``d``-sized product is needed.
    """
    weights, (a, b, c) = canonicalize(
        result.weights.to(torch.float64), tuple(f.to(torch.float64) for f in result.factors)
    )
    gains = _gains(weights, c, merge_weights, options)
    return weighted_sum_error((a * gains[:, None, :]) @ b.mT, core, merge_weights)


def _whitened(result: CPResult, merge_weights: Tensor, options: CPOptions) -> tuple[Tensor, Tensor, Tensor]:
    """Core-space ``(polar(U), polar(V), g)`` of a batch of fits, float64 (``whiten=True``).

    ``U``, ``V`` in canonical form (unit columns, the product of all column norms and ALS's weight in
    ``lambda_r``), so ``g_r`` is the unwhitened gain (:func:`.component_gains`).
    The polar factor is equivariant under column signs and order, so these choices do not matter.
    Components with a zero gain (at full rank: those of an adapter with weight 0) are left out of the
    polar factors (their columns zeroed; the canonical polar factor of ``[X, 0]`` is
    ``[polar(X), 0]``), so they do not turn the others' directions.
    """
    weights, (a, b, c) = canonicalize(
        result.weights.to(torch.float64), tuple(f.to(torch.float64) for f in result.factors)
    )
    gains = _gains(weights, c, merge_weights, options)
    used = (gains != 0).to(a.dtype)[:, None, :]  # a component the merge does not use shapes nothing
    return polar(a * used), polar(b * used), gains


def _gains(weights: Tensor, loadings: Tensor, merge_weights: Tensor, options: CPOptions) -> Tensor:
    """:func:`.component_gains` under ``options``."""
    return component_gains(
        weights,
        loadings,
        merge_weights,
        aggregation=options.aggregation,
        sharing_exponent=options.sharing_exponent,
        isotropic=options.isotropic,
    )


def _split_gains(u: Tensor, v: Tensor, gains: Tensor) -> tuple[Tensor, Tensor]:
    """``lora_B = U diag(sqrt|g|)``, ``lora_A = diag(sign(g) sqrt|g|) V^T`` for one module."""
    root = gains.abs().sqrt()
    return (torch.sign(gains) * root)[:, None] * v.mT, u * root[None, :]


def merge_modules(
    stacks: Mapping[str, LoraStack],
    weights: Mapping[str, Sequence[float] | Tensor],
    *,
    rank: int,
    options: CPOptions | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = False,
    max_core_bytes: int = 2**31,
) -> dict[str, MergedLora]:
    """Merge the adapters of many modules, batching every core of the same shape into one CP-ALS.

    Args:
        stacks: Module name -> :class:`.LoraStack` of batch size 1 (the adapters present
            in that module, with their scalings).
        weights: Module name -> merge weight of each adapter in that module's stack.
        rank: Components ``R`` of the merged adapters. A module whose adapters have a total rank
            ``M < R`` is fitted exactly with ``M`` components and padded with zeros.
        options: :class:`CPOptions` (default: ``CPOptions()``).
        device: Where to compute (default: where each stack lives). Results come back on the
            stack's device and dtype.
        progress: Show a progress bar (``None``: on a terminal only).
        max_core_bytes: Memory budget of one batched CP-ALS call. All modules of one core shape go
            into one call unless their float64 cores (about ``32 M^2`` bytes each, ``M = sum r_i``)
            exceed it; then they are split into chunks. The default (2 GiB) holds 2,600 modules at
            ``M = 160`` (N = 10, r = 16), or 6 at ``M = 3200`` (N = 50, r = 64).

    Returns:
        Module name -> :class:`MergedLora`, with factors of rank exactly ``rank``.

    Example:
        >>> A = [torch.randn(1, 4, 30), torch.randn(1, 4, 30)]
        >>> B = [torch.randn(1, 20, 4), torch.randn(1, 20, 4)]
        >>> merged = merge_modules({"fc": LoraStack(A, B, [1.0, 1.0])}, {"fc": [1.0, 1.0]}, rank=8)
        >>> merged["fc"].lora_A.shape
        torch.Size([8, 30])
    """
    options = METHOD.make_options(options)
    check_rank(rank)
    merge_weights = stack_weights(stacks, weights)
    _warn_if_averaging_weights(merge_weights, options)
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name, stack in stacks.items():
        groups[stack.ranks].append(name)

    merged: dict[str, MergedLora] = {}
    bar = tqdm(
        total=len(stacks), desc="CP merge", unit="module", disable=None if progress is None else not progress
    )
    chunks = [
        (ranks, names[start : start + _chunk_size(sum(ranks), max_core_bytes)])
        for ranks, names in groups.items()
        for start in range(0, len(names), _chunk_size(sum(ranks), max_core_bytes))
    ]
    for ranks, names in chunks:
        group = [stacks[n] if device is None else stacks[n].to(device) for n in names]
        compressed = compress_many(group)
        weights_batch = torch.stack([merge_weights[name] for name in names]).to(compressed.core.left.device)
        fits = _fit_chunk(compressed.core, min(rank, sum(ranks)), weights_batch, options)
        chosen = _chosen_ranks(fits, options.rank_tol)
        for index, name in enumerate(names):
            fit = fits[chosen[index]]
            merged[name] = _lift_module(
                group[index],
                stacks[name],
                compressed,
                fit.result,
                index,
                merge_weights[name],
                options,
                rank,
                float(fit.rel_errors[index]),
                fit.whitened,
            )
            bar.update(1)
    bar.close()
    return {name: merged[name] for name in stacks}


def _warn_if_averaging_weights(merge_weights: Mapping[str, Tensor], options: CPOptions) -> None:
    """Warn when the weights of an average (positive, summing to 1) meet a per-adapter merge.

    With ``whiten`` or ``isotropic`` a weight of 1 keeps an adapter at about its own strength, so
    weights summing to 1 keep each of N adapters at about 1/N of it: the first release's usage,
    which the 0.2.0 defaults would silently weaken (0.33 against 0.59 normalised validation accuracy
    on the quality benchmark).
    """
    if not METHOD.per_adapter_weights(options):
        return
    for w in merge_weights.values():
        if w.numel() >= 2 and bool((w > 0).all()) and abs(float(w.sum()) - 1.0) <= 1e-6:
            warnings.warn(
                f"Merge weights {[round(float(x), 4) for x in w]} sum to 1, the weights of an average, "
                "but cp with whiten/isotropic (the defaults) keeps each adapter at its weight times its "
                f"own strength: each enters at about 1/{w.numel()} of it. Pass weights of about 1 each, "
                "or whiten=False, isotropic=False (cp_whiten / cp_isotropic, --no-whiten --no-isotropic) "
                "for the sum-like merge that averages.",
                UserWarning,
                stacklevel=4,
            )
            return


@dataclass(frozen=True)
class _Fit:
    """One batched CP-ALS at one rank: the result, each module's ``rel_error``, the whitened factors."""

    result: CPResult
    rel_errors: Tensor
    whitened: tuple[Tensor, Tensor, Tensor] | None


def _fit_chunk(core: LoraCore, full_rank: int, weights_batch: Tensor, options: CPOptions) -> dict[int, _Fit]:
    """Rank -> :class:`_Fit`: at ``full_rank``, and with ``rank_tol`` at the smaller candidates too."""
    ranks = [full_rank]
    if options.rank_tol:
        ranks = sorted({-(-full_rank * k // 4) for k in (1, 2, 3)} | {full_rank})
    fits = {}
    for r in ranks:
        result = cp_als(
            core,
            r,
            init=options.init,
            n_iter_max=options.n_iter_max,
            tol=options.tol,
            l2=options.l2,
            seed=options.seed,
            line_search=options.line_search,
        )
        what = "CP-ALS" if result.n_iter.any() else "Exact CP (no ALS)"  # cp_als's own rank-M CP: 0 sweeps
        logger.info("%s on %d modules, core %s, rank %d", what, core.left.shape[0], core.shape[1:], r)
        if (~result.converged).any():
            logger.info(
                "%d of %d modules stopped at n_iter_max=%d",
                (~result.converged).sum(),
                result.converged.numel(),
                options.n_iter_max,
            )
        whitened = None
        if options.whiten:
            whitened = _whitened(result, weights_batch, options)
            delta = (whitened[0] * whitened[2][:, None, :]) @ whitened[1].mT
            rel_errors = weighted_sum_error(delta, core, weights_batch)
        else:
            rel_errors = _core_rel_errors(core, result, weights_batch, options)
        fits[r] = _Fit(result, rel_errors, whitened)
    return fits


def _chosen_ranks(fits: dict[int, _Fit], rank_tol: float) -> list[int]:
    """Per module, the smallest fitted rank whose fit error is within ``rank_tol`` of the largest's.

    The largest rank always qualifies, so every module gets one.
    """
    ranks = sorted(fits)
    errors = torch.stack([fits[r].result.rel_error.to(torch.float64) for r in ranks])  # (ranks, batch)
    first = (errors <= errors[-1] + rank_tol).int().argmax(dim=0)
    return [ranks[i] for i in first.tolist()]


def _chunk_size(m: int, max_core_bytes: int) -> int:
    """Modules per batched CP-ALS call: float64 cores take about 4 M^2 doubles per module."""
    return max(1, max_core_bytes // (4 * m * m * 8))


def _lift_module(
    stack: LoraStack,
    original: LoraStack,
    compressed: CompressedLora,
    result: CPResult,
    index: int,
    merge_weights: Tensor,
    options: CPOptions,
    rank: int,
    rel_error: float,
    whitened: tuple[Tensor, Tensor, Tensor] | None = None,
) -> MergedLora:
    """Lift one module's core-space factors and turn loadings into its merged A and B.

    ``whitened``: the batch's core-space ``(polar(U), polar(V), g)`` (:func:`_whitened`), lifted instead.
    """
    here = slice(index, index + 1)
    basis_B, basis_A = compressed.basis_B[here], compressed.basis_A[here]
    if whitened is not None:
        # The gains go into the small core-space factors, so each d-sized factor is written once, in
        # the working dtype (orthonormal columns: float32 loses nothing here), lora_A as rows.
        gains = whitened[2][index]
        root = gains.abs().sqrt()
        lora_B = lift(whitened[0][here] * root, stack.cat_B(), basis_B)[0]
        signed = whitened[1][here] * (torch.sign(gains) * root)
        lora_A = lift(signed, stack.cat_A(), basis_A, rows=True)[0]
    else:
        factors = (
            lift(result.factors[0][here], stack.cat_B(), basis_B, out_dtype=torch.float64),
            lift(result.factors[1][here], stack.cat_A().mT, basis_A, out_dtype=torch.float64),
            result.factors[2][here].to(torch.float64),
        )
        cp_weights, (u, v, c) = canonicalize(result.weights[here].to(torch.float64), factors)
        gains = _gains(cp_weights, c, merge_weights[None].to(c.device), options)[0]
        lora_A, lora_B = _split_gains(u[0], v[0], gains)
    home, out_dtype = original.lora_A[0].device, original.lora_A[0].dtype
    merged = MergedLora(
        lora_A=lora_A.to(dtype=out_dtype, device=home),
        lora_B=lora_B.to(dtype=out_dtype, device=home),
        rel_error=rel_error,
        fit_error=float(result.rel_error[index]),
        n_iter=int(result.n_iter[index]),
        converged=bool(result.converged[index]),
        rank=int(gains.shape[0]),
    )
    return pad_rank(merged, rank)


def _merge(stacks, weights, *, rank, options=None, device=None, progress=False) -> dict[str, MergedLora]:
    return merge_modules(stacks, weights, rank=rank, options=options, device=device, progress=progress)


METHOD = MergeMethod(
    name="cp",
    help="joint CP decomposition of all adapters' deltas, whitened, flat spectrum (default R = sum r)",
    options_type=CPOptions,
    default_rank=default_rank,
    takes_rank=True,
    merge=_merge,
    per_adapter_weights=lambda options: options.whiten or options.isotropic,
)

"""Where LoRA adapters interfere: per-module metrics computed exactly in the compressed core.

For each module the adapters present give deltas ``dW_i = s_i B_i A_i = Q_B G_i Q_A^T``
(:mod:`.compression`); ``Q_B`` and ``Q_A`` have orthonormal columns, so every metric below is that of
the small core slices ``G_i`` and no ``d_out x d_in`` matrix is formed.

- ``cosine[i][j] = <dW_i, dW_j>_F / (||dW_i||_F ||dW_j||_F)``.
- ``sti``: TSV's Subspace Task Interference ``||(U^T U - I) diag(S) (V^T V - I)||_1`` (entrywise
  L1), with ``U = [U_1 ... U_N]``, ``V``, ``S`` the concatenated singular vectors and values of the
  ``dW_i`` (:func:`.task_svd`), and ``sti_rel = sti / sum(S)``. ``U^T U - I`` holds the
  overlaps ``<u_a, u_b>`` between singular directions of *different* adapters (those of one adapter
  are orthonormal), so ``sti_rel`` is a singular-value-weighted sum of cross-adapter overlaps.
  How to read it:

  * 0: the adapters live in mutually orthogonal subspaces; no interference.
  * 1: what two identical adapters (up to scale) give, each direction meeting one copy of itself.
    ``N`` identical adapters give ``(N - 1)^2``: each direction meets ``N - 1`` copies on both sides.
  * It is not a fraction capped at 1. The entrywise L1 norm adds the |overlaps| without cancelling
    and is never below the nuclear norm, so two *different* adapters spanning the same column and
    row spaces give at least 1, and more as soon as their singular directions do not line up one to
    one (about 3 for two random rank-8 bases of one subspace). The value grows with the number of
    adapters and their ranks; its only bound, ``max_i (M - r_i)^2`` with ``M`` the number of kept
    singular values, is far out of reach. So a value above 1 does not mean "worse than identical
    adapters": compare modules and layers of one report, not against 1.
  * Typical range, for six rank-8 adapters at SmolLM2-135M widths (``benchmarks/quality``):
    unrelated random adapters 0.2-0.7; six trained task adapters 1.8-9 (median 4.2) although their
    largest ``|cos|`` is only about 0.1.
- The CP counterpart, for each requested rank ``R`` (CP-ALS on the core, :func:`.cp_als`,
  rank clamped to ``M = sum_i r_i`` as :func:`.merge_modules` does), with unit-norm output
  factors ``u_r``, input factors ``v_r``, adapter loadings ``c_r`` and weights ``lambda_r``:

  * ``rel_error``: ``||T - T_hat||_F / ||T||_F``, the fit a CP merge at that rank starts from.
  * ``cp_sti``: the STI formula on the CP factors, with each pair of components weighted by how
    little their adapters coincide: ``||(Gu * D) diag(lambda) (Gv * D)||_1`` where
    ``Gu = U^T U - I``, ``Gv = V^T V - I``, ``D[r, s] = 1 - <|c_r|, |c_s|>`` and ``*`` is the
    entrywise product. Components used by the same adapters (``D = 0``) may overlap freely: that
    is shared knowledge, not interference. ``cp_sti_rel = cp_sti / sum(lambda)``. It is 0 for
    adapters in orthogonal subspaces and for identical adapters (one shared set of components) at
    a rank that leaves no room to spare; it measures the decomposition CP-ALS found, and at a rank
    as large as the summed adapter ranks a split into per-adapter components fits as exactly as a
    shared one and counts as interference.
    Like ``sti_rel`` it is a sum of |overlaps|, not capped at 1 (at most ``(R - 1)^2``), and it
    grows with ``R``: compare it at one rank, not with ``sti_rel`` (for the six task adapters
    above, median 0.56 / 1.5 / 3.6 at ``R`` = 8 / 16 / 32).
  * ``specificity``: ``sum_r lambda_r max_i c_ir^2 / sum_r lambda_r``, the lambda-weighted share of
    each component's loadings that falls on a single adapter: 1 when every component belongs to one
    adapter, ``1/N`` when every component is shared equally.

:func:`analyze_adapter_folders` computes these for every module of a set of adapter folders, reading
them group by group; :mod:`.analysis.report` formats the table, the JSON and the plots.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..engine.als import CPResult, cp_als
from ..engine.compression import LoraCore, compress
from ..folders.merging import DEFAULT_GROUP_BYTES, iter_module_stacks
from ..folders.plan import plan_merge
from ..folders.reading import layer_index
from ..methods.core_space import core_slices, task_svd

__all__ = [
    "CPInterference",
    "InterferenceReport",
    "ModuleInterference",
    "analyze_adapter_folders",
    "cp_interference",
    "pairwise_cosine",
    "subspace_interference",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CPInterference:
    """The CP view of one module at one rank (definitions in the module docstring)."""

    rank: int
    rel_error: float
    cp_sti: float
    cp_sti_rel: float
    specificity: float


@dataclass(frozen=True)
class ModuleInterference:
    """All metrics of one module.

    Attributes:
        name: Module name.
        layer: Layer depth (first integer in the name), ``None`` if there is none.
        adapters: Indices of the adapters present in this module.
        norms: ``||dW_i||_F`` of each present adapter.
        cosine: Pairwise cosine similarity of the present adapters' deltas (``N x N``, nested tuples).
        sti: TSV interference; ``sti_rel`` normalised by the sum of singular values (0 for orthogonal
            adapters, 1 for two identical ones, not capped at 1: see the module docstring).
        cp: One :class:`CPInterference` per requested rank.
    """

    name: str
    layer: int | None
    adapters: tuple[int, ...]
    norms: tuple[float, ...]
    cosine: tuple[tuple[float, ...], ...]
    sti: float
    sti_rel: float
    cp: tuple[CPInterference, ...]

    @property
    def max_abs_cosine(self) -> float:
        """Largest ``|cos|`` between two different adapters (0 with a single adapter)."""
        n = len(self.adapters)
        return max((abs(self.cosine[i][j]) for i in range(n) for j in range(n) if i != j), default=0.0)


@dataclass(frozen=True)
class InterferenceReport:
    """Interference metrics of a set of adapters, module by module in natural name order.

    Attributes:
        adapters: The adapter folders.
        ranks: The CP ranks analysed.
        modules: One :class:`ModuleInterference` per module.
    """

    adapters: tuple[str, ...]
    ranks: tuple[int, ...]
    modules: tuple[ModuleInterference, ...]


def pairwise_cosine(slices: Tensor) -> tuple[Tensor, Tensor]:
    """Norms ``(batch, N)`` and pairwise cosines ``(batch, N, N)`` of core slices ``(batch, N, M, M)``.

    A zero delta has cosine 0 with everything (and 1 with itself).
    """
    flat = slices.flatten(start_dim=2)
    gram = flat @ flat.mT
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    scale = norms[:, :, None] * norms[:, None, :]
    cosine = torch.where(scale > 0, gram / scale.clamp_min(torch.finfo(gram.dtype).tiny), 0.0)
    eye = torch.eye(slices.shape[1], dtype=torch.bool, device=slices.device)
    return norms, torch.where(eye, 1.0, cosine)


def subspace_interference(slices: Tensor) -> tuple[float, float]:
    """TSV's ``(sti, sti_rel)`` of one module's core slices ``(N, M, M)``."""
    svd = task_svd(slices)
    eye = torch.eye(svd.S.numel(), dtype=svd.S.dtype, device=svd.S.device)
    sti = float((((svd.U.T @ svd.U - eye) * svd.S) @ (svd.V.T @ svd.V - eye)).abs().sum())
    total = float(svd.S.sum())
    return sti, sti / total if total > 0 else 0.0


def cp_interference(result: CPResult) -> tuple[Tensor, Tensor, Tensor]:
    """``(cp_sti, cp_sti_rel, specificity)``, each ``(batch,)``, of a canonical CP result."""
    weights, (u, v, c) = result.weights, result.factors
    eye = torch.eye(weights.shape[1], dtype=weights.dtype, device=weights.device)
    disjoint = 1 - c.abs().mT @ c.abs()  # (batch, R, R): 0 for components of the same adapters
    gram_u = (u.mT @ u - eye) * disjoint
    gram_v = (v.mT @ v - eye) * disjoint
    cp_sti = ((gram_u * weights[:, None, :]) @ gram_v).abs().sum(dim=(1, 2))
    total = weights.sum(dim=1)
    safe_total = total.clamp_min(torch.finfo(total.dtype).tiny)
    specificity = (weights * c.square().amax(dim=1)).sum(dim=1) / safe_total
    return cp_sti, torch.where(total > 0, cp_sti / safe_total, 0.0), torch.where(total > 0, specificity, 1.0)


def _cp_metrics(
    cores: dict[str, LoraCore], ranks: Sequence[int], seed: int
) -> dict[str, list[CPInterference]]:
    """CP metrics per module and rank, one batched CP-ALS per (core ranks, CP rank)."""
    by_ranks: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name, core in cores.items():
        by_ranks[core.ranks].append(name)
    out: dict[str, list[CPInterference]] = {name: [] for name in cores}
    for adapter_ranks, names in by_ranks.items():
        batch = LoraCore.cat([cores[n] for n in names])
        for rank in ranks:
            result = cp_als(batch, min(rank, sum(adapter_ranks)), seed=seed)
            cp_sti, cp_sti_rel, specificity = cp_interference(result)
            for i, name in enumerate(names):
                out[name].append(
                    CPInterference(
                        rank=rank,
                        rel_error=float(result.rel_error[i]),
                        cp_sti=float(cp_sti[i]),
                        cp_sti_rel=float(cp_sti_rel[i]),
                        specificity=float(specificity[i]),
                    )
                )
    return out


@torch.no_grad()
def analyze_adapter_folders(
    adapter_dirs: Sequence[str | os.PathLike],
    *,
    ranks: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    allow_different_base: bool = False,
    seed: int = 0,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    progress: bool = True,
) -> InterferenceReport:
    """Interference metrics of every module of a set of LoRA adapter folders.

    Args:
        adapter_dirs: PEFT LoRA adapter folders (at least 2), checked as for merging.
        ranks: CP ranks to analyse (default: the largest adapter rank ``r`` and ``2 r``).
        device: Where to compute.
        allow_different_base: Analyse adapters made for different base models (with a warning).
        seed: Seed of CP-ALS.
        group_bytes: Input bytes read at a time.
        progress: Show a progress bar over modules.

    Returns:
        The :class:`InterferenceReport`.

    Raises:
        ValueError, AdapterError: Bad ranks, or folders that cannot be merged (see
            :func:`.plan_merge`).

    Example:
        >>> report = analyze_adapter_folders(["math", "code"], ranks=[8, 16])  # doctest: +SKIP
        >>> print(format_report(report))  # doctest: +SKIP
    """
    plan = plan_merge(
        adapter_dirs,
        weights=[1.0] * len(adapter_dirs),
        rank=None,
        method="cat",
        allow_different_base=allow_different_base,
    )
    if ranks is None:
        largest = max(r for m in plan.modules for r in m.ranks)
        ranks = (largest, 2 * largest)
    ranks = tuple(ranks)
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {list(ranks)}")
    plans = {m.name: m for m in plan.modules}
    modules: list[ModuleInterference] = []
    with tqdm(total=len(plan.modules), desc="Analysing", unit="module", disable=not progress) as bar:
        for stacks in iter_module_stacks(plan, device=device, group_bytes=group_bytes):
            cores = {name: compress(stack).core for name, stack in stacks.items()}
            cp = _cp_metrics(cores, ranks, seed)
            for name, core in cores.items():
                slices = core_slices(core)
                norms, cosine = pairwise_cosine(slices)
                sti, sti_rel = subspace_interference(slices[0])
                modules.append(
                    ModuleInterference(
                        name=name,
                        layer=layer_index(name),
                        adapters=plans[name].adapters,
                        norms=tuple(norms[0].tolist()),
                        cosine=tuple(tuple(row) for row in cosine[0].tolist()),
                        sti=sti,
                        sti_rel=sti_rel,
                        cp=tuple(cp[name]),
                    )
                )
            bar.update(len(stacks))
    return InterferenceReport(
        adapters=tuple(str(a.path) for a in plan.adapters), ranks=ranks, modules=tuple(modules)
    )

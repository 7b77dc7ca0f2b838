"""Exact compression of a stack of LoRA deltas into a small core tensor.

A batch of ``N`` LoRA adapters on one module is the third-order tensor ``T`` with frontal slices
``T[:, :, i] = s_i B_i A_i`` (``B_i: d_out x r_i``, ``A_i: r_i x d_in``). With ``M = sum_i r_i``,
``Bcat = [B_1 ... B_N]`` and ``Acat = [A_1; ...; A_N]`` and orthonormal bases
``Bcat = Q_B R_B``, ``Acat^T = Q_A R_A``::

    T[:, :, i] = Q_B G_i Q_A^T,    G_i = s_i R_B[:, blk_i] R_A[:, blk_i]^T        (M x M)

so ``T = (Q_B, Q_A, I) . G`` exactly, and everything the CP decomposition needs (fits, residuals,
merges) can be computed on the core ``G`` of size ``M x M x N``, never on the dense
``d_out x d_in x N`` tensor. The core itself is kept factored: ``G`` is the Kruskal tensor
``[[left, right, E]]`` of rank ``M``, where ``left = R_B diag(s)``, ``right = R_A`` and ``E`` is the
``N x M`` indicator of which adapter each column comes from.

The bases come from the Gram matrices (``Bcat^T Bcat = V diag(lam) V^T``) computed in float64, with
directions whose singular value falls below ``rcond`` times the largest dropped, so adapters that
share directions (a rank-deficient Gram) are handled. ``Q_B`` is never formed: it is
``Bcat @ basis_B``, and factors are lifted from the core with :func:`lift`.

References:
    Panariello et al., "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CompressedLora", "LoraCore", "LoraStack", "compress", "compress_many", "lift"]


@dataclass(frozen=True)
class LoraStack:
    """N LoRA adapters on a batch of modules of one shape.

    ``T[b, :, :, i] = scales[b, i] * lora_B[i][b] @ lora_A[i][b]``.

    Attributes:
        lora_A: N tensors of shape ``(batch, r_i, d_in)``.
        lora_B: N tensors of shape ``(batch, d_out, r_i)``.
        scales: ``(batch, N)`` scaling of each adapter (``lora_alpha / r``, times merge weights if
            wanted). A 1-D ``(N,)`` tensor or a sequence of floats is broadcast over the batch.
    """

    lora_A: tuple[Tensor, ...]
    lora_B: tuple[Tensor, ...]
    scales: Tensor

    def __init__(self, lora_A: Sequence[Tensor], lora_B: Sequence[Tensor], scales: Tensor | Sequence[float]):
        lora_A, lora_B = tuple(lora_A), tuple(lora_B)
        if not lora_A or len(lora_A) != len(lora_B):
            raise ValueError(
                f"Expected the same positive number of lora_A and lora_B tensors, got {len(lora_A)} and "
                f"{len(lora_B)}"
            )
        batch, d_in = lora_A[0].shape[0], lora_A[0].shape[-1]
        d_out = lora_B[0].shape[1]
        for i, (a, b) in enumerate(zip(lora_A, lora_B, strict=True)):
            if a.ndim != 3 or b.ndim != 3:
                raise ValueError(
                    f"Adapter {i}: lora_A and lora_B must be 3-D (batch, r, d_in) and (batch, d_out, r), "
                    f"got shapes {tuple(a.shape)} and {tuple(b.shape)}"
                )
            if a.shape[0] != batch or b.shape[0] != batch or a.shape[2] != d_in or b.shape[1] != d_out:
                raise ValueError(
                    f"Adapter {i}: shapes {tuple(a.shape)} / {tuple(b.shape)} do not match the first "
                    f"adapter's (batch={batch}, d_out={d_out}, d_in={d_in})"
                )
            if a.shape[1] != b.shape[2]:
                raise ValueError(f"Adapter {i}: lora_A rank {a.shape[1]} != lora_B rank {b.shape[2]}")
        scales = torch.as_tensor(scales, dtype=torch.float64)
        if scales.ndim == 1:
            scales = scales.expand(batch, -1)
        if scales.shape != (batch, len(lora_A)):
            raise ValueError(
                f"scales must have shape ({len(lora_A)},) or ({batch}, {len(lora_A)}), "
                f"got {tuple(scales.shape)}"
            )
        object.__setattr__(self, "lora_A", lora_A)
        object.__setattr__(self, "lora_B", lora_B)
        object.__setattr__(self, "scales", scales)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(a.shape[1] for a in self.lora_A)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, d_out, d_in, N)`` of the (never formed) dense tensor."""
        return (self.lora_A[0].shape[0], self.lora_B[0].shape[1], self.lora_A[0].shape[2], len(self.lora_A))

    def to(self, device: torch.device | str) -> LoraStack:
        """The same stack with every tensor on ``device`` (scales included)."""
        return LoraStack(
            [a.to(device) for a in self.lora_A], [b.to(device) for b in self.lora_B], self.scales.to(device)
        )

    def cat_B(self) -> Tensor:
        """``Bcat``: ``(batch, d_out, M)``."""
        return torch.cat(self.lora_B, dim=2)

    def cat_A(self) -> Tensor:
        """``Acat``: ``(batch, M, d_in)``."""
        return torch.cat(self.lora_A, dim=1)

    def to_dense(self) -> Tensor:
        """The dense ``(batch, d_out, d_in, N)`` tensor. For tests and small shapes only."""
        slices = [
            self.scales[:, i, None, None].to(b.dtype) * (b @ a)
            for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B, strict=True))
        ]
        return torch.stack(slices, dim=-1)


@dataclass(frozen=True)
class LoraCore:
    """The exact core of a LoRA stack, kept factored as a Kruskal tensor of rank ``M``.

    ``G[b, :, :, i] = left[b][:, blk_i] @ right[b][:, blk_i].T``.

    Attributes:
        left: ``(batch, M, M)``, ``R_B diag(s)``.
        right: ``(batch, M, M)``, ``R_A``.
        ranks: ``(r_1, ..., r_N)``; ``blk_i`` are the columns ``sum(ranks[:i]) : sum(ranks[:i+1])``.
    """

    left: Tensor
    right: Tensor
    ranks: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, M, M, N)``."""
        return (self.left.shape[0], self.left.shape[1], self.right.shape[1], len(self.ranks))

    def indicator(self) -> Tensor:
        """``E``: ``(N, M)`` with ``E[i, m] = 1`` when column ``m`` belongs to adapter ``i``."""
        task = torch.repeat_interleave(torch.arange(len(self.ranks)), torch.tensor(self.ranks))
        return torch.nn.functional.one_hot(task, len(self.ranks)).T.to(self.left)

    def to_dense(self) -> Tensor:
        """The dense core ``(batch, M, M, N)``. For tests and small shapes only."""
        return torch.einsum("bim,bjm,km->bijk", self.left, self.right, self.indicator())

    @staticmethod
    def cat(cores: Sequence[LoraCore]) -> LoraCore:
        """Concatenate cores of the same ranks along the batch dimension."""
        ranks = {core.ranks for core in cores}
        if len(ranks) != 1:
            raise ValueError(f"Cores of different ranks cannot be batched together: {sorted(ranks)}")
        return LoraCore(
            left=torch.cat([c.left for c in cores]),
            right=torch.cat([c.right for c in cores]),
            ranks=ranks.pop(),
        )


@dataclass(frozen=True)
class CompressedLora:
    """A LoRA stack written as ``T = (Bcat @ basis_B, Acat^T @ basis_A, I) . core``.

    Attributes:
        core: The exact core, see :class:`LoraCore`.
        basis_B: ``(batch, M, M)``; ``Q_B = Bcat @ basis_B`` has orthonormal (or zero) columns.
        basis_A: ``(batch, M, M)``; ``Q_A = Acat^T @ basis_A`` likewise.
        rank_B: ``(batch,)`` number of directions kept for ``Bcat`` (``M`` unless rank-deficient).
        rank_A: ``(batch,)`` likewise for ``Acat``.
    """

    core: LoraCore
    basis_B: Tensor
    basis_A: Tensor
    rank_B: Tensor
    rank_A: Tensor


def _eigh_basis(gram: Tensor, rcond: float) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``X = Q R`` from ``gram = X^T X`` (float64, ``(batch, M, M)``) by an eigendecomposition.

    Returns ``basis`` with ``Q = X @ basis``, ``r_factor`` with ``X ~= Q @ r_factor`` (exact up to the
    dropped directions) and the number of kept directions. Dropped directions get zero columns in
    ``basis`` and zero rows in ``r_factor``, so every shape stays ``M x M``.
    """
    eigvals, eigvecs = torch.linalg.eigh(gram)
    cutoff = rcond * eigvals[:, -1:].clamp_min(0)
    keep = eigvals > cutoff.clamp_min(torch.finfo(gram.dtype).tiny)
    root = torch.where(keep, eigvals.clamp_min(0).sqrt(), torch.zeros_like(eigvals))
    inv_root = torch.where(keep, 1.0 / torch.where(keep, root, torch.ones_like(root)), torch.zeros_like(root))
    basis = eigvecs * inv_root[:, None, :]
    r_factor = root[:, :, None] * eigvecs.mT
    return basis, r_factor, keep.sum(dim=1)


def _equilibrated_gram(x: Tensor, *, rows: bool, exact: bool = False) -> tuple[Tensor, Tensor]:
    """Gram matrix of ``x``'s columns (or rows) after scaling each to unit norm, and the norms.

    ``x`` is ``(batch, d, M)`` (columns) or ``(batch, M, d)`` (rows). The product runs in the input's
    precision (float32 at least; float64 when ``exact``); the scaling is applied to the small Gram
    matrix (exact), the result is float64. Zero columns keep a norm of 1.
    """
    work = torch.float64 if exact else torch.promote_types(x.dtype, torch.float32)
    x = x.to(work)
    gram = (x @ x.mT if rows else x.mT @ x).to(torch.float64)
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return gram / (norms[:, :, None] * norms[:, None, :]), norms


def _bases(
    gram: Tensor,
    norms: Tensor,
    exact_gram: Callable[[Tensor], tuple[Tensor, Tensor]],
    gram_dtype: torch.dtype,
    rcond: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Bases of a batch of concatenated factors from their equilibrated Gram matrices.

    Cholesky (``R = L^T``) where the Gram is well conditioned for the precision it was computed in;
    elsewhere (shared directions, zero adapters) the float64 Gram and column norms from
    ``exact_gram(index)`` and an eigendecomposition with cutoff ``rcond``. The equilibration is undone
    at the end, with the norms of the same precision as the Gram that was factorised.
    """
    chol, info = torch.linalg.cholesky_ex(gram)
    diag = chol.diagonal(dim1=-2, dim2=-1)
    ratio = (diag.amin(dim=-1) / diag.amax(dim=-1).clamp_min(1e-300)).square()
    ok = (info == 0) & (ratio >= _CHOLESKY_MIN_RATIO[gram_dtype])
    r_factor = chol.mT.contiguous()
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
    basis = torch.linalg.solve_triangular(torch.where(ok[:, None, None], r_factor, eye), eye, upper=True)
    rank = torch.full(info.shape, gram.shape[-1], dtype=torch.long, device=info.device)
    if not ok.all():
        index = (~ok).nonzero().squeeze(1)
        exact, exact_norms = exact_gram(index)
        basis[index], r_factor[index], rank[index] = _eigh_basis(exact, rcond)
        norms = norms.clone()
        norms[index] = exact_norms
    return basis / norms[:, :, None], r_factor * norms[:, None, :], rank


# A Cholesky basis from a Gram in this precision is used when (min/max diagonal of L)^2 is at least
# this, i.e. the equilibrated factors have condition <~ 10 (float32) or <~ 1e4 (float64): the basis is
# then orthonormal to ~1e-5 / ~1e-8. Otherwise the exact eigendecomposition path is taken.
_CHOLESKY_MIN_RATIO = {torch.float32: 1e-2, torch.float64: 1e-8}


def _default_rcond(m: int) -> float:
    return 1e3 * m * torch.finfo(torch.float64).eps


def _compress_factors(stacks: Sequence[LoraStack], rcond: float | None) -> CompressedLora:
    """Core and bases of stacks of the same ranks, batched along the first dimension.

    ``Bcat`` / ``Acat`` are formed one stack at a time and only their Gram matrices are kept, so
    memory stays at one stack's worth; the small factorisations run batched.
    """
    ranks = stacks[0].ranks
    m = sum(ranks)
    rcond = _default_rcond(m) if rcond is None else rcond
    sizes = [stack.shape[0] for stack in stacks]
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    gram_dtype = torch.promote_types(stacks[0].lora_A[0].dtype, torch.float32)
    parts = []
    for cat, rows in ((LoraStack.cat_B, False), (LoraStack.cat_A, True)):
        grams, norms = zip(*(_equilibrated_gram(cat(stack), rows=rows) for stack in stacks), strict=True)

        def exact_gram(index: Tensor, cat=cat, rows=rows) -> tuple[Tensor, Tensor]:
            grams, norms = [], []
            for i in index.tolist():
                piece = next(p for p in range(len(stacks)) if offsets[p] <= i < offsets[p + 1])
                x = cat(stacks[piece])[i - offsets[piece] : i - offsets[piece] + 1]
                gram, norm = _equilibrated_gram(x, rows=rows, exact=True)
                grams.append(gram)
                norms.append(norm)
            return torch.cat(grams), torch.cat(norms)

        parts.append(_bases(torch.cat(grams), torch.cat(norms), exact_gram, gram_dtype, rcond))
    (basis_B, r_B, rank_B), (basis_A, r_A, rank_A) = parts
    scales = torch.cat([stack.scales for stack in stacks]).to(r_B)
    column_scales = torch.repeat_interleave(scales, torch.tensor(ranks, device=r_B.device), dim=1)
    core = LoraCore(left=r_B * column_scales[:, None, :], right=r_A, ranks=ranks)
    return CompressedLora(core=core, basis_B=basis_B, basis_A=basis_A, rank_B=rank_B, rank_A=rank_A)


@torch.no_grad()
def compress(stack: LoraStack, *, rcond: float | None = None) -> CompressedLora:
    """Compute the exact core of a LoRA stack.

    Cost: ``O((d_out + d_in) M^2)`` for the two Gram matrices (in the adapters' precision, float32 at
    least) plus ``O(M^3)`` in float64; memory ``O(M^2)`` per batch element beyond the inputs.
    Bases come from a Cholesky factorisation of the equilibrated Gram matrices where that is well
    conditioned, else from a float64 eigendecomposition that drops directions below ``rcond``.

    Args:
        stack: The adapters.
        rcond: Relative cutoff on the float64 Gram eigenvalues (squared singular values of the
            column-normalised factors) in the eigendecomposition path. Default ``1e3 * M * eps``.

    Returns:
        The :class:`CompressedLora`, float64 on the inputs' device.

    Example:
        >>> A = [torch.randn(1, 4, 30), torch.randn(1, 2, 30)]
        >>> B = [torch.randn(1, 20, 4), torch.randn(1, 20, 2)]
        >>> c = compress(LoraStack(A, B, scales=[0.5, 2.0]))
        >>> c.core.shape
        (1, 6, 6, 2)
    """
    return _compress_factors([stack], rcond)


@torch.no_grad()
def compress_many(stacks: Sequence[LoraStack], *, rcond: float | None = None) -> CompressedLora:
    """:func:`compress` for stacks of the same ranks (any shapes), batched along the first dimension.

    The Gram matrices are formed one stack at a time, so memory stays at one stack's worth.
    """
    ranks = {stack.ranks for stack in stacks}
    if len(ranks) != 1:
        raise ValueError(f"compress_many needs stacks of the same ranks, got {sorted(ranks)}")
    return _compress_factors(stacks, rcond)


@torch.no_grad()
def lift(
    core_factor: Tensor,
    cat: Tensor,
    basis: Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    rows: bool = False,
) -> Tensor:
    """Lift a core-space factor to the adapters' space: ``cat @ (basis @ core_factor)``.

    Args:
        core_factor: ``(batch, M, R)`` factor in core coordinates.
        cat: ``Bcat`` ``(batch, d_out, M)`` for mode 1, or ``Acat^T`` ``(batch, d_in, M)`` for mode 2;
            with ``rows=True``, ``Acat`` ``(batch, M, d_in)``.
        basis: The matching ``basis_B`` or ``basis_A`` ``(batch, M, M)``.
        out_dtype: Result dtype (default: ``cat``'s dtype, promoted to at least float32).
        rows: Return the lifted factor transposed, ``(basis @ core_factor)^T @ Acat``, written as
            rows (a ``lora_A`` layout) instead of a transposed view.

    Returns:
        ``(batch, d, R)``, or ``(batch, R, d)`` with ``rows=True``.
    """
    work = torch.promote_types(cat.dtype, torch.float32)
    small = (basis @ core_factor.to(basis.dtype)).to(work)
    lifted = small.mT @ cat.to(work) if rows else cat.to(work) @ small
    return lifted.to(out_dtype or work)

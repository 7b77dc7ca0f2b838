"""Initial factors for CP-ALS: ``svd``, ``random`` and ``gevd``.

All three work on either tensor form of :mod:`peft_cp_merge.engine.operators` and return unit-norm
columns. Random numbers come from a CPU ``torch.Generator`` seeded with ``seed``, so the same seed
gives the same start on every device.

``gevd`` is the algebraic CP solution used by Tensorlab's ``cpd_gevd`` (Sanchez & Kowalski 1990;
Domanov & De Lathauwer 2014): project onto the leading ``R``-dimensional mode-1 and mode-2
subspaces, take two random mixtures ``W1, W2`` of the projected frontal slices; the eigenvectors of
``W1 W2^-1`` are the mode-1 factor, and each component's mode-2 and mode-3 vectors follow from a
rank-1 fit. It is exact on tensors of CP rank ``<= R`` and lands near the optimum on noisy ones,
where plain ALS from an SVD start can need thousands of iterations (``docs/design.md`` section 3). It needs
``R <= I``, ``R <= J`` and ``K >= 2``; elsewhere, or for batch elements where it breaks down
(singular mixtures), it falls back to ``svd``. (For a LoRA core with ``R >= M`` :func:`.cp_als`
needs no start at all: the core's own factors are an exact CP.)

The leading subspaces come from ``eigh`` of the unfolding's Gram matrix for short modes. From
``RANDOMIZED_MIN_DIM`` rows on (a core of many adapters, ``M = sum r_i`` in the thousands) they come
from a randomized subspace iteration (Halko, Martinsson & Tropp 2011, algorithm 4.4) on products with
the Gram matrix, ``O(M^2 R)`` each, instead of forming it and its ``O(M^3)`` eigendecomposition. Its
subspace is exact where the unfolding has rank ``<= R + OVERSAMPLE``, so ``gevd`` stays exact there.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .operators import DenseForm, Factors, KruskalCoreForm

logger = logging.getLogger(__name__)

INITS = ("gevd", "svd", "random")
RANDOMIZED_MIN_DIM = 768
OVERSAMPLE = 10
POWER_ITERATIONS = 3


def _normalize_columns(x: Tensor) -> Tensor:
    return x / x.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)


def _leading_eigvecs(gram: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """Top-``rank`` eigenvectors of a batch of PSD matrices, padded with random unit columns."""
    _, vecs = torch.linalg.eigh(gram)
    top = vecs.flip(-1)[..., :rank]
    missing = rank - top.shape[-1]
    if missing > 0:
        pad = _normalize_columns(_randn((*gram.shape[:-1], missing), generator, gram))
        top = torch.cat([top, pad], dim=-1)
    return top


def _leading_subspace(
    form: DenseForm | KruskalCoreForm, mode: int, rank: int, generator: torch.Generator
) -> Tensor:
    """Top-``rank`` left singular vectors of the mode-``mode`` unfolding, ``(batch, I_mode, rank)``."""
    batch, dim = form.shape[0], form.shape[mode + 1]
    width = rank + OVERSAMPLE
    if dim < RANDOMIZED_MIN_DIM or 2 * width > dim:
        return _leading_eigvecs(form.unfolding_gram(mode), rank, generator)
    like = form.tensor if isinstance(form, DenseForm) else form.left
    basis = _randn((batch, dim, width), generator, like)
    for _ in range(POWER_ITERATIONS + 1):
        basis = torch.linalg.qr(form.unfolding_gram_times(mode, basis)).Q
    _, vecs = torch.linalg.eigh(basis.mT @ form.unfolding_gram_times(mode, basis))
    return basis @ vecs.flip(-1)[..., :rank]


def svd_init(form: DenseForm | KruskalCoreForm, rank: int, generator: torch.Generator) -> Factors:
    """Leading left singular vectors of each unfolding (random columns where a mode is too short)."""
    return tuple(_leading_subspace(form, mode, rank, generator) for mode in range(3))


def random_init(form: DenseForm | KruskalCoreForm, rank: int, generator: torch.Generator) -> Factors:
    """Standard normal factors with unit columns (in core coordinates for a core form)."""
    batch, *dims = form.shape
    like = form.tensor if isinstance(form, DenseForm) else form.left
    return tuple(_normalize_columns(_randn((batch, dim, rank), generator, like)) for dim in dims)


def _real_eigenvectors(matrix: Tensor) -> Tensor:
    """Eigenvectors of real matrices as a real basis: ``Re v`` / ``Im v`` for a conjugate pair."""
    eigvals, eigvecs = torch.linalg.eig(matrix)
    take_imag = (eigvals.imag < 0)[..., None, :]
    return torch.where(take_imag, eigvecs.imag, eigvecs.real)


def gevd_init(form: DenseForm | KruskalCoreForm, rank: int, generator: torch.Generator) -> Factors:
    """Algebraic initialisation by a generalised eigenvalue decomposition; see the module docstring."""
    batch, dim1, dim2, dim3 = form.shape
    if rank > min(dim1, dim2) or dim3 < 2:
        logger.debug("gevd init needs R <= I, J and K >= 2 (R=%d, shape %s); using svd", rank, form.shape)
        return svd_init(form, rank, generator)
    u1 = _leading_subspace(form, 0, rank, generator)
    u2 = _leading_subspace(form, 1, rank, generator)
    fallback = (u1, u2, _leading_subspace(form, 2, rank, generator))
    projected = form.project(u1, u2)  # (batch, R, R, K)
    mixtures = _randn((dim3, 2), generator, projected)
    w1, w2 = (projected @ mixtures).unbind(-1)
    solved, info = torch.linalg.solve_ex(w2.mT, w1.mT)  # (W1 W2^-1)^T
    ok = info == 0
    solved = torch.where(ok[:, None, None], solved, torch.eye(rank).to(solved).expand_as(solved))
    a_small = _normalize_columns(_real_eigenvectors(solved.mT))
    a_inv, info = torch.linalg.inv_ex(a_small)
    ok &= info == 0
    # Each component r: rows of A^-1 . S give the rank-1 matrix b_r c_r^T (R x K).
    per_component = torch.einsum("brs,bsjk->brjk", a_inv, projected)
    u, s, vh = torch.linalg.svd(per_component, full_matrices=False)
    b_small = u[..., 0] * s[..., :1]  # (batch, R(comp), R(dim))
    c = vh[..., 0, :]  # (batch, R(comp), K)
    factors = (
        _normalize_columns(u1 @ a_small),
        _normalize_columns(u2 @ b_small.mT),
        _normalize_columns(c.mT),
    )
    finite = torch.stack([f.isfinite().all(dim=(1, 2)) for f in factors]).all(dim=0)
    ok &= finite
    if not ok.all():
        logger.debug("gevd init broke down for %d of %d batch elements; using svd there", (~ok).sum(), batch)
    keep = ok[:, None, None]
    return tuple(torch.where(keep, f.nan_to_num(), g) for f, g in zip(factors, fallback, strict=True))


def initialize(form: DenseForm | KruskalCoreForm, rank: int, *, init: str, seed: int) -> Factors:
    """Dispatch to one of :data:`INITS`."""
    generator = torch.Generator().manual_seed(seed)
    if init == "gevd":
        return gevd_init(form, rank, generator)
    if init == "svd":
        return svd_init(form, rank, generator)
    if init == "random":
        return random_init(form, rank, generator)
    raise ValueError(f"Unknown init {init!r}; expected one of {sorted(INITS)}")

"""The two forms of a batch of third-order tensors that CP-ALS runs on.

Both expose the same small interface, so the ALS loop and the initialisations never look inside:

- :class:`DenseForm`: an explicit ``(batch, I, J, K)`` tensor.
- :class:`KruskalCoreForm`: the factored core of a LoRA stack (see :mod:`peft_cp_merge.engine.compression`),
  ``X = [[P1, P2, E]]`` with ``P1 = left (batch, I, M)``, ``P2 = right (batch, J, M)`` and ``E`` the
  ``(K, M)`` adapter indicator. Every operation costs ``O(M^2 R)`` or ``O(M^3)``, never ``I * J * K``.

Conventions: ``factors`` is a 3-tuple ``(A (batch, I, R), B (batch, J, R), C (batch, K, R))`` and the
model is ``X_hat = sum_r weights[:, r] a_r o b_r o c_r``. Everything is float64 (or the dtype asked for).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .compression import LoraCore

Factors = tuple[Tensor, Tensor, Tensor]


# Below this relative error the cheap identity ||X||^2 + ||X_hat||^2 - 2<X, X_hat> loses its digits to
# cancellation (about sqrt(eps) = 1e-8 in float64), and the exact residual is computed instead.
EXACT_ERROR_BELOW = 1e-5


class DenseForm:
    """An explicit batch of tensors ``(batch, I, J, K)``."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.tensor.shape)

    def select(self, index: Tensor) -> DenseForm:
        return DenseForm(self.tensor[index])

    def norm_sq(self) -> Tensor:
        return self.tensor.square().sum(dim=(1, 2, 3))

    def to_working(self, factors: Factors) -> tuple[list[Tensor], list[Tensor | None], list[Tensor]]:
        """ALS working state from core-coordinate factors: (factors, projections, Gram matrices)."""
        return list(factors), [None, None, None], [f.mT @ f for f in factors]

    def from_working(self, state: list[Tensor]) -> Factors:
        return tuple(state)

    def metric(self, factor: Tensor, mode: int) -> tuple[Tensor, None]:
        """``F^T F`` of a freshly updated factor (and no projection to remember)."""
        return factor.mT @ factor, None

    def mttkrp(self, factors: Factors, mode: int, projections=None) -> Tensor:
        """``X_(mode) (khatri-rao of the other factors)``: ``(batch, I_mode, R)``."""
        a, b, c = factors
        if mode == 0:
            return torch.einsum("bijk,bjr,bkr->bir", self.tensor, b, c)
        if mode == 1:
            return torch.einsum("bijk,bir,bkr->bjr", self.tensor, a, c)
        return torch.einsum("bijk,bir,bjr->bkr", self.tensor, a, b)

    def _unfolding(self, mode: int) -> Tensor:
        """``X_(mode)``: ``(batch, I_mode, product of the other dims)``."""
        return self.tensor.movedim(mode + 1, 1).flatten(start_dim=2)

    def unfolding_gram(self, mode: int) -> Tensor:
        """``X_(mode) X_(mode)^T``: ``(batch, I_mode, I_mode)``."""
        unfolded = self._unfolding(mode)
        return unfolded @ unfolded.mT

    def unfolding_gram_times(self, mode: int, x: Tensor) -> Tensor:
        """``X_(mode) X_(mode)^T x`` for ``x`` of shape ``(batch, I_mode, k)``, without the Gram."""
        unfolded = self._unfolding(mode)
        return unfolded @ (unfolded.mT @ x)

    def project(self, u1: Tensor, u2: Tensor) -> Tensor:
        """``X x_1 u1^T x_2 u2^T``: ``(batch, R1, R2, K)``."""
        return torch.einsum("bijk,bir,bjs->brsk", self.tensor, u1, u2)

    def final_residual_sq(self, weights: Tensor, factors: Factors) -> Tensor:
        return self.residual_sq(weights, factors)

    def residual_sq(self, weights: Tensor, factors: Factors) -> Tensor:
        """Exact ``||X - X_hat||^2`` per batch element."""
        a, b, c = factors
        rebuilt = torch.einsum("br,bir,bjr,bkr->bijk", weights, a, b, c)
        return (self.tensor - rebuilt).square().sum(dim=(1, 2, 3))


class KruskalCoreForm:
    """The factored core of a LoRA stack; see the module docstring."""

    def __init__(self, core: LoraCore, dtype: torch.dtype = torch.float64):
        self.left = core.left.to(dtype)
        self.right = core.right.to(dtype)
        self.ranks = core.ranks
        self.indicator = core.indicator().to(self.left)
        self._grams: tuple[Tensor, Tensor] | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.left.shape[0], self.left.shape[1], self.right.shape[1], len(self.ranks))

    def select(self, index: Tensor) -> KruskalCoreForm:
        out = KruskalCoreForm.__new__(KruskalCoreForm)
        out.left, out.right, out.ranks, out.indicator = (
            self.left[index],
            self.right[index],
            self.ranks,
            self.indicator,
        )
        out._grams = None if self._grams is None else (self._grams[0][index], self._grams[1][index])
        return out

    def _input_grams(self) -> tuple[Tensor, Tensor]:
        """``P1^T P1`` and ``P2^T P2`` (``(batch, M, M)``), computed once."""
        if self._grams is None:
            self._grams = (self.left.mT @ self.left, self.right.mT @ self.right)
        return self._grams

    def exact_decomposition(self, rank: int) -> tuple[Tensor, Factors]:
        """The core's own rank-``M`` CP (weights 1), padded with zero components to ``rank >= M``.

        A rank-``M`` CP of the core is not unique within one adapter's block (its ``r_i`` components
        share the loading ``e_i``: any basis of its delta's column and row spaces fits). Each block
        is given its delta's singular vectors, so the components do not depend on how the adapter
        happens to split ``B_i A_i`` (``B_i Q``, ``Q^-1 A_i`` gives the same ones) and are orthogonal
        within an adapter: what ``whiten`` and ``isotropic`` act on at full rank.
        """
        batch, m = self.left.shape[0], self.left.shape[2]
        left, right = self.left.clone(), self.right.clone()
        start = 0
        for r in self.ranks:
            block = slice(start, start + r)
            q_left, r_left = torch.linalg.qr(self.left[..., block])
            q_right, r_right = torch.linalg.qr(self.right[..., block])
            u, s, vh = torch.linalg.svd(r_left @ r_right.mT)
            left[..., block] = q_left @ (u * s[..., None, :])
            right[..., block] = q_right @ vh.mT
            start += r
        factors = (left, right, self.indicator.expand(batch, -1, -1))
        factors = tuple(torch.nn.functional.pad(f, (0, rank - m)) for f in factors)
        weights = torch.nn.functional.pad(torch.ones(batch, m).to(self.left), (0, rank - m))
        return weights, factors

    def _task_mask(self) -> Tensor:
        """``E^T E``: 1 where two columns belong to the same adapter."""
        return self.indicator.mT @ self.indicator

    def norm_sq(self) -> Tensor:
        g1, g2 = self._input_grams()
        return (g1 * g2 * self._task_mask()).sum(dim=(1, 2))

    # The ALS works in coefficient space for modes 0 and 1: a = left @ alpha, b = right @ beta. Every
    # update then needs one O(M^2 R) product (the projection left^T a = (left^T left) alpha) instead
    # of two, and the projections are carried along as working state.

    def to_working(self, factors: Factors) -> tuple[list[Tensor], list[Tensor | None], list[Tensor]]:
        """ALS working state from core-coordinate factors: (factors, projections, Gram matrices).

        Modes 0 and 1 keep the start factors as placeholders: each is overwritten by coefficients at
        its first update, before anything reads it; only their projections and Grams are used.
        """
        a, b, _ = factors
        projections = [self.left.mT @ a, self.right.mT @ b, None]
        return list(factors), projections, [f.mT @ f for f in factors]

    def from_working(self, state: list[Tensor]) -> Factors:
        return (self.left @ state[0], self.right @ state[1], state[2])

    def metric(self, factor: Tensor, mode: int) -> tuple[Tensor, Tensor | None]:
        """``F^T F`` of a freshly updated factor in true coordinates, and its projection ``P^T F``."""
        if mode == 2:
            return factor.mT @ factor, None
        projection = self._input_grams()[mode] @ factor
        return factor.mT @ projection, projection

    def mttkrp(self, factors: Factors, mode: int, projections=None) -> Tensor:
        """MTTKRP in working coordinates: coefficient space for modes 0 and 1 (``left^-1`` applied)."""
        proj_a, proj_b, _ = projections
        if mode == 2:
            return torch.einsum("km,bmr->bkr", self.indicator, proj_a * proj_b)
        proj_c = torch.einsum("km,bkr->bmr", self.indicator, factors[2])
        return (proj_b if mode == 0 else proj_a) * proj_c

    def unfolding_gram(self, mode: int) -> Tensor:
        g1, g2 = self._input_grams()
        mask = self._task_mask()
        if mode == 0:
            return self.left @ (g2 * mask) @ self.left.mT
        if mode == 1:
            return self.right @ (g1 * mask) @ self.right.mT
        return self.indicator @ (g1 * g2) @ self.indicator.mT

    def unfolding_gram_times(self, mode: int, x: Tensor) -> Tensor:
        """``X_(mode) X_(mode)^T x`` in ``O(M^2 k)`` for ``x`` of shape ``(batch, I_mode, k)``."""
        if mode == 2:
            return self.unfolding_gram(2) @ x
        g1, g2 = self._input_grams()
        factor = self.left if mode == 0 else self.right
        other = g2 if mode == 0 else g1
        return factor @ ((other * self._task_mask()) @ (factor.mT @ x))

    def project(self, u1: Tensor, u2: Tensor) -> Tensor:
        return torch.einsum("brm,bsm,km->brsk", u1.mT @ self.left, u2.mT @ self.right, self.indicator)

    def final_residual_sq(self, weights: Tensor, factors: Factors) -> Tensor:
        """``||X - X_hat||^2`` from ``||X||^2 + ||X_hat||^2 - 2 <X, X_hat>`` (``O(M^2 R)``), and from
        :meth:`residual_sq` where that formula would lose digits (relative error below 1e-5)."""
        a, b, c = factors
        norm_sq = self.norm_sq()
        proj = (self.left.mT @ a) * (self.right.mT @ b) * torch.einsum("km,bkr->bmr", self.indicator, c)
        inner = torch.einsum("bmr,br->b", proj, weights)
        residual = (norm_sq + model_norm_sq(weights, factors) - 2 * inner).clamp_min(0)
        small = residual < EXACT_ERROR_BELOW**2 * norm_sq
        if small.any():
            index = small.nonzero().squeeze(1)
            residual[index] = self.select(index).residual_sq(weights[index], tuple(f[index] for f in factors))
        return residual

    def residual_sq(self, weights: Tensor, factors: Factors) -> Tensor:
        """Exact ``||X - X_hat||^2``, slice by slice, without cancellation.

        Slice ``k`` of the residual is ``[P1_k, A diag(w c_k)] [P2_k, -B]^T`` with ``r_k + R`` columns;
        its norm is that of ``R_X R_Y^T`` from thin QRs of the two tall factors, which is computed
        to working precision even when the residual is tiny compared with ``X``. Components with a
        zero loading on slice ``k`` in every batch element are left out of that slice's factors
        (exact: their columns are zero); the exact rank-``M`` CP has ``r_k`` per slice, not ``R``.
        """
        a, b, c = factors
        batch, m = a.shape[0], self.left.shape[1]
        width = max(self.ranks)
        scaled = weights[:, None, :] * c  # (batch, K, R)
        active = [scaled[:, k, :].ne(0).any(dim=0).nonzero().squeeze(1) for k in range(len(self.ranks))]
        extra = max(len(used) for used in active)
        left_blocks = self.left.new_zeros(batch, len(self.ranks), m, width + extra)
        right_blocks = self.right.new_zeros(batch, len(self.ranks), m, width + extra)
        start = 0
        for k, (rank_k, used) in enumerate(zip(self.ranks, active, strict=True)):
            left_blocks[:, k, :, :rank_k] = self.left[:, :, start : start + rank_k]
            right_blocks[:, k, :, :rank_k] = self.right[:, :, start : start + rank_k]
            left_blocks[:, k, :, width : width + len(used)] = a[:, :, used] * scaled[:, k, None, used]
            right_blocks[:, k, :, width : width + len(used)] = -b[:, :, used]
            start += rank_k
        r_left = torch.linalg.qr(left_blocks, mode="r").R
        r_right = torch.linalg.qr(right_blocks, mode="r").R
        return (r_left @ r_right.mT).square().sum(dim=(1, 2, 3))


def factor_grams(factors: Factors) -> tuple[Tensor, Tensor, Tensor]:
    """``F^T F`` for each factor, ``(batch, R, R)``."""
    return tuple(f.mT @ f for f in factors)


def model_norm_sq(weights: Tensor, factors: Factors) -> Tensor:
    """``||X_hat||^2 = w^T (A^T A * B^T B * C^T C) w`` per batch element."""
    grams = factor_grams(factors)
    return torch.einsum("br,brs,bs->b", weights, grams[0] * grams[1] * grams[2], weights)

import pytest
import torch
from testing_utils import planted_cp, random_stack

from peft_cp_merge import cp_als
from peft_cp_merge.engine import starts as cp_init
from peft_cp_merge.engine.compression import compress
from peft_cp_merge.engine.operators import DenseForm, KruskalCoreForm


@pytest.fixture
def always_randomized(monkeypatch):
    """Routes every long-enough mode through the randomized subspace iteration."""
    monkeypatch.setattr(cp_init, "RANDOMIZED_MIN_DIM", 1)


def _forms():
    core = compress(random_stack([5, 3, 6, 4], d_out=30, d_in=28, batch=2)).core
    return [KruskalCoreForm(core), DenseForm(core.to_dense().to(torch.float64))]


@pytest.mark.parametrize("form", _forms(), ids=["core", "dense"])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_gram_products_equal_the_explicit_gram(form, mode):
    x = torch.randn(form.shape[0], form.shape[mode + 1], 3, dtype=torch.float64)
    expected = form.unfolding_gram(mode) @ x
    assert torch.allclose(form.unfolding_gram_times(mode, x), expected, rtol=1e-10, atol=1e-12)


def test_randomized_subspace_matches_eigh_where_the_spectrum_has_a_gap(always_randomized):
    gen = torch.Generator().manual_seed(0)
    # Unfolding of rank 40 whose top 4 singular values stand well clear of the rest.
    u = torch.linalg.qr(torch.randn(2, 80, 40, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(2, 60, 40, generator=gen, dtype=torch.float64)).Q
    sigma = torch.cat([torch.tensor([50.0, 40.0, 30.0, 20.0]), torch.linspace(1.0, 0.1, 36)])
    x = DenseForm(((u * sigma.to(u)) @ v.mT).reshape(2, 80, 12, 5))
    found = cp_init._leading_subspace(x, 0, 4, gen)
    exact = u[..., :4]
    projector_gap = (found @ found.mT - exact @ exact.mT).norm(dim=(1, 2))
    assert (projector_gap < 1e-8).all(), projector_gap


def test_gevd_stays_exact_through_the_randomized_subspaces(always_randomized):
    x, _ = planted_cp(2, (60, 60, 3), 6, seed=3)
    result = cp_als(x, 6, init="gevd", n_iter_max=50)
    assert (result.rel_error < 1e-12).all(), result.rel_error
    assert (result.n_iter <= 3).all()


def test_short_modes_keep_the_exact_eigendecomposition(monkeypatch):
    form = _forms()[0]

    def fail(*args, **kwargs):
        raise AssertionError("randomized path taken for a short mode")

    monkeypatch.setattr(form, "unfolding_gram_times", fail)
    gen = torch.Generator().manual_seed(0)
    assert cp_init._leading_subspace(form, 0, 4, gen).shape == (2, 18, 4)

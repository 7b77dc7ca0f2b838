import pytest
import torch
from testing_utils import planted_cp, random_stack

from peft_cp_merge import cp_als
from peft_cp_merge.engine.compression import compress


def _abs_congruence(found, planted):
    """Best |cosine| of every planted column with some found column, per batch element."""
    f = found / found.norm(dim=1, keepdim=True)
    p = planted / planted.norm(dim=1, keepdim=True)
    return (f.mT @ p).abs().amax(dim=1).amin(dim=1)


@pytest.mark.parametrize("init", ["gevd", "svd", "random"])
def test_planted_cp_tensors_are_recovered(init):
    x, planted = planted_cp(3, (10, 9, 6), 3)
    result = cp_als(x, 3, init=init, n_iter_max=500, tol=0.0 if init == "svd" else 1e-12)
    assert (result.rel_error < 1e-9).all(), result.rel_error
    for found, true in zip(result.factors, planted, strict=True):
        assert (_abs_congruence(found, true) > 1 - 1e-9).all()


def test_gevd_is_exact_where_svd_init_swamps():
    # Fewer slices than components (N=3 < R=6): the typical merge, where ALS from SVD crawls.
    x, _ = planted_cp(2, (30, 30, 3), 6, seed=3)
    gevd = cp_als(x, 6, init="gevd", n_iter_max=50)
    svd = cp_als(x, 6, init="svd", n_iter_max=50)
    assert (gevd.rel_error < 1e-12).all()
    assert (gevd.n_iter <= 3).all()
    assert (svd.rel_error > 1e-6).any()


def test_relative_error_is_exact_on_the_compressed_core():
    stack = random_stack([4, 4, 4], batch=2)
    result = cp_als(stack, 5)
    dense = stack.to_dense()
    true_error = (result.to_tensor() - dense).square().sum((1, 2, 3)).sqrt() / dense.square().sum(
        (1, 2, 3)
    ).sqrt()
    assert torch.allclose(result.rel_error, true_error, rtol=1e-10)
    assert [tuple(f.shape) for f in result.factors] == [(2, 24, 5), (2, 20, 5), (2, 3, 5)]


def test_exact_residual_skips_components_without_loading_and_stays_exact():
    # Loadings with zeros (the exact rank-M CP has them: each component lives on one slice) leave
    # those components out of a slice's residual; the result must still be the dense residual.
    from peft_cp_merge.engine.operators import KruskalCoreForm

    stack = random_stack([3, 2, 4], d_out=18, d_in=15, seed=2)
    form = KruskalCoreForm(compress(stack).core, torch.float64)
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(1, 9, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    c = torch.randn(1, 3, 5, generator=gen, dtype=torch.float64)
    c[:, 0, 1:] = 0  # slice 0 uses component 0 only, slice 2 none of components 3 and 4
    c[:, 2, 3:] = 0
    weights = torch.rand(1, 5, generator=gen, dtype=torch.float64)
    dense_core = torch.einsum("bim,bjm,km->bijk", form.left, form.right, form.indicator)
    model = torch.einsum("br,bir,bjr,bkr->bijk", weights, a, b, c)
    expected = (dense_core - model).square().sum(dim=(1, 2, 3))
    assert torch.allclose(form.residual_sq(weights, (a, b, c)), expected, rtol=1e-12)

    exact = cp_als(stack, 9)  # rank M: the core's own decomposition, residual ~0
    assert exact.rel_error[0] < 1e-12


def test_compressed_als_equals_dense_tensorly_parafac_from_the_same_init():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac

    stack = random_stack([3, 2, 4], d_out=18, d_in=15, seed=5)
    rank, n_iter = 4, 25
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(1, d, rank, generator=gen, dtype=torch.float64) for d in (18, 15, 3)]
    # The dense reference starts from the same init projected onto the adapters' column spaces.
    compressed = compress(stack)
    q_b = stack.cat_B() @ compressed.basis_B
    q_a = stack.cat_A().mT @ compressed.basis_A
    projected = [q_b @ q_b.mT @ init[0], q_a @ q_a.mT @ init[1], init[2]]

    plain = {"n_iter_max": n_iter, "tol": 0.0, "line_search": False}  # sweep for sweep as parafac
    ours = cp_als(stack, rank, init=tuple(init), **plain)
    ours_dense = cp_als(stack.to_dense(), rank, init=tuple(projected), **plain)
    tl.set_backend("numpy")
    reference = parafac(
        stack.to_dense()[0].numpy(),
        rank,
        n_iter_max=n_iter,
        init=tl.cp_tensor.CPTensor((torch.ones(rank).numpy(), [f[0].numpy() for f in projected])),
        tol=0.0,
        normalize_factors=False,
    )
    reference = torch.from_numpy(tl.cp_to_tensor(reference))[None]
    scale = reference.norm()
    assert (ours.to_tensor() - reference).norm() / scale < 1e-8
    assert (ours_dense.to_tensor() - reference).norm() / scale < 1e-8
    assert (ours.n_iter == n_iter).all()


def test_same_seed_is_bit_identical_and_another_seed_is_not():
    x, _ = planted_cp(2, (8, 7, 5), 4, seed=1)
    x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    first, again = (cp_als(x, 3, init="random", seed=11, n_iter_max=30) for _ in range(2))
    other = cp_als(x, 3, init="random", seed=12, n_iter_max=30)
    assert torch.equal(first.weights, again.weights)
    assert all(torch.equal(a, b) for a, b in zip(first.factors, again.factors, strict=True))
    assert not torch.equal(first.factors[0], other.factors[0])


def test_every_batch_element_stops_on_its_own():
    exact, _ = planted_cp(1, (9, 8, 6), 2, seed=4)
    noisy = torch.randn(1, 9, 8, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    batch = torch.cat([exact, noisy])
    result = cp_als(batch, 2, n_iter_max=300, tol=1e-10)
    assert result.n_iter[0] < result.n_iter[1]
    assert result.converged[0]
    alone = cp_als(noisy, 2, n_iter_max=300, tol=1e-10)
    assert int(alone.n_iter[0]) == int(result.n_iter[1])
    assert torch.allclose(alone.weights[0], result.weights[1], rtol=1e-10)


def test_output_is_canonical():
    x = torch.randn(2, 7, 6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = cp_als(x, 4, n_iter_max=20)
    assert (result.weights[:, :-1] >= result.weights[:, 1:]).all()
    for factor in result.factors:
        assert torch.allclose(factor.norm(dim=1), torch.ones(2, 4, dtype=torch.float64))
    for factor in result.factors[:2]:
        peak = factor.abs().argmax(dim=1, keepdim=True)
        assert (torch.gather(factor, 1, peak) > 0).all()


def test_l2_regularisation_biases_an_exact_fit():
    x, _ = planted_cp(1, (8, 8, 4), 3, seed=6)
    plain = cp_als(x, 3, l2=0.0)
    ridge = cp_als(x, 3, l2=0.1)
    assert plain.rel_error[0] < 1e-10
    assert ridge.rel_error[0] > 1e-4


def test_overfitted_rank_reports_a_large_condition_number():
    x, _ = planted_cp(1, (8, 8, 4), 2, seed=6)
    assert cp_als(x, 2).condition[0] < 1e3
    assert cp_als(x, 5, n_iter_max=50).condition[0] > 1e3


def test_zero_tensor_gives_zero_weights():
    result = cp_als(torch.zeros(2, 4, 3, 2), 2)
    assert torch.equal(result.weights, torch.zeros(2, 2))
    assert torch.equal(result.rel_error, torch.zeros(2))
    assert result.converged.all()


def test_results_come_back_in_the_input_dtype():
    x, _ = planted_cp(1, (6, 5, 4), 2)
    assert cp_als(x.float(), 2).weights.dtype == torch.float32
    result = cp_als(random_stack([2, 2], dtype=torch.bfloat16), 3)
    assert all(f.dtype == torch.bfloat16 for f in result.factors)


def test_progress_bar_can_be_shown(capsys):
    x, _ = planted_cp(1, (6, 5, 4), 2)
    cp_als(x, 2, progress=True)
    assert "CP-ALS" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"rank": 2.0}, "rank must be an integer >= 1"),
        ({"rank": True}, "rank must be an integer >= 1"),
        ({"init": "nope"}, "Unknown init 'nope'"),
        ({"n_iter_max": 0}, "n_iter_max must be"),
        ({"tol": -1.0}, "tol must be"),
        ({"tol": float("nan")}, "tol must be"),
        ({"l2": -0.5}, "l2 must be"),
        ({"seed": "1"}, "seed must be an integer"),
        ({"dtype": torch.float16}, "dtype must be"),
        ({"init": (torch.ones(1, 6, 2),) * 3}, "init factors must have shapes"),
    ],
)
def test_bad_options_are_rejected(kwargs, message):
    x, _ = planted_cp(1, (6, 5, 4), 2)
    kwargs = {"rank": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        cp_als(x, **kwargs)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.ones(3, 4, 5), "Expected a floating"),
        (torch.ones(1, 3, 4, 5, dtype=torch.long), "Expected a floating"),
        (torch.full((1, 3, 4, 5), float("nan")), "non-finite"),
        ([1, 2], "Expected a Tensor, LoraCore or LoraStack"),
    ],
)
def test_bad_tensors_are_rejected(tensor, message):
    with pytest.raises(ValueError, match=message):
        cp_als(tensor, 2)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    stack = random_stack([4, 4, 2], batch=3)
    cpu = cp_als(stack, 4, n_iter_max=40, tol=0.0)
    cuda_stack = random_stack([4, 4, 2], batch=3, device="cuda")
    gpu = cp_als(cuda_stack, 4, n_iter_max=40, tol=0.0)
    assert gpu.weights.device.type == "cuda"
    assert torch.allclose(gpu.to_tensor().cpu(), cpu.to_tensor(), rtol=1e-7, atol=1e-9)


def test_line_search_needs_fewer_sweeps_in_a_swamp_and_fits_no_worse():
    """Stacks with no low-rank CP structure make plain ALS creep; extrapolation shortens the creep."""
    stack = random_stack([4, 4, 4, 4], d_out=40, d_in=36, seed=3, batch=6)
    options = {"n_iter_max": 400, "tol": 1e-6}  # plain: 1548 sweeps, two at the cap; searched: 821
    plain = cp_als(stack, 6, line_search=False, **options)
    searched = cp_als(stack, 6, **options)
    assert searched.n_iter.sum() < 0.7 * plain.n_iter.sum()
    assert (searched.rel_error <= plain.rel_error + 1e-4).all()


def test_cp_als_leaves_the_thread_count_as_it_found_it():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cp_als(random_stack([2, 2], d_out=12, d_in=10, seed=0), 3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

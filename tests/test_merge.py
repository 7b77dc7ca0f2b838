import pytest
import torch
from testing_utils import random_stack

from peft_cp_merge.engine.compression import LoraStack
from peft_cp_merge.methods.cp import CPOptions, aggregate_loadings, default_rank, merge_modules

SUM_LIKE = CPOptions.sum_like()  # the first release's joint CP (exact: PEFT's "cat")


def _delta(merged):
    return merged.lora_B @ merged.lora_A


def _weighted_sum(stack, weights):
    scales = stack.scales[0]
    return sum(
        w * s * b[0] @ a[0] for w, s, a, b in zip(weights, scales, stack.lora_A, stack.lora_B, strict=True)
    )


def _shared_cp_stack(loadings, d_out=30, d_in=26, seed=0):
    """Adapter i is U diag(loadings[i]) V^T: the stack has the exact CP structure (U, V, loadings)."""
    gen = torch.Generator().manual_seed(seed)
    rank = loadings.shape[1]
    u = torch.randn(d_out, rank, generator=gen, dtype=torch.float64)
    v = torch.randn(d_in, rank, generator=gen, dtype=torch.float64)
    lora_A = [(v * loadings[i]).T[None] for i in range(loadings.shape[0])]
    lora_B = [u[None] for _ in range(loadings.shape[0])]
    return LoraStack(lora_A, lora_B, [1.0] * loadings.shape[0]), u, v


def test_adapters_with_a_shared_cp_structure_merge_to_the_exact_weighted_sum():
    loadings = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stack, _, _ = _shared_cp_stack(loadings)
    weights = [0.3, -1.0, 0.7]
    merged = merge_modules({"m": stack}, {"m": weights}, rank=5, options=SUM_LIKE)["m"]
    expected = _weighted_sum(stack, weights)
    assert merged.lora_A.shape == (5, 26)
    assert (_delta(merged) - expected).norm() / expected.norm() < 1e-12
    assert merged.rel_error < 1e-12


@pytest.mark.parametrize("rank", [9, 12])
def test_rank_at_least_the_total_input_rank_is_exact_and_padded(rank):
    stack = random_stack([4, 2, 3])
    merged = merge_modules({"m": stack}, {"m": [1.0, 0.5, -2.0]}, rank=rank, options=SUM_LIKE)["m"]
    expected = _weighted_sum(stack, [1.0, 0.5, -2.0])
    assert merged.lora_B.shape == (24, rank)
    assert (_delta(merged) - expected).norm() / expected.norm() < 1e-10
    assert torch.equal(merged.lora_A[9:], torch.zeros(rank - 9, 20, dtype=torch.float64))


def test_rank_at_least_the_total_rank_is_exact_when_adapters_share_directions():
    stack = random_stack([4, 4, 4])
    shared_A = [torch.cat([stack.lora_A[0][:, :2], a[:, 2:]], dim=1) for a in stack.lora_A]
    shared = LoraStack(shared_A, stack.lora_B, [1.0, 1.0, 1.0])
    merged = merge_modules({"m": shared}, {"m": [1.0, 1.0, 1.0]}, rank=16, options=SUM_LIKE)["m"]
    expected = _weighted_sum(shared, [1.0, 1.0, 1.0])
    assert (_delta(merged) - expected).norm() / expected.norm() < 1e-8


def test_a_single_adapter_reproduces_itself():
    stack = random_stack([6], scales=[2.0])
    merged = merge_modules({"m": stack}, {"m": [1.0]}, rank=6, options=SUM_LIKE)["m"]
    expected = _weighted_sum(stack, [1.0])
    assert (_delta(merged) - expected).norm() / expected.norm() < 1e-12


def test_truncated_rank_is_a_joint_low_rank_approximation():
    stack = random_stack([4, 4, 4])
    merged = merge_modules({"m": stack}, {"m": [1.0, 1.0, 1.0]}, rank=4, options=SUM_LIKE)["m"]
    assert merged.lora_A.shape == (4, 20)
    assert 0.05 < merged.fit_error < 1.0
    expected = _weighted_sum(stack, [1.0, 1.0, 1.0])
    assert merged.rel_error == pytest.approx(
        float((_delta(merged) - expected).norm() / expected.norm()), rel=1e-6
    )
    assert torch.linalg.matrix_rank(_delta(merged)) == 4


def test_disjoint_keeps_task_specific_components_at_full_strength():
    # Component 0 belongs to adapter 0 only; component 1 is shared equally by both adapters.
    loadings = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    stack, u, v = _shared_cp_stack(loadings)
    weights = [1.0, 1.0]
    disjoint, weighted = (
        merge_modules({"m": stack}, {"m": weights}, rank=2, options=CPOptions.sum_like(aggregation=a))["m"]
        for a in ("disjoint", "weighted")
    )
    # weighted = the sum: component 0 once, component 1 twice; disjoint: both once.
    sum_expected = torch.outer(u[:, 0], v[:, 0]) + 2 * torch.outer(u[:, 1], v[:, 1])
    disjoint_expected = torch.outer(u[:, 0], v[:, 0]) + torch.outer(u[:, 1], v[:, 1])
    assert torch.allclose(_delta(weighted), sum_expected, atol=1e-10)
    assert torch.allclose(_delta(disjoint), disjoint_expected, atol=1e-10)


def test_disjoint_drops_loadings_against_the_elected_sign():
    weights = torch.tensor([[2.0]], dtype=torch.float64)
    loadings = torch.tensor([[[0.8], [-0.6]]], dtype=torch.float64)
    gains = aggregate_loadings(weights, loadings, torch.tensor([[1.0, 1.0]], dtype=torch.float64), "disjoint")
    assert torch.allclose(gains, torch.tensor([[1.6]], dtype=torch.float64))
    weighted = aggregate_loadings(
        weights, loadings, torch.tensor([[1.0, 1.0]], dtype=torch.float64), "weighted"
    )
    assert torch.allclose(weighted, torch.tensor([[0.4]], dtype=torch.float64))


def test_disjoint_drops_contributions_below_a_tenth_of_the_largest():
    # Contributions w_i * C[i, r] (not the loadings alone) are compared with 10 % of the largest one:
    # a known answer per component, with values below, above and exactly at the threshold.
    lambdas = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    merge_weights = torch.tensor([[2.0, 1.0, 0.5]], dtype=torch.float64)
    loadings = torch.tensor(
        [[[0.5, -0.5, 0.2], [0.5, -0.11, 1.0], [0.18, -0.1, 0.2]]], dtype=torch.float64
    )  # contributions: [1.0, 0.5, 0.09], [-1.0, -0.11, -0.05], [0.4, 1.0, 0.1]
    gains = aggregate_loadings(lambdas, loadings, merge_weights, "disjoint")
    expected = [
        1.0 * (1.0 + 0.5) / 2,  # 0.09 < 0.1 dropped (its loading 0.18 alone would pass)
        2.0 * (-1.0 - 0.11) / 2,  # 0.11 kept, 0.05 dropped
        3.0 * (0.4 + 1.0 + 0.1) / 3,  # "at least" 10 %: exactly 0.1 is kept
    ]
    assert gains[0].tolist() == pytest.approx(expected, rel=1e-12)


def test_modules_of_different_core_shapes_are_batched_separately_with_the_same_result():
    stacks = {
        "a": random_stack([3, 3], seed=1),
        "b": random_stack([2, 4], seed=2),
        "c": random_stack([3, 3], seed=3),
    }
    weights = {name: [0.5, 1.5] for name in stacks}
    together = merge_modules(stacks, weights, rank=3)
    for name, stack in stacks.items():
        alone = merge_modules({name: stack}, {name: weights[name]}, rank=3)[name]
        assert torch.allclose(_delta(alone), _delta(together[name]), atol=1e-10)


def test_a_small_memory_budget_splits_the_batch_without_changing_results(monkeypatch):
    import peft_cp_merge.methods.cp as merge_module

    stacks = {f"m{i}": random_stack([3, 3], seed=i) for i in range(5)}
    weights = {name: [1.0, 0.5] for name in stacks}
    calls = []
    real_cp_als = merge_module.cp_als

    def counting_cp_als(core, *args, **kwargs):
        calls.append(core.shape[0])
        return real_cp_als(core, *args, **kwargs)

    monkeypatch.setattr(merge_module, "cp_als", counting_cp_als)
    whole = merge_modules(stacks, weights, rank=4, options=CPOptions(tol=1e-12))
    chunked = merge_modules(
        stacks, weights, rank=4, options=CPOptions(tol=1e-12), max_core_bytes=2 * 4 * 36 * 8
    )
    assert calls == [5, 2, 2, 1]
    for name in stacks:
        assert torch.allclose(_delta(whole[name]), _delta(chunked[name]), atol=1e-8)


def test_float32_adapters_give_float32_factors():
    stack = random_stack([4, 4], dtype=torch.float32)
    merged = merge_modules({"m": stack}, {"m": [1.0, 1.0]}, rank=8, options=SUM_LIKE)["m"]
    assert merged.lora_A.dtype == torch.float32
    expected = _weighted_sum(stack, [1.0, 1.0])
    assert (_delta(merged) - expected).norm() / expected.norm() < 1e-5


@pytest.mark.parametrize(
    ("weights", "kwargs", "message"),
    [
        ({"m": [1.0]}, {}, "1 weights for 2 adapters"),
        ({"x": [1.0, 1.0]}, {}, "name different modules"),
        ({"m": [1.0, 1.0]}, {"options": {"aggregation": "mean"}}, "Unknown aggregation 'mean'"),
        ({"m": [1.0, 1.0]}, {"options": {"ranks": 2}}, r"Unknown option\(s\) \['ranks'\] for method 'cp'"),
        ([1.0, 1.0], {}, "must both be mappings from module name"),
    ],
)
def test_bad_arguments_are_rejected(weights, kwargs, message):
    with pytest.raises(ValueError, match=message):
        merge_modules({"m": random_stack([2, 2])}, weights, rank=2, **kwargs)


def test_batched_stacks_are_rejected():
    with pytest.raises(ValueError, match="batch size 1"):
        merge_modules({"m": random_stack([2, 2], batch=2)}, {"m": [1.0, 1.0]}, rank=2)


@pytest.mark.cuda
def test_compute_on_cuda_returns_to_the_input_device():
    stack = random_stack([4, 4])
    merged = merge_modules({"m": stack}, {"m": [1.0, 1.0]}, rank=8, device="cuda", options=SUM_LIKE)["m"]
    assert merged.lora_A.device.type == "cpu"
    expected = _weighted_sum(stack, [1.0, 1.0])
    assert (_delta(merged) - expected).norm() / expected.norm() < 1e-10


def test_default_rank_is_the_sum_of_the_ranks():
    assert default_rank([8] * 6) == 48
    assert default_rank([8, 4]) == 12
    assert default_rank([16]) == 16
    with pytest.raises(ValueError, match=r"positive LoRA ranks, got \[4, 0\]"):
        default_rank([4, 0])


def test_the_default_merge_of_one_adapter_flattens_its_spectrum():
    # Whitened + isotropic at rank sum r: the adapter's own singular directions, every singular value
    # replaced by their mean (times the weight).
    stack = random_stack([6], scales=[2.0])
    merged = merge_modules({"m": stack}, {"m": [0.5]}, rank=6)["m"]
    u, s, vh = torch.linalg.svd(_weighted_sum(stack, [1.0]), full_matrices=False)
    expected = 0.5 * s[:6].mean() * u[:, :6] @ vh[:6]
    torch.testing.assert_close(_delta(merged), expected, rtol=1e-10, atol=1e-12)


def test_the_default_merge_of_orthogonal_adapters_with_flat_spectra_is_their_sum():
    # Adapters in orthogonal subspaces, each with equal singular values: whitening and the flat
    # spectrum change nothing, so the default cp merge is the weighted sum at weights 1.
    gen = torch.Generator().manual_seed(0)
    q_out, _ = torch.linalg.qr(torch.randn(20, 6, generator=gen, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(16, 6, generator=gen, dtype=torch.float64))
    lora_B = [q_out[None, :, :3] * 3.0, q_out[None, :, 3:] * 3.0]
    lora_A = [q_in[None, :, :3].mT, q_in[None, :, 3:].mT]
    stack = LoraStack(lora_A, lora_B, [1.0, 1.0])
    merged = merge_modules({"m": stack}, {"m": [1.0, 1.0]}, rank=6)["m"]
    torch.testing.assert_close(_delta(merged), _weighted_sum(stack, [1.0, 1.0]), rtol=1e-10, atol=1e-12)
    assert merged.fit_error < 1e-12  # rank sum r: the exact CP, no ALS
    assert merged.n_iter == 0


@pytest.mark.parametrize(
    ("weights", "options", "warns"),
    [
        ([0.5, 0.5], None, True),  # the weights of a mean with the per-adapter default
        ([0.7, 0.3], {"isotropic": False}, True),  # whitened alone is per adapter too
        ([1.0, 1.0], None, False),  # the natural scale
        ([1.5, -0.5], None, False),  # sums to 1, but not an average
        ([0.5, 0.5], {"whiten": False, "isotropic": False}, False),  # the sum-like merge averages
    ],
)
def test_the_weights_of_an_average_with_a_per_adapter_merge_warn(weights, options, warns, recwarn):
    merge_modules({"m": random_stack([2, 2])}, {"m": weights}, rank=4, options=options)
    messages = [str(w.message) for w in recwarn if "sum to 1" in str(w.message)]
    assert len(messages) == warns
    if warns:
        assert "about 1/2 of it" in messages[0]
        assert "--no-whiten --no-isotropic" in messages[0]


def test_the_default_merge_ignores_an_adapter_with_weight_zero():
    # At the default full rank each component belongs to one adapter: weight 0 gives its components
    # gain 0, and they are left out of the whitening, so the others merge as if it were absent.
    stack = random_stack([3, 2, 4], seed=4)
    first_two = LoraStack(stack.lora_A[:2], stack.lora_B[:2], stack.scales[0][:2].tolist())
    with_zero = merge_modules({"m": stack}, {"m": [1.0, 0.8, 0.0]}, rank=9)["m"]
    without = merge_modules({"m": first_two}, {"m": [1.0, 0.8]}, rank=5)["m"]
    torch.testing.assert_close(_delta(with_zero), _delta(without), rtol=1e-10, atol=1e-12)

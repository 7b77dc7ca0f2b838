"""Issue 11's cp options: the gain rules ``sharing_exponent`` and ``isotropic``, and ``rank_tol``.

``sharing_exponent = gamma`` divides each component's gain by ``n_r ** gamma``, with
``n_r = (sum_i |w_i c_ir|)^2 / sum_i (w_i c_ir)^2`` the effective number of adapters using it;
``isotropic`` replaces every non-zero gain magnitude by their mean. The planted cases have a unique
exact CP (Kruskal's condition holds), so the merged delta is known in closed form. ``rank_tol`` picks
each module's rank from its fit curve; a module planted with CP rank 2 must get 2.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from testing_utils import cp_delta, orthonormal, random_stack, save_peft_adapter, tiny_base, two_adapter_model

import peft_cp_merge  # registers combination_type="cp"
from peft_cp_merge.cli import main
from peft_cp_merge.engine.compression import LoraStack
from peft_cp_merge.methods.cp import CPOptions, merge_modules
from peft_cp_merge.methods.cp_gains import component_gains


def _planted(a=3.0, b=1.5, s=2.0, seed=0):
    """Two rank-2 adapters: a specific component each (strengths ``a``, ``b``) and one identical shared
    component of strength ``s``, all orthonormal on both sides. Returns the stack and the rank-one
    parts ``(P1, P2, P0)``: ``dW_1 = a P1 + s P0``, ``dW_2 = b P2 + s P0``."""
    gen = torch.Generator().manual_seed(seed)
    u, v = orthonormal(16, 3, gen), orthonormal(12, 3, gen)
    parts = [torch.outer(u[:, k], v[:, k]) for k in range(3)]
    lora_B = [torch.stack([a * u[:, 0], s * u[:, 2]], dim=1), torch.stack([b * u[:, 1], s * u[:, 2]], dim=1)]
    lora_A = [torch.stack([v[:, 0], v[:, 2]]), torch.stack([v[:, 1], v[:, 2]])]
    stack = LoraStack([x[None] for x in lora_A], [x[None] for x in lora_B], [1.0, 1.0])
    return stack, parts


# --------------------------------------------------------------------------------------------------
# sharing_exponent
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gamma", "shared"), [(0.0, 2.0), (0.5, math.sqrt(2.0)), (1.0, 1.0)])
def test_a_shared_component_is_counted_once_at_gamma_one(gamma, shared):
    # Loadings: specific components e_1, e_2; the shared one (1, 1) / sqrt(2) with lambda = 2 sqrt(2),
    # so n = 2 and its gain is 2 s / 2 ** gamma. The specific ones (n = 1) keep a and b.
    stack, (p1, p2, p0) = _planted()
    delta, merged = cp_delta(stack, [1.0, 1.0], 3, sharing_exponent=gamma)
    expected = 3.0 * p1 + 1.5 * p2 + shared * 2.0 * p0
    torch.testing.assert_close(delta, expected.to(delta), rtol=1e-7, atol=1e-9)
    sum_delta = 3.0 * p1 + 1.5 * p2 + 4.0 * p0
    expected_error = torch.linalg.matrix_norm(expected - sum_delta) / torch.linalg.matrix_norm(sum_delta)
    assert merged.rel_error == pytest.approx(float(expected_error), abs=1e-9)


def test_an_adapter_with_weight_zero_does_not_count_as_sharing():
    # With w = (1, 0) only adapter 1 uses the shared component: n = 1, the merge is adapter 1 itself.
    stack, (p1, _, p0) = _planted()
    for gamma in (0.0, 0.5, 1.0):
        delta, merged = cp_delta(stack, [1.0, 0.0], 3, sharing_exponent=gamma)
        torch.testing.assert_close(delta, (3.0 * p1 + 2.0 * p0).to(delta), rtol=1e-7, atol=1e-9)
        assert merged.rel_error == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("aggregation", ["weighted", "disjoint"])
def test_sharing_scales_with_the_weights_and_never_raises_a_gain(aggregation):
    stack = random_stack([3, 2, 4], d_out=14, d_in=11, seed=3)
    plain, _ = cp_delta(stack, [0.6, 0.9, 0.4], 6, aggregation=aggregation)
    shared, _ = cp_delta(stack, [0.6, 0.9, 0.4], 6, aggregation=aggregation, sharing_exponent=0.7)
    doubled, _ = cp_delta(stack, [1.2, 1.8, 0.8], 6, aggregation=aggregation, sharing_exponent=0.7)
    torch.testing.assert_close(doubled, 2 * shared, rtol=1e-6, atol=1e-9)
    # n_r >= 1, so every gain shrinks or stays: the merged delta's norm cannot grow
    assert torch.linalg.matrix_norm(shared, "nuc") <= torch.linalg.matrix_norm(plain, "nuc") * (1 + 1e-9)
    assert torch.linalg.matrix_norm(shared - plain) > 1e-3 * torch.linalg.matrix_norm(plain)


def test_component_gains_divides_by_the_participation_ratio():
    lam = torch.tensor([[2.0, 1.0, 3.0]], dtype=torch.float64)
    c = torch.nn.functional.normalize(
        torch.tensor([[[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]]]), dim=1
    )
    w = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    gains = component_gains(lam, c.double(), w, sharing_exponent=1.0)
    # component 0: only adapter 0 (n = 1); component 1: three equal loadings (n = 3); component 2: n = 1
    expected = torch.tensor([[2.0, 1.0 * 3 / math.sqrt(3) / 3, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(gains, expected)


# --------------------------------------------------------------------------------------------------
# isotropic
# --------------------------------------------------------------------------------------------------


def test_isotropic_whitened_merge_has_a_flat_spectrum_with_the_mean_gain():
    stack = random_stack([3, 3, 2], d_out=18, d_in=15, seed=5)
    weights = [0.8, 1.1, 0.5]
    white, _ = cp_delta(stack, weights, 6, whiten=True)
    flat, merged = cp_delta(stack, weights, 6, whiten=True, isotropic=True)
    sigma_white = torch.linalg.svdvals(white)[:6]
    sigma_flat = torch.linalg.svdvals(flat)
    torch.testing.assert_close(sigma_flat[:6], sigma_white.mean().expand(6), rtol=1e-6, atol=1e-9)
    assert float(sigma_flat[6:].abs().max()) < 1e-9  # rank 6, nothing else
    # the same singular vectors: flattening only changes the spectrum
    u, _, vh = torch.linalg.svd(white)
    torch.testing.assert_close(u[:, :6].mT @ flat @ vh[:6].mT, sigma_white.mean() * torch.eye(6).to(flat))
    assert 0 < merged.rel_error < 1


def test_isotropic_on_orthogonal_components_equals_a_dense_reference():
    stack, (p1, p2, p0) = _planted()
    delta, _ = cp_delta(stack, [1.0, 1.0], 3, isotropic=True)
    mean = (3.0 + 1.5 + 4.0) / 3  # gains a, b and 2 s
    torch.testing.assert_close(delta, (mean * (p1 + p2 + p0)).to(delta), rtol=1e-7, atol=1e-9)
    both, _ = cp_delta(stack, [1.0, 1.0], 3, isotropic=True, sharing_exponent=1.0)
    torch.testing.assert_close(both, ((3.0 + 1.5 + 2.0) / 3 * (p1 + p2 + p0)).to(both), rtol=1e-7, atol=1e-9)


def test_isotropic_is_linear_in_a_common_weight_and_keeps_zero_gains_at_zero():
    stack = random_stack([2, 2], d_out=10, d_in=9, seed=7)
    one, _ = cp_delta(stack, [1.0, 1.0], 4, isotropic=True)
    neg, _ = cp_delta(stack, [-0.5, -0.5], 4, isotropic=True)
    torch.testing.assert_close(neg, -0.5 * one, rtol=1e-6, atol=1e-9)
    gains = component_gains(
        torch.tensor([[2.0, 0.0, 1.0]]), torch.eye(3)[None], torch.ones(1, 3), isotropic=True
    )
    torch.testing.assert_close(gains, torch.tensor([[1.5, 0.0, 1.5]]))


def test_at_full_rank_whitened_cp_is_tsv_and_isotropic_cp_is_tsv_with_a_flat_spectrum():
    # At R = M the components are each adapter's singular vectors: whitening them is TSV's polar step.
    from peft_cp_merge.methods.tsv import merge_tsv

    stack = random_stack([3, 2, 3], d_out=17, d_in=13, seed=11)
    weights = [0.7, 1.2, -0.4]
    white, _ = cp_delta(stack, weights, 8, whiten=True)
    tsv = merge_tsv(stack, weights, rank=8)
    torch.testing.assert_close(white, tsv.lora_B @ tsv.lora_A, rtol=1e-7, atol=1e-9)
    flat, _ = cp_delta(stack, weights, 8, whiten=True, isotropic=True)
    sigma = torch.linalg.svdvals(tsv.lora_B @ tsv.lora_A)[:8]
    torch.testing.assert_close(torch.linalg.svdvals(flat)[:8], sigma.mean().expand(8), rtol=1e-7, atol=1e-9)


def test_full_rank_components_do_not_depend_on_how_an_adapter_splits_its_delta():
    stack = random_stack([3, 2], d_out=12, d_in=10, seed=12)
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    q = q @ torch.diag(torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64))  # not orthogonal
    resplit = LoraStack(
        [torch.linalg.solve(q, stack.lora_A[0][0])[None], stack.lora_A[1]],
        [(stack.lora_B[0][0] @ q)[None], stack.lora_B[1]],
        stack.scales,
    )
    for options in ({"whiten": True}, {"isotropic": True}, {"whiten": True, "isotropic": True}):
        one, _ = cp_delta(stack, [1.0, 0.6], 5, **options)
        two, _ = cp_delta(resplit, [1.0, 0.6], 5, **options)
        torch.testing.assert_close(one, two, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# rank_tol: the rank of each module from its fit curve
# --------------------------------------------------------------------------------------------------


def _cp_rank_two_stack(seed=0) -> LoraStack:
    """Four rank-2 adapters whose stacked deltas have CP rank exactly 2: ``dW_i = sum_r c_ir u_r v_r^T``."""
    gen = torch.Generator().manual_seed(seed)
    u, v, c = (torch.randn(d, 2, generator=gen, dtype=torch.float64) for d in (14, 11, 4))
    lora_B = [u * c[i] for i in range(4)]
    lora_A = [v.T.clone() for _ in range(4)]
    return LoraStack([a[None] for a in lora_A], [b[None] for b in lora_B], [1.0] * 4)


def test_rank_tol_gives_a_planted_low_rank_module_its_rank_and_others_the_full_rank():
    stacks = {"low": _cp_rank_two_stack(), "random": random_stack([2, 2, 2, 2], d_out=14, d_in=11, seed=1)}
    weights = {name: [0.5, 1.0, 0.7, 0.2] for name in stacks}
    merged = merge_modules(
        stacks, weights, rank=8, options=CPOptions(rank_tol=0.01, whiten=False, isotropic=False)
    )
    assert merged["low"].rank == 2
    assert merged["random"].rank == 8
    assert merged["low"].rel_error == pytest.approx(0.0, abs=1e-8)  # rank 2 is exact there
    assert merged["low"].lora_A.shape == (8, 11)
    assert torch.count_nonzero(merged["low"].lora_A[2:]) == 0
    assert merged["random"].fit_error == pytest.approx(0.0, abs=1e-8)  # R = M = 8: exact
    # the planted module's merged delta is the weighted sum
    low = stacks["low"]
    expected = sum(w * b[0] @ a[0] for w, a, b in zip(weights["low"], low.lora_A, low.lora_B, strict=True))
    torch.testing.assert_close(merged["low"].lora_B @ merged["low"].lora_A, expected)


def test_rank_tol_zero_is_the_fixed_rank_and_one_the_smallest_candidate():
    stacks = {"a": random_stack([3, 3, 2], seed=2), "b": random_stack([2, 2], seed=3)}
    weights = {"a": [1.0, 0.5, 0.8], "b": [0.4, 0.9]}
    fixed = merge_modules(stacks, weights, rank=7)
    zero = merge_modules(stacks, weights, rank=7, options=CPOptions(rank_tol=0.0))
    one = merge_modules(stacks, weights, rank=7, options=CPOptions(rank_tol=1.0))
    for name in stacks:
        torch.testing.assert_close(zero[name].lora_A, fixed[name].lora_A, rtol=0, atol=0)
    assert (fixed["a"].rank, fixed["b"].rank) == (7, 4)  # "b" has only M = 4
    assert (one["a"].rank, one["b"].rank) == (2, 1)  # ceil(7 / 4), ceil(4 / 4)
    assert one["a"].fit_error > fixed["a"].fit_error


def test_add_weighted_adapter_reports_each_modules_rank(tiny_net):
    model = two_adapter_model(tiny_net)
    report = peft_cp_merge.add_cp_weighted_adapter(model, ["x", "y"], [1.0, 1.0], "m", rank=4, rank_tol=1.0)
    assert set(report.module_rank.values()) == {1}
    plain = peft_cp_merge.add_cp_weighted_adapter(model, ["x", "y"], [1.0, 1.0], "p", rank=4)
    assert set(plain.module_rank.values()) == {4}


# --------------------------------------------------------------------------------------------------
# Plumbing and bad values
# --------------------------------------------------------------------------------------------------


def test_gain_options_reach_the_merge_through_add_weighted_adapter(tiny_net):
    from peft.tuners.lora import LoraLayer

    model = two_adapter_model(tiny_net)
    options = {"sharing_exponent": 0.8, "isotropic": True}
    model.add_weighted_adapter(
        ["x", "y"],
        [0.9, 1.1],
        "m",
        combination_type="cp",
        cp_rank=4,
        **{f"cp_{k}": v for k, v in options.items()},
    )
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and "m" in m.lora_A]
    assert len(layers) == 2
    stacks = {
        str(i): LoraStack(
            [layer.lora_A[a].weight.detach()[None] for a in ("x", "y")],
            [layer.lora_B[a].weight.detach()[None] for a in ("x", "y")],
            [layer.scaling[a] for a in ("x", "y")],
        )
        for i, layer in enumerate(layers)
    }
    # One batched CP-ALS as in the binding: flattening raises weak components to the mean, so the
    # rounding-level differences between a batched and a single-module fit would show.
    weights = {name: [0.9, 1.1] for name in stacks}
    expected = merge_modules(stacks, weights, rank=4, options=CPOptions(**options))
    for i, layer in enumerate(layers):
        reference = expected[str(i)].lora_B @ expected[str(i)].lora_A
        torch.testing.assert_close(layer.get_delta_weight("m").detach(), reference, rtol=1e-5, atol=1e-6)
        plain = merge_modules(stacks, weights, rank=4)[str(i)]
        assert torch.linalg.matrix_norm(reference - plain.lora_B @ plain.lora_A) > 1e-2


def test_gain_flags_reach_the_folder_merge_and_match_the_in_memory_merge(tmp_path):
    base = tiny_base()
    adapters = [
        str(save_peft_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8)),
        str(save_peft_adapter(base, tmp_path / "b", seed=2, r=3, lora_alpha=5)),
    ]
    out = tmp_path / "out"
    flags = ["--sharing-exponent", "0.5", "--isotropic", "--whiten", "--rank-tol", "0.2"]
    args = ["merge", *adapters, "--weights", "0.7", "0.4", "--rank", "5", *flags, "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    options = json.loads((out / "merge_info.json").read_text())["options"]
    assert options["sharing_exponent"] == 0.5
    assert options["isotropic"] is True
    assert options["rank_tol"] == 0.2

    model = PeftModel.from_pretrained(tiny_base(), adapters[0], adapter_name="a")
    model.load_adapter(adapters[1], adapter_name="b")
    cp_options = {"cp_sharing_exponent": 0.5, "cp_isotropic": True, "cp_whiten": True, "cp_rank_tol": 0.2}
    model.add_weighted_adapter(["a", "b"], [0.7, 0.4], "m", combination_type="cp", cp_rank=5, **cp_options)
    model.set_adapter("m")
    tokens = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(0))
    loaded = PeftModel.from_pretrained(tiny_base(), str(out))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "1", True, None])
def test_bad_sharing_exponents_are_refused(value):
    with pytest.raises(ValueError, match=rf"sharing_exponent must be a number from 0 to 1, got {value!r}"):
        CPOptions(sharing_exponent=value)


@pytest.mark.parametrize("value", [-0.01, 2.0, float("inf"), "0.1", False])
def test_bad_rank_tols_are_refused(value):
    with pytest.raises(ValueError, match=rf"rank_tol must be a number from 0 to 1, got {value!r}"):
        CPOptions(rank_tol=value)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_isotropic_values_are_refused(value):
    with pytest.raises(ValueError, match=rf"isotropic must be True or False, got {value!r}"):
        CPOptions(isotropic=value)


def test_a_bad_gain_option_is_refused_before_the_model_changes(tiny_net):
    model = two_adapter_model(tiny_net)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"sharing_exponent must be a number from 0 to 1, got 2\.0"):
        model.add_weighted_adapter(
            ["x", "y"], [1.0, 1.0], "m", combination_type="cp", cp_sharing_exponent=2.0
        )
    assert sorted(model.peft_config) == ["x", "y"]
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)

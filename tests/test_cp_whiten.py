"""``CPOptions(whiten=True)``: the CP factors ``U``, ``V`` replaced by their polar factors.

The whitened merge is ``dW = polar(U) diag(g) polar(V)^T`` with ``U``, ``V`` the canonical (unit-column)
CP factors and ``g_r`` the unwhitened gains (``lambda_r`` times the aggregated loading), so its
singular values are exactly ``|g_r|`` wherever ``U`` and ``V`` have full column rank.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from testing_utils import cp_delta, orthonormal, random_stack, save_peft_adapter, tiny_base, two_adapter_model

import peft_cp_merge  # noqa: F401  (registers combination_type="cp")
from peft_cp_merge import add_cp_weighted_adapter
from peft_cp_merge.cli import main
from peft_cp_merge.engine.als import cp_als
from peft_cp_merge.engine.compression import LoraStack, compress_many
from peft_cp_merge.methods.cp import DISJOINT_THRESHOLD, CPOptions, merge_modules


def _stack(lora_B, lora_A, scales) -> LoraStack:
    """One-module stack from per-adapter ``lora_B`` ``(d_out, r)`` and ``lora_A`` ``(r, d_in)``."""
    return LoraStack([a[None] for a in lora_A], [b[None] for b in lora_B], scales)


def _pair(d: int, cos: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit vectors of length ``d`` at cosine ``cos``."""
    e = orthonormal(d, 2, gen)
    return e[:, 0], cos * e[:, 0] + math.sqrt(1 - cos**2) * e[:, 1]


# --------------------------------------------------------------------------------------------------
# (a) Planted no-op: CP components already orthogonal on both sides
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["weighted", "disjoint"])
def test_orthogonal_components_are_left_unchanged(aggregation):
    # Three rank-2 adapters in mutually orthogonal subspaces, each with orthogonal columns: at full CP
    # rank (R = M = 6) the components are the LoRA columns, mutually orthogonal on both sides.
    gen = torch.Generator().manual_seed(0)
    q_out, q_in = orthonormal(24, 6, gen), orthonormal(20, 6, gen)
    strengths = torch.tensor([[3.0, 0.5], [2.0, 1.25], [0.7, 4.0]], dtype=torch.float64)
    lora_B = [q_out[:, 2 * i : 2 * i + 2] * strengths[i] for i in range(3)]
    lora_A = [
        q_in[:, 2 * i : 2 * i + 2].T * torch.tensor([1.5, 0.3], dtype=torch.float64)[:, None]
        for i in range(3)
    ]
    stack = _stack(lora_B, lora_A, [0.5, 2.0, 1.0])
    weights = [0.8, -0.4, 1.3]
    plain, plain_merged = cp_delta(stack, weights, 6, aggregation=aggregation)
    white, white_merged = cp_delta(stack, weights, 6, aggregation=aggregation, whiten=True)
    scale = torch.linalg.matrix_norm(plain)
    assert scale > 1
    assert torch.linalg.matrix_norm(white - plain) / scale < 1e-10
    assert white_merged.rel_error == pytest.approx(plain_merged.rel_error, abs=1e-10)
    if aggregation == "weighted":  # full rank, orthogonal: both are the exact weighted sum
        assert white_merged.rel_error < 1e-10


# --------------------------------------------------------------------------------------------------
# (b) Planted overlap: two adapters sharing (nearly) one direction
# --------------------------------------------------------------------------------------------------


def _overlapping(cos_out: float, cos_in: float, gains: tuple[float, float]) -> LoraStack:
    """Two rank-1 adapters ``g_i u_i v_i^T`` with unit ``u_i``, ``v_i`` at the given cosines.

    The strength is split unevenly between ``B``, ``A`` and the scaling (``2 * g / (2 * 0.5) * 0.5``),
    so the CP weight ``lambda_i = g_i`` is the product of all three.
    """
    gen = torch.Generator().manual_seed(1)
    u1, u2 = _pair(12, cos_out, gen)
    v1, v2 = _pair(9, cos_in, gen)
    lora_B = [2 * u[:, None] for u in (u1, u2)]
    lora_A = [(g / (2 * 0.5)) * v[None, :] for g, v in zip(gains, (v1, v2), strict=True)]
    return _stack(lora_B, lora_A, [0.5, 0.5])


def test_a_shared_direction_is_double_counted_unwhitened_but_not_whitened():
    # Equal gains g and cosine c on both sides: U^T U = V^T V = K = [[1, c], [c, 1]], so
    # g U V^T has singular values g (1 + c), g (1 - c); whitened, g P_U P_V^T has g, g.
    g, c = 3.0, 0.99
    stack = _overlapping(c, c, (g, g))
    plain, _ = cp_delta(stack, [1.0, 1.0], 2)
    white, _ = cp_delta(stack, [1.0, 1.0], 2, whiten=True)
    plain_s = torch.linalg.svdvals(plain)[:2]
    white_s = torch.linalg.svdvals(white)[:2]
    torch.testing.assert_close(
        plain_s, torch.tensor([g * (1 + c), g * (1 - c)], dtype=torch.float64), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(white_s, torch.tensor([g, g], dtype=torch.float64), rtol=0, atol=1e-10)


def test_whitened_singular_values_are_the_gains():
    # Unequal gains and different angles on the two sides: whitened, the spectrum is exactly {g_1, g_2}
    # (polar factors have orthonormal columns); unwhitened, the shared direction gets nearly g_1 + g_2.
    gains = (3.0, 2.0)
    stack = _overlapping(0.99, 0.97, gains)
    plain, _ = cp_delta(stack, [1.0, 1.0], 2)
    white, _ = cp_delta(stack, [1.0, 1.0], 2, whiten=True)
    torch.testing.assert_close(
        torch.linalg.svdvals(white)[:2], torch.tensor(gains, dtype=torch.float64), rtol=0, atol=1e-10
    )
    assert torch.linalg.svdvals(plain)[0] > 0.95 * sum(gains)
    # merge weights scale the gains: w = (0.5, 2) gives g_1 / 2 and 2 g_2
    white_w, _ = cp_delta(stack, [0.5, 2.0], 2, whiten=True)
    torch.testing.assert_close(
        torch.linalg.svdvals(white_w)[:2], torch.tensor([4.0, 1.5], dtype=torch.float64), rtol=0, atol=1e-10
    )


def test_identical_adapters_merge_to_their_mean_gain_whitened():
    # Exactly shared direction: U = [u, u] is rank-deficient; the canonical polar factor (partial
    # isometry) gives (g_1 + g_2) / 2 u v^T, where the unwhitened sum gives g_1 + g_2.
    stack = _overlapping(1.0, 1.0, (3.0, 3.0))
    plain, _ = cp_delta(stack, [1.0, 1.0], 2)
    white, _ = cp_delta(stack, [1.0, 1.0], 2, whiten=True)
    torch.testing.assert_close(
        torch.linalg.svdvals(plain)[:2], torch.tensor([6.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-9
    )
    torch.testing.assert_close(
        torch.linalg.svdvals(white)[:2], torch.tensor([3.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-9
    )


# --------------------------------------------------------------------------------------------------
# (c) Equal to a dense reference built from the same CP factors
# --------------------------------------------------------------------------------------------------


def _inverse_sqrt_polar(x: torch.Tensor) -> torch.Tensor:
    """``x (x^T x)^(-1/2)`` by an eigendecomposition (full column rank only): an independent polar."""
    evals, evecs = torch.linalg.eigh(x.T @ x)
    assert evals.min() > 1e-8 * evals.max()
    return x @ (evecs * evals.rsqrt()) @ evecs.T


def _reference_gains(weights, loadings, merge_weights, aggregation):
    """Gains from unit loadings ``(N, R)``, written out component by component."""
    gains = []
    for r in range(loadings.shape[1]):
        contributions = [float(w * c) for w, c in zip(merge_weights, loadings[:, r], strict=True)]
        if aggregation == "weighted":
            gains.append(float(weights[r]) * sum(contributions))
            continue
        elected = math.copysign(1.0, sum(contributions)) if sum(contributions) != 0 else 0.0
        largest = max(abs(x) for x in contributions)
        kept = [x for x in contributions if x * elected > 0 and abs(x) >= DISJOINT_THRESHOLD * largest]
        gains.append(float(weights[r]) * (sum(kept) / len(kept) if kept else 0.0))
    return torch.tensor(gains, dtype=torch.float64)


def _dense_references(stacks, weights, rank, aggregation):
    """Per module ``polar(U) diag(g) polar(V)^T`` (``d_out x d_in``), from cp_als on the same batch."""
    stack_list = list(stacks.values())
    compressed = compress_many(stack_list)
    effective = min(rank, sum(stack_list[0].ranks))
    options = CPOptions()
    result = cp_als(
        compressed.core,
        effective,
        init=options.init,
        n_iter_max=options.n_iter_max,
        tol=options.tol,
        l2=options.l2,
        seed=options.seed,
        line_search=options.line_search,
    )
    out = {}
    for j, (name, stack) in enumerate(stacks.items()):
        q_b = stack.cat_B()[0].double() @ compressed.basis_B[j].double()  # d_out x M, orthonormal
        q_a = stack.cat_A()[0].double().T @ compressed.basis_A[j].double()
        u = q_b @ result.factors[0][j].double()
        v = q_a @ result.factors[1][j].double()
        c = result.factors[2][j].double()
        nu, nv, nc = u.norm(dim=0), v.norm(dim=0), c.norm(dim=0)
        lam = result.weights[j].double() * nu * nv * nc
        gains = _reference_gains(lam, c / nc, weights[name], aggregation)
        out[name] = (_inverse_sqrt_polar(u / nu) * gains) @ _inverse_sqrt_polar(v / nv).T
    return out


def _weighted_sum(stack, weights):
    return sum(
        w * float(s) * (b[0].double() @ a[0].double())
        for w, s, a, b in zip(weights, stack.scales[0], stack.lora_A, stack.lora_B, strict=True)
    )


@pytest.mark.parametrize("aggregation", ["weighted", "disjoint"])
def test_whitened_merge_equals_a_dense_reference_from_the_same_cp_factors(aggregation):
    # Two modules of the same shape (one batched CP-ALS, R = 4 < M = 8) and one with M = 3 < R (fitted
    # exactly at rank 3 and zero-padded).
    stacks = {
        "m0": random_stack([3, 2, 3], seed=0),
        "m1": random_stack([3, 2, 3], seed=1),
        "small": random_stack([1, 2], d_out=10, d_in=7, seed=2),
    }
    weights = {"m0": [0.7, 1.2, -0.5], "m1": [1.0, 1.0, 1.0], "small": [0.6, 1.4]}
    merged = merge_modules(
        stacks, weights, rank=4, options=CPOptions(aggregation=aggregation, isotropic=False)
    )
    plain = merge_modules(
        stacks, weights, rank=4, options=CPOptions(aggregation=aggregation, whiten=False, isotropic=False)
    )
    references = _dense_references({k: stacks[k] for k in ("m0", "m1")}, weights, 4, aggregation)
    references |= _dense_references({"small": stacks["small"]}, weights, 4, aggregation)
    for name, reference in references.items():
        got = merged[name].lora_B @ merged[name].lora_A
        assert merged[name].lora_A.shape[0] == 4
        scale = torch.linalg.matrix_norm(reference)
        assert torch.linalg.matrix_norm(got - reference) / scale < 1e-10, name
        # whitening does something here: the Gaussian components overlap
        unwhitened = plain[name].lora_B @ plain[name].lora_A
        assert torch.linalg.matrix_norm(unwhitened - reference) / scale > 1e-2, name
        # rel_error, computed in the core, is the dense distance to the weighted sum
        target = _weighted_sum(stacks[name], weights[name])
        expected = torch.linalg.matrix_norm(reference - target) / torch.linalg.matrix_norm(target)
        assert merged[name].rel_error == pytest.approx(float(expected), rel=1e-9), name
        assert merged[name].fit_error == plain[name].fit_error


def test_float32_adapters_are_whitened_in_float64_and_come_back_in_float32():
    # Float32 factors: float32 Gram and Cholesky basis (orthonormal to about 1e-5), float64 ALS and polar.
    stack = random_stack([3, 2, 3], seed=3, dtype=torch.float32)
    weights = {"m": [1.0, 0.5, 1.0]}
    reference = _dense_references({"m": stack}, weights, 4, "weighted")["m"]
    merged = merge_modules({"m": stack}, weights, rank=4, options=CPOptions(isotropic=False))["m"]
    assert merged.lora_A.dtype == merged.lora_B.dtype == torch.float32
    got = (merged.lora_B @ merged.lora_A).double()
    assert torch.linalg.matrix_norm(got - reference) / torch.linalg.matrix_norm(reference) < 1e-4


# --------------------------------------------------------------------------------------------------
# (d) The option reaches the merge through PEFT and the command line
# --------------------------------------------------------------------------------------------------


def test_every_cp_option_is_a_keyword_of_add_cp_weighted_adapter():
    # cp_<field> keywords are accepted for every CPOptions field, so each must reach CPOptions.
    parameters = inspect.signature(add_cp_weighted_adapter).parameters
    for option in dataclasses.fields(CPOptions):
        assert option.name in parameters, option.name
        assert parameters[option.name].default == option.default, option.name


def test_cp_whiten_reaches_the_merge_through_add_weighted_adapter(tiny_net):
    from peft.tuners.lora import LoraLayer

    model = two_adapter_model(tiny_net)
    weights = [0.9, 1.1]
    for name, whiten in (("white", True), ("plain", False)):
        model.add_weighted_adapter(
            ["x", "y"], weights, name, combination_type="cp", cp_rank=5, cp_whiten=whiten, cp_isotropic=False
        )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and "white" in m.lora_A}
    assert len(layers) == 2
    for name, layer in layers.items():
        stack = LoraStack(
            [layer.lora_A[a].weight.detach()[None] for a in ("x", "y")],
            [layer.lora_B[a].weight.detach()[None] for a in ("x", "y")],
            [layer.scaling[a] for a in ("x", "y")],
        )
        expected, _ = cp_delta(stack, weights, 5, whiten=True)
        white, plain = (layer.get_delta_weight(n).detach() for n in ("white", "plain"))
        torch.testing.assert_close(white, expected, rtol=1e-5, atol=1e-6)
        assert torch.linalg.matrix_norm(white - plain) > 1e-2 * torch.linalg.matrix_norm(plain), name


def test_whiten_flag_reaches_the_folder_merge_and_matches_the_in_memory_merge(tmp_path):
    base = tiny_base()
    adapters = [
        str(save_peft_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8)),
        str(save_peft_adapter(base, tmp_path / "b", seed=2, r=3, lora_alpha=5)),
    ]
    outs = {flag: tmp_path / flag for flag in ("--whiten", "--no-whiten")}
    for flag, out in outs.items():
        args = ["merge", *adapters, "--weights", "0.7", "0.4", "--rank", "7", flag, "--out", str(out)]
        assert main([*args, "--no-progress"]) == 0
    assert json.loads((outs["--whiten"] / "merge_info.json").read_text())["options"]["whiten"] is True
    assert json.loads((outs["--no-whiten"] / "merge_info.json").read_text())["options"]["whiten"] is False
    white, plain = (load_file(str(out / "adapter_model.safetensors")) for out in outs.values())
    assert any(not torch.allclose(white[key], plain[key]) for key in white)

    model = PeftModel.from_pretrained(tiny_base(), adapters[0], adapter_name="a")
    model.load_adapter(adapters[1], adapter_name="b")
    model.add_weighted_adapter(
        ["a", "b"], [0.7, 0.4], "merged", combination_type="cp", cp_rank=7, cp_whiten=True
    )
    model.set_adapter("merged")
    tokens = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(0))
    loaded = PeftModel.from_pretrained(tiny_base(), str(outs["--whiten"]))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=1e-6, atol=1e-6)


def test_merge_help_lists_the_whiten_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--help"])
    assert exit_info.value.code == 0
    assert "--whiten, --no-whiten" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# (e) Bad values are refused
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, 0, None, 1.0])
def test_bad_whiten_values_are_refused(value):
    with pytest.raises(ValueError, match=rf"whiten must be True or False, got {value!r}"):
        CPOptions(whiten=value)
    with pytest.raises(ValueError, match="whiten must be True or False"):
        merge_modules({"m": random_stack([1, 1])}, {"m": [1.0, 1.0]}, rank=2, options={"whiten": value})


def test_bad_cp_whiten_is_refused_before_the_model_changes(tiny_net):
    model = two_adapter_model(tiny_net)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="whiten must be True or False, got 'yes'"):
        model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "m", combination_type="cp", cp_whiten="yes")
    assert sorted(model.peft_config) == ["x", "y"]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


def test_whiten_takes_no_value_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "a", "b", "--weights", "1", "1", "--whiten=yes", "--out", "x"])
    assert exit_info.value.code == 2
    assert "--whiten" in capsys.readouterr().err

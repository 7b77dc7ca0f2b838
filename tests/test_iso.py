"""Iso-C and Iso-CTS in the core against dense references, planted answers and refused inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import write_adapter

from peft_cp_merge.cli import main
from peft_cp_merge.engine.compression import LoraStack
from peft_cp_merge.methods import METHODS, get_method
from peft_cp_merge.methods.iso_c import merge_iso_c
from peft_cp_merge.methods.iso_cts import IsoCTSOptions, merge_iso_cts, subspace_sizes

TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 throughout
WEIGHTS = [1.0, 0.5, -0.8]


def random_stack(ranks, d_out=14, d_in=11, *, seed=0) -> LoraStack:
    gen = torch.Generator().manual_seed(seed)
    lora_A = [torch.randn(1, r, d_in, generator=gen, dtype=torch.float64) for r in ranks]
    lora_B = [torch.randn(1, d_out, r, generator=gen, dtype=torch.float64) for r in ranks]
    return LoraStack(lora_A, lora_B, [0.5 + i for i in range(len(ranks))])


def dense_tasks(stack: LoraStack, weights) -> list[torch.Tensor]:
    return [w * stack.to_dense()[0, :, :, i] for i, w in enumerate(weights)]


def delta(merged) -> torch.Tensor:
    return merged.lora_B @ merged.lora_A


def orthonormal(gen, rows, cols) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))[0]


def planted(spectra, *, d_out=14, d_in=11, seed=3) -> tuple[LoraStack, list[torch.Tensor]]:
    """Adapters in mutually orthogonal subspaces with the given singular values (scaling 1).

    ``B_i = u_i diag(s_i) Q_i`` and ``A_i = Q_i^T v_i^T`` with a random rotation ``Q_i``, so the
    factors are not themselves singular vectors. Returns the stack and each adapter's ``(u, s, v)``
    as dense ``(d_out, r)``, ``(r,)``, ``(d_in, r)``.
    """
    gen = torch.Generator().manual_seed(seed)
    total = sum(len(s) for s in spectra)
    q_out, q_in = orthonormal(gen, d_out, total), orthonormal(gen, d_in, total)
    lora_A, lora_B, parts, start = [], [], [], 0
    for spectrum in spectra:
        s = torch.tensor(spectrum, dtype=torch.float64)
        cols = slice(start, start + len(s))
        rotation = orthonormal(gen, len(s), len(s))
        lora_B.append(((q_out[:, cols] * s) @ rotation)[None])
        lora_A.append((rotation.T @ q_in[:, cols].T)[None])
        parts.append((q_out[:, cols], s, q_in[:, cols]))
        start += len(s)
    return LoraStack(lora_A, lora_B, [1.0] * len(spectra)), parts


# --- dense references, written from the paper and the authors' code, not from the package ----------


def nonzero_svd(matrix, count):
    """The top ``count`` singular triplets of a dense matrix; asserts that they are all non-zero."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    assert count == 0 or s[count - 1] > 1e-8 * s[0], "the reference needs non-zero directions"
    return u[:, :count], s[:count], vh[:count].T


def orthonormalised(x):
    """``P Q^T`` from ``x = P D Q^T``; the reference only takes full column rank inputs."""
    p, d, qh = torch.linalg.svd(x, full_matrices=False)
    assert d[-1] > 1e-8 * d[0]
    return p @ qh


def dense_iso_c(stack, weights, rank):
    u, s, v = nonzero_svd(sum(dense_tasks(stack, weights)), rank)
    return s.mean() * u @ v.T


def dense_iso_cts(stack, weights, common, per_task):
    tasks = dense_tasks(stack, weights)
    u_c, s_c, v_c = nonzero_svd(sum(tasks), common)
    us, ss, vs = [u_c], [s_c], [v_c]
    for task in tasks:
        u, s, v = nonzero_svd(task - u_c @ u_c.T @ task, per_task)
        us.append(u)
        ss.append(s)
        vs.append(v)
    return torch.cat(ss).mean() * orthonormalised(torch.cat(us, 1)) @ orthonormalised(torch.cat(vs, 1)).T


# --- (a) the core-space merges equal the dense references -------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 5, 7])
def test_iso_c_equals_a_dense_reference(rank):
    stack = random_stack([3, 2, 2])
    merged = merge_iso_c(stack, WEIGHTS, rank=rank)
    torch.testing.assert_close(delta(merged), dense_iso_c(stack, WEIGHTS, rank), **TOL)
    assert merged.lora_A.shape == (rank, 11)
    s = torch.linalg.svdvals(sum(dense_tasks(stack, WEIGHTS)))
    assert merged.fit_error == pytest.approx(float(s[rank:].norm() / s.norm()), rel=1e-8, abs=1e-12)


@pytest.mark.parametrize(
    ("rank", "fraction", "common", "per_task"),  # (common, per_task) worked out by hand
    [(7, 0.8, 4, 1), (7, 0.2, 1, 2), (6, 0.3, 0, 2), (5, 0.0, 2, 1), (4, 0.5, 1, 1)],
)
def test_iso_cts_equals_a_dense_reference(rank, fraction, common, per_task):
    stack = random_stack([3, 2, 2], seed=1)
    merged = merge_iso_cts(stack, WEIGHTS, rank=rank, options=IsoCTSOptions(common_space_fraction=fraction))
    torch.testing.assert_close(delta(merged), dense_iso_cts(stack, WEIGHTS, common, per_task), **TOL)
    target = sum(dense_tasks(stack, WEIGHTS))
    rel_error = torch.linalg.matrix_norm(delta(merged) - target) / torch.linalg.matrix_norm(target)
    assert merged.rel_error == pytest.approx(float(rel_error), rel=1e-10)


@pytest.mark.parametrize(
    ("rank", "n_tasks", "fraction", "expected"),
    [
        (768, 8, 0.8, (616, 19)),  # the paper's ViT-B/32 setting
        (16, 2, 0.8, (12, 2)),
        (10, 4, 0.8, (10, 0)),  # round(0.5) == 0: no task-specific space
        (7, 3, 0.0, (1, 2)),
        (6, 4, 0.0, (2, 1)),  # round(1.5) == 2 would overrun the budget: capped
        (6, 3, 1.0, (6, 0)),
        (1, 3, 0.5, (1, 0)),
    ],
)
def test_subspace_sizes_follow_the_authors_rule(rank, n_tasks, fraction, expected):
    assert subspace_sizes(rank, n_tasks, fraction) == expected


# --- (b) planted answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0.6, -1.7])
def test_a_single_flat_adapter_comes_back_times_its_weight(weight):
    stack, _ = planted([[2.0, 2.0, 2.0]])
    expected = weight * stack.to_dense()[0, :, :, 0]
    torch.testing.assert_close(delta(merge_iso_c(stack, [weight], rank=3)), expected, **TOL)
    options = {"common_space_fraction": 0.5}  # one common direction, two task-specific ones
    torch.testing.assert_close(
        delta(merge_iso_cts(stack, [weight], rank=3, options=options)), expected, **TOL
    )


def test_iso_c_of_orthogonal_adapters_with_equal_flat_spectra_is_the_weighted_sum():
    stack, _ = planted([[1.5, 1.5], [1.5, 1.5, 1.5], [1.5]])
    weights = [0.4, 0.4, 0.4]
    expected = sum(dense_tasks(stack, weights))
    merged = merge_iso_c(stack, weights, rank=6)
    torch.testing.assert_close(delta(merged), expected, **TOL)
    assert merged.rel_error == pytest.approx(0.0, abs=1e-12)


def test_iso_c_of_orthogonal_flat_adapters_gives_each_the_mean_gain_with_its_weight_sign():
    stack, parts = planted([[1.5, 1.5], [3.0, 3.0, 3.0], [0.5]])
    weights = [2.0, -0.5, 1.0]
    # sum's spectrum: 3.0 (x2), 1.5 (x3), 0.5 (x1); mean (6.0 + 4.5 + 0.5) / 6
    expected = sum(math.copysign(11.0 / 6, w) * u @ v.T for w, (u, _, v) in zip(weights, parts, strict=True))
    torch.testing.assert_close(delta(merge_iso_c(stack, weights, rank=6)), expected, **TOL)


def test_iso_cts_of_orthogonal_adapters_takes_the_strong_one_as_common_and_the_weak_ones_top_direction():
    stack, ((u1, _, v1), (u2, _, v2)) = planted([[3.0, 3.0], [1.0, 0.5]])
    weights = [1.0, 1.2]  # sum's spectrum 3.0, 3.0, 1.2, 0.6: the common space is adapter 1
    merged = merge_iso_cts(stack, weights, rank=4, options={"common_space_fraction": 0.5})  # k=2, s=1
    # adapter 1 has no residual off the common space: no direction (not an arbitrary one) from it
    sigma_bar = (3.0 + 3.0 + 1.2) / 3
    expected = sigma_bar * (u1 @ v1.T + u2[:, :1] @ v2[:, :1].T)
    torch.testing.assert_close(delta(merged), expected, **TOL)
    assert merged.lora_A.shape == (4, 11)
    assert merged.lora_A[3].abs().max() == 0
    assert merged.lora_B[:, 3].abs().max() == 0


@pytest.mark.parametrize(
    ("merge", "rank"),
    [(merge_iso_c, 3), (merge_iso_c, 7), (merge_iso_cts, 6), (merge_iso_cts, 7)],
)
def test_the_nonzero_spectrum_is_flat_and_has_the_asked_rank(merge, rank):
    stack = random_stack([3, 2, 2], seed=2)
    s = torch.linalg.svdvals(delta(merge(stack, WEIGHTS, rank=rank)))
    assert s[rank - 1] > 1e-3 * s[0]
    assert s[rank:].max() < 1e-12 * s[0]
    torch.testing.assert_close(s[:rank], s[:1].expand(rank), **TOL)


@pytest.mark.parametrize("rank", [2, 5, 7])
def test_iso_cts_with_the_whole_budget_common_is_iso_c(rank):
    stack = random_stack([3, 2, 2], seed=3)
    only_common = merge_iso_cts(stack, WEIGHTS, rank=rank, options={"common_space_fraction": 1.0})
    torch.testing.assert_close(delta(only_common), delta(merge_iso_c(stack, WEIGHTS, rank=rank)), **TOL)


@pytest.mark.parametrize("merge", [merge_iso_c, merge_iso_cts])
@pytest.mark.parametrize("scale", [0.3, -2.0])
def test_scaling_every_weight_scales_the_merge(merge, scale):
    stack = random_stack([3, 2, 2], seed=4)
    scaled = merge(stack, [scale * w for w in WEIGHTS], rank=7)
    torch.testing.assert_close(delta(scaled), scale * delta(merge(stack, WEIGHTS, rank=7)), **TOL)


@pytest.mark.parametrize("merge", [merge_iso_c, merge_iso_cts])
def test_a_rank_above_the_adapters_total_only_pads(merge):
    stack = random_stack([3, 2, 2], seed=5)
    merged = merge(stack, WEIGHTS, rank=10)
    assert merged.lora_A.shape == (10, 11)
    assert merged.lora_A[7:].abs().max() == 0
    torch.testing.assert_close(delta(merged), delta(merge(stack, WEIGHTS, rank=7)), **TOL)


def test_iso_cts_leaves_out_an_adapter_of_weight_zero():
    stack = random_stack([3, 2, 2], seed=6)
    without = LoraStack(
        [stack.lora_A[0], stack.lora_A[2]], [stack.lora_B[0], stack.lora_B[2]], stack.scales[:, [0, 2]]
    )
    options = {"common_space_fraction": 0.4}
    torch.testing.assert_close(
        delta(merge_iso_cts(stack, [1.0, 0.0, -0.8], rank=5, options=options)),
        delta(merge_iso_cts(without, [1.0, -0.8], rank=5, options=options)),
        **TOL,
    )


@pytest.mark.parametrize(
    ("merge", "options", "bound"),
    [
        (merge_iso_c, None, 0.0),  # the sum is rounding noise: nothing is kept
        (merge_iso_cts, {}, 0.0),  # budget 2 = k: likewise
        (merge_iso_cts, {"common_space_fraction": 0.0}, 1e-12),  # k = 0, s = 1: +-u v^T cancel
    ],
)
def test_adapters_that_cancel_merge_to_zero_not_to_flattened_rounding_errors(merge, options, bound):
    one = random_stack([2], seed=7)
    mix = torch.tensor([[[1.0, 0.3], [-0.4, 2.0]]], dtype=torch.float64)  # same delta, other factors
    stack = LoraStack(
        [one.lora_A[0], torch.linalg.solve(mix, one.lora_A[0])],
        [one.lora_B[0], one.lora_B[0] @ mix],
        [1.0, 1.0],
    )
    merged = merge(stack, [0.5, -0.5], rank=3, **({} if options is None else {"options": options}))
    assert merged.lora_A.shape == (3, 11)
    assert delta(merged).abs().max() <= bound * one.to_dense().abs().max()


def test_float32_inputs_give_float32_factors():
    stack = random_stack([2, 2], seed=8)
    stack32 = LoraStack([a.float() for a in stack.lora_A], [b.float() for b in stack.lora_B], stack.scales)
    for merge in (merge_iso_c, merge_iso_cts):
        merged = merge(stack32, [1.0, 1.0], rank=4)
        assert merged.lora_A.dtype == merged.lora_B.dtype == torch.float32
        expected = delta(merge(stack, [1.0, 1.0], rank=4)).float()
        torch.testing.assert_close(delta(merged), expected, rtol=1e-4, atol=1e-4)


# --- the registry and the command line --------------------------------------------------------------


def test_registry_records():
    assert get_method("iso_c").default_rank([8, 4]) == get_method("iso_cts").default_rank([8, 4]) == 12
    assert get_method("iso_c").takes_rank
    assert get_method("iso_cts").takes_rank
    stack = random_stack([3, 2], seed=9)
    merged = METHODS["iso_cts"].merge(
        {"fc": stack}, {"fc": [0.7, 0.4]}, rank=4, options={"common_space_fraction": 0.5}
    )
    expected = merge_iso_cts(stack, [0.7, 0.4], rank=4, options=IsoCTSOptions(common_space_fraction=0.5))
    torch.testing.assert_close(delta(merged["fc"]), delta(expected), **TOL)
    assert not torch.allclose(delta(merged["fc"]), delta(merge_iso_cts(stack, [0.7, 0.4], rank=4)))


def test_folder_merge_through_the_command_line_is_the_in_memory_merge(tmp_path):
    gen = torch.Generator().manual_seed(10)
    factors = [(torch.randn(r, 6, generator=gen), torch.randn(5, r, generator=gen)) for r in (3, 2)]
    first = write_adapter(tmp_path / "a", {"fc": factors[0]}, r=3, lora_alpha=6)
    second = write_adapter(tmp_path / "b", {"fc": factors[1]}, r=2, lora_alpha=1)
    out = tmp_path / "out"
    args = ["--weights", "0.7", "0.4", "--method", "iso_cts", "--common-space-fraction", "0.4"]
    assert main(["merge", str(first), str(second), *args, "--out", str(out), "--no-progress"]) == 0
    info = json.loads((out / "merge_info.json").read_text())
    assert (info["method"], info["rank"]) == ("iso_cts", 5)  # default rank: sum of the ranks
    tensors = load_file(str(out / "adapter_model.safetensors"))
    got = tensors["base_model.model.fc.lora_B.weight"] @ tensors["base_model.model.fc.lora_A.weight"]
    stack = LoraStack([a[None] for a, _ in factors], [b[None] for _, b in factors], [2.0, 0.5])
    expected = merge_iso_cts(stack, [0.7, 0.4], rank=5, options={"common_space_fraction": 0.4})
    torch.testing.assert_close(got, delta(expected), rtol=1e-5, atol=1e-5)


# --- (c) refused inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), float("inf"), True, "0.5"])
def test_bad_common_space_fractions_are_refused_naming_the_value(value):
    message = rf"common_space_fraction must be a number in \[0, 1\], got {value!r}"
    with pytest.raises(ValueError, match=message):
        IsoCTSOptions(common_space_fraction=value)
    with pytest.raises(ValueError, match=message):
        merge_iso_cts(random_stack([2, 2]), [1.0, 1.0], rank=2, options={"common_space_fraction": value})


def test_unknown_and_misplaced_options_are_refused():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['fraction'\] for method 'iso_cts'"):
        get_method("iso_cts").make_options({"fraction": 0.5})
    with pytest.raises(
        ValueError, match=r"Unknown option\(s\) \['common_space_fraction'\] for method 'iso_c'\W"
    ):
        get_method("iso_c").make_options({"common_space_fraction": 0.5})
    with pytest.raises(ValueError, match="must be a IsoCTSOptions or a mapping, got float"):
        merge_iso_cts(random_stack([2, 2]), [1.0, 1.0], rank=2, options=0.5)


@pytest.mark.parametrize("merge", [merge_iso_c, merge_iso_cts])
@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bad_ranks_are_refused_naming_the_value(merge, rank):
    with pytest.raises(ValueError, match=rf"rank must be a positive integer, got {rank!r}"):
        merge(random_stack([2, 2]), [1.0, 1.0], rank=rank)


@pytest.mark.parametrize("merge", [merge_iso_c, merge_iso_cts])
def test_a_wrong_number_of_weights_is_refused(merge):
    with pytest.raises(ValueError, match="3 weights for 2 adapters"):
        merge(random_stack([2, 2]), [1.0, 1.0, 1.0], rank=2)

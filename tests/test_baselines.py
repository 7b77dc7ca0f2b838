"""Core-space reference merges against the same merges computed on dense deltas."""

from __future__ import annotations

import pytest
import torch

from peft_cp_merge.engine.compression import LoraStack
from peft_cp_merge.methods.cat import merge_cat
from peft_cp_merge.methods.core_space import polar
from peft_cp_merge.methods.svd import merge_svd
from peft_cp_merge.methods.tsv import merge_tsv

TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 throughout


def random_stack(ranks, d_out=14, d_in=11, *, seed=0, scales=None) -> LoraStack:
    gen = torch.Generator().manual_seed(seed)
    lora_A = [torch.randn(1, r, d_in, generator=gen, dtype=torch.float64) for r in ranks]
    lora_B = [torch.randn(1, d_out, r, generator=gen, dtype=torch.float64) for r in ranks]
    return LoraStack(lora_A, lora_B, scales or [0.5 + i for i in range(len(ranks))])


def weighted_sum(stack: LoraStack, weights) -> torch.Tensor:
    return torch.einsum("oin,n->oi", stack.to_dense()[0], torch.tensor(weights, dtype=torch.float64))


def delta(merged) -> torch.Tensor:
    return merged.lora_B @ merged.lora_A


def test_cat_is_the_exact_weighted_sum_with_peft_layout():
    stack = random_stack([3, 2, 4])
    weights = [0.7, -0.2, 1.3]
    merged = merge_cat(stack, weights)
    assert merged.lora_A.shape == (9, 11)
    torch.testing.assert_close(delta(merged), weighted_sum(stack, weights), **TOL)
    torch.testing.assert_close(merged.lora_B, stack.cat_B()[0])  # B concatenated as PEFT's "cat"


def test_svd_is_the_truncated_svd_of_the_weighted_sum():
    stack = random_stack([3, 2, 4])
    weights = [0.7, -0.2, 1.3]
    dense = weighted_sum(stack, weights)
    u, s, vh = torch.linalg.svd(dense)
    merged = merge_svd(stack, weights, rank=4)
    torch.testing.assert_close(delta(merged), (u[:, :4] * s[:4]) @ vh[:4], **TOL)
    assert merged.rel_error == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-10)


def test_svd_above_the_sum_rank_pads_with_zeros_and_is_exact():
    stack = random_stack([2, 1])
    merged = merge_svd(stack, [1.0, 1.0], rank=6)
    assert merged.lora_A.shape == (6, 11)
    assert merged.lora_A[3:].abs().max() == 0
    torch.testing.assert_close(delta(merged), weighted_sum(stack, [1.0, 1.0]), **TOL)
    assert merged.rel_error == pytest.approx(0.0, abs=1e-12)


def test_tsv_of_adapters_in_orthogonal_subspaces_is_the_weighted_sum():
    gen = torch.Generator().manual_seed(3)
    q_out = torch.linalg.qr(torch.randn(14, 5, generator=gen, dtype=torch.float64))[0]
    q_in = torch.linalg.qr(torch.randn(11, 5, generator=gen, dtype=torch.float64))[0]
    lora_B = [
        (q_out[:, :2] @ torch.randn(2, 2, generator=gen, dtype=torch.float64))[None],
        q_out[None, :, 2:],
    ]
    lora_A = [
        (torch.randn(2, 2, generator=gen, dtype=torch.float64) @ q_in[:, :2].T)[None],
        q_in[None, :, 2:].mT,
    ]
    stack = LoraStack(lora_A, lora_B, [2.0, 0.5])
    merged = merge_tsv(stack, [0.3, 1.5], rank=5)
    torch.testing.assert_close(delta(merged), weighted_sum(stack, [0.3, 1.5]), **TOL)


def test_tsv_of_two_identical_adapters_is_their_mean_weight():
    one = random_stack([3], seed=4)
    stack = LoraStack(one.lora_A * 2, one.lora_B * 2, [1.5, 1.5])
    merged = merge_tsv(stack, [0.4, 1.0], rank=3)
    torch.testing.assert_close(
        delta(merged), 0.7 * one.to_dense()[0, :, :, 0] * 1.5 / one.scales[0, 0], **TOL
    )


def test_tsv_matches_a_dense_implementation():
    stack = random_stack([3, 2, 2], seed=5)
    weights = [1.0, 0.5, -0.8]
    dense = stack.to_dense()[0]
    us, ss, vs = [], [], []
    for i, w in enumerate(weights):
        u, s, vh = torch.linalg.svd(dense[:, :, i])
        r = stack.ranks[i]
        us.append(u[:, :r])
        ss.append(w * s[:r])
        vs.append(vh[:r].T)
    expected = (polar(torch.cat(us, 1)) * torch.cat(ss)) @ polar(torch.cat(vs, 1)).T
    torch.testing.assert_close(delta(merge_tsv(stack, weights, rank=7)), expected, **TOL)


@pytest.mark.parametrize("merge", [merge_svd, merge_tsv])
def test_bad_rank_and_weights_are_refused(merge):
    stack = random_stack([2, 2])
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        merge(stack, [1.0, 1.0], rank=0)
    with pytest.raises(ValueError, match="3 weights for 2 adapters"):
        merge(stack, [1.0, 1.0, 1.0], rank=2)


def test_float32_inputs_give_float32_factors():
    stack = random_stack([2, 2])
    stack32 = LoraStack([a.float() for a in stack.lora_A], [b.float() for b in stack.lora_B], stack.scales)
    merged = merge_svd(stack32, [1.0, 1.0], rank=3)
    assert merged.lora_A.dtype == merged.lora_B.dtype == torch.float32
    torch.testing.assert_close(
        delta(merged), delta(merge_svd(stack, [1.0, 1.0], rank=3)).float(), rtol=1e-5, atol=1e-5
    )


def test_polar_of_a_batch_is_each_matrix_polar_with_its_own_cutoff():
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    deficient = torch.cat([full[:, :3], full[:, :2]], dim=1)  # rank 3: two columns repeated
    batch = torch.stack([full, deficient])
    for x, p in zip(batch, polar(batch), strict=True):
        torch.testing.assert_close(p, polar(x), **TOL)
    torch.testing.assert_close(polar(full).T @ polar(full), torch.eye(5, dtype=torch.float64), **TOL)
    assert torch.linalg.matrix_rank(polar(deficient)) == 3


def test_tsv_ignores_an_adapter_with_weight_zero():
    stack = random_stack([3, 2, 4], seed=4)
    first = LoraStack([stack.lora_A[0]], [stack.lora_B[0]], [float(stack.scales[0][0])])
    with_zero = merge_tsv(stack, [1.3, 0.0, 0.0], rank=9)
    alone = merge_tsv(first, [1.3], rank=3)
    torch.testing.assert_close(delta(with_zero), delta(alone), **TOL)


def test_tsv_of_a_module_whose_adapters_all_have_weight_zero_is_zero():
    # A module that only a zero-weight adapter adapts: nothing to whiten, an all-zero delta.
    merged = merge_tsv(random_stack([3], seed=1), [0.0], rank=3)
    assert torch.count_nonzero(delta(merged)) == 0
    assert polar(torch.zeros(5, 0, dtype=torch.float64)).shape == (5, 0)

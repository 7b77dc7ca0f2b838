import pytest
import torch
from testing_utils import random_stack

from peft_cp_merge.engine.compression import LoraCore, LoraStack, compress, lift


def _dense_from_core(stack, compressed):
    q_b = stack.cat_B() @ compressed.basis_B
    q_a = stack.cat_A().mT @ compressed.basis_A
    return torch.einsum("bim,bjn,bmnk->bijk", q_b, q_a, compressed.core.to_dense())


def test_core_reproduces_the_stack_exactly():
    stack = random_stack([4, 2, 3], batch=2)
    compressed = compress(stack)
    dense = stack.to_dense()
    assert compressed.core.shape == (2, 9, 9, 3)
    assert torch.allclose(_dense_from_core(stack, compressed), dense, rtol=0, atol=1e-12 * dense.abs().max())


def test_bases_are_orthonormal_and_norms_are_kept():
    stack = random_stack([3, 5], batch=2)
    compressed = compress(stack)
    q_b = stack.cat_B() @ compressed.basis_B
    assert torch.allclose(q_b.mT @ q_b, torch.eye(8, dtype=torch.float64).expand(2, -1, -1), atol=1e-12)
    core_sq, dense_sq = (
        compressed.core.to_dense().square().sum((1, 2, 3)),
        stack.to_dense().square().sum((1, 2, 3)),
    )
    assert torch.allclose(core_sq, dense_sq, rtol=1e-12)


def test_nearly_collinear_float32_adapters_still_get_orthonormal_bases():
    # Adapter 2 is adapter 1 plus 1 % noise: the equilibrated float32 Gram is positive definite (its
    # Cholesky succeeds) but ill conditioned, and a basis from it is orthonormal only to ~5e-3. The
    # guard on the Cholesky pivots sends it to the float64 eigendecomposition instead.
    gen = torch.Generator().manual_seed(0)
    lora_A = torch.randn(1, 4, 48, generator=gen)
    lora_B = torch.randn(1, 64, 4, generator=gen)
    stack = LoraStack(
        [lora_A, lora_A + 1e-2 * torch.randn(1, 4, 48, generator=gen)],
        [lora_B, lora_B + 1e-2 * torch.randn(1, 64, 4, generator=gen)],
        [1.0, 0.5],
    )
    compressed = compress(stack)
    eye = torch.eye(8, dtype=torch.float64)
    for cat, basis in ((stack.cat_B(), compressed.basis_B), (stack.cat_A().mT, compressed.basis_A)):
        q = cat.double() @ basis
        assert (q.mT @ q - eye).abs().max() < 1e-4
    assert compressed.rank_B.tolist() == compressed.rank_A.tolist() == [8]
    exact = LoraStack([a.double() for a in stack.lora_A], [b.double() for b in stack.lora_B], stack.scales)
    dense = exact.to_dense()
    assert torch.allclose(_dense_from_core(exact, compressed), dense, atol=1e-6 * dense.abs().max())


def test_shared_directions_give_a_rank_deficient_basis_and_stay_exact():
    stack = random_stack([4, 4])
    shared = LoraStack(stack.lora_A, [stack.lora_B[0], stack.lora_B[0]], [1.0, 2.0])
    compressed = compress(shared)
    assert compressed.rank_B.tolist() == [4]
    assert compressed.rank_A.tolist() == [8]
    dense = shared.to_dense()
    assert torch.allclose(_dense_from_core(shared, compressed), dense, atol=1e-12 * dense.abs().max())


def test_lift_maps_core_factors_back():
    stack = random_stack([2, 2])
    compressed = compress(stack)
    core_factor = torch.randn(1, 4, 3, dtype=torch.float64)
    lifted = lift(core_factor, stack.cat_B(), compressed.basis_B)
    assert lifted.shape == (1, 24, 3)
    assert torch.allclose(lifted.norm(dim=1), core_factor.norm(dim=1))


def test_float32_inputs_keep_float32_lifts():
    stack = random_stack([2, 3], dtype=torch.float32)
    compressed = compress(stack)
    assert compressed.core.left.dtype == torch.float64
    assert (
        lift(torch.ones(1, 5, 2, dtype=torch.float64), stack.cat_B(), compressed.basis_B).dtype
        == torch.float32
    )


def test_cores_of_different_ranks_do_not_batch():
    a, b = compress(random_stack([2, 2])).core, compress(random_stack([3, 1])).core
    with pytest.raises(ValueError, match="different ranks"):
        LoraCore.cat([a, b])


@pytest.mark.parametrize(
    ("lora_A", "lora_B", "scales", "message"),
    [
        ([torch.ones(1, 2, 5)], [torch.ones(1, 4, 3)], [1.0], "rank 2 != lora_B rank 3"),
        ([torch.ones(1, 2, 5), torch.ones(1, 2, 6)], [torch.ones(1, 4, 2)] * 2, [1.0, 1.0], "do not match"),
        ([torch.ones(2, 5)], [torch.ones(4, 2)], [1.0], "must be 3-D"),
        ([torch.ones(1, 2, 5)], [torch.ones(1, 4, 2)], [1.0, 2.0], "scales must have shape"),
        ([], [], [], "same positive number"),
    ],
)
def test_bad_stacks_are_rejected(lora_A, lora_B, scales, message):
    with pytest.raises(ValueError, match=message):
        LoraStack(lora_A, lora_B, scales)


def test_the_eigh_fallback_undoes_the_equilibration_in_float64():
    """Nearly identical float32 adapters take the eigh path; its basis must be orthonormal in float64.

    Un-equilibrating the float64 eigh basis with norms from the float32 Gram left errors near 1e-3.
    """
    gen = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(1, 4, 64, generator=gen), 5 * torch.randn(1, 80, 4, generator=gen)
    a2 = a1 + 1e-3 * torch.randn(1, 4, 64, generator=gen)
    b2 = b1 + 1e-3 * torch.randn(1, 80, 4, generator=gen)
    compressed = compress(LoraStack([a1, a2], [b1, b2], [1.0, 1.0]))
    q = torch.cat([b1, b2], dim=2).double() @ compressed.basis_B
    kept = q[0][:, q[0].norm(dim=0) > 0]
    assert (kept.T @ kept - torch.eye(kept.shape[1], dtype=kept.dtype)).abs().max() < 1e-6

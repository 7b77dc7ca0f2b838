"""Shared fixtures: seeded random LoRA stacks and tiny PEFT models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_cp_merge.engine.compression import LoraStack

# The tests use tiny tensors: one thread is fastest, and immune to a busy neighbour on a shared machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def random_stack(
    ranks, d_out=24, d_in=20, *, batch=1, scales=None, dtype=torch.float64, seed=0, device="cpu"
) -> LoraStack:
    """A LoRA stack with Gaussian factors of the given ranks."""
    gen = torch.Generator().manual_seed(seed)
    lora_A = [torch.randn(batch, r, d_in, generator=gen, dtype=dtype).to(device) for r in ranks]
    lora_B = [torch.randn(batch, d_out, r, generator=gen, dtype=dtype).to(device) for r in ranks]
    if scales is None:
        scales = [0.5 + i for i in range(len(ranks))]
    return LoraStack(lora_A, lora_B, scales)


def planted_cp(batch, dims, rank, *, seed=0, dtype=torch.float64):
    """A dense batch of exactly rank-``rank`` tensors and its factors."""
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(batch, d, rank, generator=gen, dtype=dtype) for d in dims]
    return torch.einsum("bir,bjr,bkr->bijk", *factors), factors


class TinyNet(nn.Module):
    """Embedding -> Linear -> Linear, plus a Conv2d branch, for LoRA layer kinds."""

    def __init__(self, vocab=40, hidden=16, inner=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.lin0 = nn.Linear(hidden, inner)
        self.lin1 = nn.Linear(inner, hidden)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)

    def forward(self, ids, image=None):
        out = self.lin1(torch.relu(self.lin0(self.emb(ids))))
        if image is None:
            return out
        return out, self.conv(image)


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def ids():
    return torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(1))

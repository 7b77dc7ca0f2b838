"""Tiny models and adapter folders for the folder-merge, CLI and analysis tests."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import Tensor, nn

BASE_NAME = "tiny-base"
TARGETS = ("emb", "conv", "lin1", "lin2")


class TinyNet(nn.Module):
    """Embedding -> Conv1d -> Linear -> Linear: one module of each LoRA layer kind.

    Modules are registered in name order, so the in-memory merge batches them in the same order as
    the folder merge (which sees only sorted file keys): CP-ALS stopped at ``n_iter_max`` can differ
    in the last digits with the order of a batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.emb = nn.Embedding(20, 8)
        self.lin1 = nn.Linear(8, 12)
        self.lin2 = nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(self.emb(x).transpose(1, 2)).transpose(1, 2)
        return self.lin2(torch.relu(self.lin1(h)))


def tiny_base(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    base = TinyNet()
    return base


def save_peft_adapter(base: nn.Module, path: Path, *, seed: int, **config) -> Path:
    """Train nothing: a random (``init_lora_weights=False``) adapter saved by PEFT itself."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": list(TARGETS), **config}
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(str(path))
    return path


def write_adapter(
    path: Path,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    *,
    r: int,
    lora_alpha: float,
    base: str = BASE_NAME,
    **config,
) -> Path:
    """Write an adapter folder from given ``{module: (A (r, d_in), B (d_out, r))}`` Linear factors."""
    path.mkdir(parents=True)
    LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=sorted(factors), base_model_name_or_path=base, **config
    ).save_pretrained(str(path))
    tensors = {}
    for name, (lora_A, lora_B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_B.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]

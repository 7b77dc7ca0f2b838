"""Quick start: merge three LoRA adapters with combination_type="cp", offline, in seconds on a CPU.

Builds a tiny Llama from a config (random weights, nothing downloaded), gives it three LoRA
adapters that share part of their directions (as adapters fine-tuned from one base often do), and
merges them with PEFT's add_weighted_adapter:

- "cp" with its defaults: whitened, with a flat spectrum, at rank sum r_i = 24, weights 1 each (every
  adapter kept at about its own strength; not the weighted sum, on purpose);
- the sum-like "cp" (cp_whiten=False, cp_isotropic=False) at several ranks, with the CP fit and the
  distance of the merged delta from the exact weighted sum (PEFT's "cat", rank sum r_i);
- PEFT's own "svd" at the same ranks, for comparison;
- then saves the default cp adapter and reloads it with PeftModel.from_pretrained.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

import peft_cp_merge  # adds combination_type="cp" to add_weighted_adapter

ADAPTERS = ["math", "code", "chat"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
    )
    return LlamaForCausalLM(config).eval()


def add_adapters(base: LlamaForCausalLM):
    """Three rank-8 adapters: half of each adapter's directions are shared by all three."""
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                shared_B = torch.randn(layer.out_features, 4, generator=gen) * 0.05
                shared_A = torch.randn(4, layer.in_features, generator=gen) * 0.05
                for name in ADAPTERS:
                    layer.lora_B[name].weight[:, :4] = shared_B * (1 + 0.1 * torch.randn(1, generator=gen))
                    layer.lora_A[name].weight[:4] = shared_A
    return model


def distance_from_exact_sum(model, merged: str, weights: list[float]) -> float:
    """Relative Frobenius distance of the merged delta from sum_i w_i dW_i, over all LoRA layers."""
    num = den = 0.0
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and merged in layer.lora_A:
            exact = sum(w * layer.get_delta_weight(a) for a, w in zip(ADAPTERS, weights, strict=True))
            num += (layer.get_delta_weight(merged) - exact).square().sum().item()
            den += exact.square().sum().item()
    return (num / den) ** 0.5


def main() -> None:
    model = add_adapters(tiny_llama())
    weights = [1.0, 1.0, 1.0]
    print(f"peft-cp-merge {peft_cp_merge.__version__}: merging {ADAPTERS} (rank 8 each), weights {weights}\n")
    print(f"{'merge':<14}{'rank':>5}{'CP fit error':>14}{'distance from exact sum':>26}{'time':>9}")
    report = model.add_weighted_adapter(ADAPTERS, weights, "cp", combination_type="cp", cp_progress=False)
    distance = distance_from_exact_sum(model, "cp", weights)
    fit = max(report.fit_error.values())
    print(f"{'cp (default)':<14}{report.rank:>5}{fit:>14.2e}{distance:>26.2e}{report.seconds:>8.2f}s")
    sum_like = {"cp_whiten": False, "cp_isotropic": False}
    for rank in (4, 8, 16, 24):
        report = model.add_weighted_adapter(
            ADAPTERS, weights, f"cp{rank}", combination_type="cp", cp_rank=rank, cp_progress=False, **sum_like
        )
        fit = max(report.fit_error.values())
        print(
            f"{'cp sum-like':<14}{rank:>5}{fit:>14.2e}"
            f"{distance_from_exact_sum(model, f'cp{rank}', weights):>26.2e}{report.seconds:>8.2f}s"
        )
    for rank in (4, 8):
        model.add_weighted_adapter(ADAPTERS, weights, f"svd{rank}", combination_type="svd", svd_rank=rank)
        distance = distance_from_exact_sum(model, f"svd{rank}", weights)
        print(f"{'peft svd':<14}{rank:>5}{'-':>14}{distance:>26.2e}")

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    model.set_adapter("cp")
    expected = model(ids).logits
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, selected_adapters=["cp"])
        reloaded = PeftModel.from_pretrained(tiny_llama(), f"{folder}/cp")
        same = torch.equal(reloaded(ids).logits, expected)
    print(f"\nsaved cp, reloaded with PeftModel.from_pretrained: identical logits = {same}")
    print(
        "The default cp decorrelates the adapters' directions and gives them one strength, so it is\n"
        "not the sum (shared directions are not counted three times). The sum-like cp at rank\n"
        "24 = 3 x 8 holds every direction: it is then the exact weighted sum (PEFT's 'cat')."
    )


if __name__ == "__main__":
    main()

"""Reading adapter folders lazily, refusing what cannot be merged, streaming safetensors."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from testing_utils import save_peft_adapter, tiny_base, write_adapter

from peft_cp_merge.folders.reading import (
    AdapterError,
    layer_index,
    module_sort_key,
    open_adapter_folder,
    read_factors,
    stream_safetensors,
)


def test_open_reads_kinds_shapes_and_peft_scalings(tmp_path):
    base = tiny_base()
    path = save_peft_adapter(
        base,
        tmp_path / "a",
        seed=1,
        r=4,
        lora_alpha=6,
        use_rslora=True,
        rank_pattern={"lin2": 2},
        alpha_pattern={"lin1": 3},
    )
    adapter = open_adapter_folder(path)
    kinds = {name: (m.kind, m.rank, m.d_out, m.d_in) for name, m in adapter.modules.items()}
    assert kinds == {
        "conv": ("conv", 4, 8, 24),
        "emb": ("embedding", 4, 8, 20),
        "lin1": ("linear", 4, 12, 8),
        "lin2": ("linear", 2, 4, 12),
    }
    model = PeftModel.from_pretrained(tiny_base(), str(path))
    peft_scaling = {
        name.removeprefix("base_model.model."): layer.scaling["default"]
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }
    assert {name: adapter.scaling(name) for name in adapter.modules} == pytest.approx(peft_scaling, rel=1e-12)


def test_read_factors_returns_matrices_of_the_file(tmp_path):
    path = save_peft_adapter(tiny_base(), tmp_path / "a", seed=1)
    adapter = open_adapter_folder(path)
    factors = read_factors(adapter, ["conv", "emb"])
    raw = load_file(str(path / "adapter_model.safetensors"))
    assert torch.equal(factors["conv"][0], raw["base_model.model.conv.lora_A.weight"].flatten(1))
    assert torch.equal(factors["conv"][1], raw["base_model.model.conv.lora_B.weight"].flatten(1))
    assert torch.equal(factors["emb"][0], raw["base_model.model.emb.lora_embedding_A"])


@pytest.mark.filterwarnings("ignore:.*invalid shape")  # PEFT's own warning about the 1-D lora_bias
@pytest.mark.parametrize(
    ("config", "needle"),
    [({"use_dora": True}, "use_dora"), ({"lora_bias": True}, "lora_bias"), ({"bias": "all"}, "bias='all'")],
)
def test_unsupported_adapters_are_refused_with_the_reason(tmp_path, config, needle):
    targets = ["lin1", "lin2"]  # DoRA and lora_bias are not available on every layer kind
    path = save_peft_adapter(tiny_base(), tmp_path / "a", seed=1, target_modules=targets, **config)
    with pytest.raises(AdapterError, match=needle):
        open_adapter_folder(path)


def test_non_lora_and_stray_tensors_are_refused(tmp_path):
    ia3 = get_peft_model(tiny_base(), IA3Config(target_modules=["lin1"], feedforward_modules=[]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        open_adapter_folder(tmp_path / "ia3")

    path = write_adapter(
        tmp_path / "stray", {"fc": (torch.randn(2, 5), torch.randn(3, 2))}, r=2, lora_alpha=2
    )
    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors["base_model.model.fc.lora_magnitude_vector"] = torch.ones(3)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="lora_magnitude_vector"):
        open_adapter_folder(path)

    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="only safetensors"):
        open_adapter_folder(path)


def test_stream_safetensors_round_trip_in_bf16(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    layout = [(k, tuple(v.shape)) for k, v in tensors.items()]
    with stream_safetensors(
        tmp_path / "x.safetensors", layout, dtype=torch.bfloat16, metadata={"k": "v"}
    ) as w:
        for key, value in tensors.items():
            w(key, value)
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        for key, value in tensors.items():
            assert torch.equal(f.get_tensor(key), value.to(torch.bfloat16))


def test_stream_safetensors_refuses_out_of_order_and_missing_tensors(tmp_path):
    layout = [("a", (2,)), ("b", (3,))]
    with (
        pytest.raises(ValueError, match="Expected tensor 'a'"),
        stream_safetensors(tmp_path / "x.safetensors", layout, dtype=torch.float32) as write,
    ):
        write("b", torch.zeros(3))
    with (
        pytest.raises(ValueError, match="never written"),
        stream_safetensors(tmp_path / "y.safetensors", layout, dtype=torch.float32) as write,
    ):
        write("a", torch.zeros(2))


def test_module_names_sort_naturally_and_give_layer_depth():
    names = ["model.layers.10.q", "model.layers.2.q", "lm_head", "model.layers.2.k"]
    assert sorted(names, key=module_sort_key) == [
        "lm_head",
        "model.layers.2.k",
        "model.layers.2.q",
        "model.layers.10.q",
    ]
    assert [layer_index(n) for n in names] == [10, 2, None, 2]

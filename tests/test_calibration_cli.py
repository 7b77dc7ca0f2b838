"""``peft-cp-merge merge --calibration``: merge adapter folders, then learn the CP gains on examples."""

from __future__ import annotations

import copy
import json

import pytest

pytest.importorskip("sklearn")  # the library package (its data reader and tokenisation) needs the extra
pytest.importorskip("sentence_transformers")

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from testing_utils import planted_examples, save_tiny_llama

from peft_cp_merge.cli import main

pytestmark = pytest.mark.library


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama with its tokenizer, two adapters on it, and a few examples in a JSONL file."""
    root = tmp_path_factory.mktemp("calibration_cli")
    llama = save_tiny_llama(root / "llama")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(llama))
    for name, targets, seed in (("a", ["q_proj", "v_proj"], 1), ("b", ["q_proj", "up_proj"], 2)):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        get_peft_model(copy.deepcopy(base), config).save_pretrained(str(root / name))
    with (root / "few.jsonl").open("w") as file:
        for example in planted_examples([3, 3, 2]):
            file.write(json.dumps({"instruction": example.instruction, "response": example.response}) + "\n")
    return root


def merge(assets, out, *extra) -> int:
    args = ["merge", assets / "a", assets / "b", "--weights", 0.5, 0.5, "--rank", 8, "--out", out]
    return main([*map(str, args), *map(str, extra), "--no-progress"])


def test_calibration_rescales_lora_a_rows_and_the_folder_still_loads(assets, tmp_path):
    static, calibrated = tmp_path / "static", tmp_path / "calibrated"
    assert merge(assets, static) == 0
    flags = [
        "--calibration",
        assets / "few.jsonl",
        "--base-model",
        assets / "llama",
        "--calibration-steps",
        4,
    ]
    assert merge(assets, calibrated, *flags) == 0
    info = json.loads((calibrated / "merge_info.json").read_text())
    assert info["calibration"]["examples"] == 8
    assert info["calibration"]["report"]["steps"] >= 1
    before = load_file(str(static / "adapter_model.safetensors"))
    after = load_file(str(calibrated / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    moved = 0
    for key, value in before.items():
        if ".lora_B." in key:
            assert torch.equal(after[key], value)  # B is frozen
            continue
        # each row of A is only rescaled: A_new = diag(g) A_old
        gains = (after[key] * value).sum(dim=1) / value.square().sum(dim=1).clamp_min(1e-30)
        torch.testing.assert_close(after[key], gains[:, None] * value, rtol=1e-5, atol=1e-7)
        moved += int(not torch.equal(after[key], value))
    assert moved > 0
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(assets / "llama")), str(calibrated)
    )
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--calibration", "{assets}/few.jsonl"], "needs the base model"),
        (
            ["--calibration", "{assets}/few.jsonl", "--base-model", "{assets}/llama", "--method", "svd"],
            "needs method 'cp'",
        ),
        (["--base-model", "{assets}/llama"], "only used with --calibration"),
        (["--calibration", "{assets}/missing.jsonl", "--base-model", "{assets}/llama"], "missing.jsonl"),
        (["--calibration", "{assets}/few.jsonl", "--base-model", "{assets}/nowhere"], "does not exist"),
    ],
)
def test_bad_calibration_input_is_refused_before_anything_is_written(
    assets, tmp_path, capsys, extra, message
):
    out = tmp_path / "out"
    assert merge(assets, out, *(e.format(assets=assets) for e in extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()

"""``calibrate``: one gain per CP component, learned from a few examples and baked into ``lora_A``.

The planted case: adapter ``task_a`` (q/v projections) and adapter ``task_b`` (up/down projections) sit on
disjoint modules, so a full-rank ``"cp"`` merge with weights ``[0.5, 0.5]`` is exactly half of each.
Labels are what the model predicts with ``task_a`` alone at full strength, so the right gains are 2 on
``task_a``'s modules and 0 on ``task_b``'s.
"""

import statistics

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from testing_utils import tiny_llama_config
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

import peft_cp_merge  # noqa: F401  (combination_type="cp")
from peft_cp_merge.calibration import CalibrationReport, calibrate

VOCAB, LENGTH, N_EXAMPLES = 64, 16, 32
ATTN, MLP = ("q_proj", "v_proj"), ("up_proj", "down_proj")


def _base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # peaked predictions (initializer_range 0.3), so that the adapters change them
    config = tiny_llama_config(VOCAB, initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


def _model(embedding: bool = False):
    """Adapters ``task_a``, ``task_b`` (``r=4, lora_alpha=8``) and their cp merge ``merged`` (exact)."""
    configs = {"task_a": list(ATTN), "task_b": list(MLP) + (["embed_tokens"] if embedding else [])}
    model = None
    for name, targets in configs.items():
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        if model is None:
            model = get_peft_model(_base(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                for a in [*layer.lora_A.values(), *layer.lora_embedding_A.values()]:
                    a = getattr(a, "weight", a)
                    a.copy_(torch.randn(a.shape, generator=gen) / a.shape[1] ** 0.5)
                for b in [*layer.lora_B.values(), *layer.lora_embedding_B.values()]:
                    b = getattr(b, "weight", b)
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.25)
    model.add_weighted_adapter(list(configs), [0.5, 0.5], "merged", combination_type="cp", cp_progress=False)
    model.set_adapter("task_a")
    return model


def _examples(model) -> list[dict]:
    """Random token sequences labelled with ``task_a``'s greedy next-token predictions."""
    ids = torch.randint(0, VOCAB, (N_EXAMPLES, LENGTH), generator=torch.Generator().manual_seed(2))
    model.set_adapter("task_a")
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(-1)
    labels = torch.cat([torch.full((N_EXAMPLES, 1), -100), predicted[:, :-1]], dim=1)
    return [
        {"input_ids": i.tolist(), "attention_mask": [1] * LENGTH, "labels": y.tolist()}
        for i, y in zip(ids, labels, strict=True)
    ]


def _lora(model, adapter: str, part: str) -> dict[str, torch.Tensor]:
    return {
        key: getattr(layer, part)[adapter].weight.detach().clone()
        for key, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and adapter in getattr(layer, part)
    }


def _state(model):
    """What must survive a refused call bit for bit."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        model.active_adapters,
    )


def _assert_same_state(model, before) -> None:
    state, flags, modes, active = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert model.active_adapters == active


def _mean_gain(report: CalibrationReport, projections) -> float:
    return statistics.mean(g for key, g in report.module_gain_mean.items() if key.endswith(projections))


def test_planted_gains_move_towards_the_adapter_that_made_the_labels():
    model = _model()
    report = calibrate(model, "merged", _examples(model), steps=40, lr=0.05, progress=False)
    assert _mean_gain(report, ATTN) > 1.3  # towards 1 / 0.5 = 2
    assert _mean_gain(report, MLP) < 0.8  # towards 0
    assert report.holdout_loss_after < report.holdout_loss_before - 0.05


def test_the_result_is_an_ordinary_adapter(tmp_path):
    model = _model(embedding=True)
    lora_A = _lora(model, "merged", "lora_A")
    embedding_A = model.base_model.model.model.embed_tokens.lora_embedding_A["merged"].detach().clone()
    before = _state(model)
    report = calibrate(model, "merged", _examples(model), steps=10, lr=0.05, progress=False)

    state, flags, modes, active = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    changed = {key for key in state if not torch.equal(now[key], state[key])}  # lora_B, base: same bits
    assert changed == {k for k in state if ".lora_A.merged." in k or k.endswith("lora_embedding_A.merged")}
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert model.active_adapters == active
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    new_A = _lora(model, "merged", "lora_A")
    new_A["embed_tokens"] = model.base_model.model.model.embed_tokens.lora_embedding_A["merged"].detach()
    lora_A["embed_tokens"] = embedding_A
    for key, old in lora_A.items():  # every row rescaled by its gain, none mixed with another
        gains = (new_A[key] * old).sum(1) / old.square().sum(1)
        torch.testing.assert_close(new_A[key], gains[:, None] * old, rtol=1e-6, atol=0)
        module = "model.embed_tokens" if key == "embed_tokens" else key.removeprefix("base_model.model.")
        assert gains.mean().item() == pytest.approx(report.module_gain_mean[module], rel=1e-5)
    assert report.gain_max - report.gain_min > 0.1  # the gains did move

    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    model.set_adapter("merged")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path, selected_adapters=["merged"])
    reloaded = PeftModel.from_pretrained(_base(), tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_same_seed_same_bits_and_a_loader_of_the_same_examples_too():
    runs = []
    for run, as_loader in enumerate((False, False, True)):
        model = _model()
        examples = _examples(model)
        if as_loader:
            tensors = [{k: torch.tensor(v) for k, v in e.items()} for e in examples]
            examples = DataLoader(tensors, batch_size=5)
        torch.manual_seed(run)  # the global generator plays no part
        report = calibrate(model, "merged", examples, steps=6, lr=0.05, seed=3, progress=False)
        runs.append((report.module_gain_mean, _lora(model, "merged", "lora_A")))
    for gains, lora_A in runs[1:]:
        assert gains == runs[0][0]
        assert all(torch.equal(lora_A[k], runs[0][1][k]) for k in lora_A)


def test_when_calibration_only_hurts_the_held_out_loss_the_static_merge_is_kept():
    model = _model()
    lora_A = _lora(model, "merged", "lora_A")
    # lr = 3: the first Adam step moves every gain by about 3, far past any optimum.
    report = calibrate(model, "merged", _examples(model), epochs=30, lr=3.0, patience=2, progress=False)
    assert report.early_stopped
    assert report.best_step == 0
    assert report.holdout_loss_after == report.holdout_loss_before
    new_A = _lora(model, "merged", "lora_A")
    assert all(torch.equal(new_A[key], lora_A[key]) for key in lora_A)


def _with(examples, index, **fields):
    return [{**e, **fields} if i == index else e for i, e in enumerate(examples)]


BAD_CALLS = {
    "unknown adapter": (lambda ex: {"adapter_name": "zzz"}, "Unknown adapter 'zzz'"),
    "not a cp adapter": (lambda ex: {"adapter_name": "task_a"}, "was not made by combination_type='cp'"),
    "no examples": (lambda ex: {"examples": []}, "examples is empty"),
    "a single dict": (lambda ex: {"examples": ex[0]}, "must be an iterable of dicts"),
    "every label -100": (
        lambda ex: {"examples": [{**e, "labels": [-100] * LENGTH} for e in ex]},
        "Every label of every example is -100",
    ),
    "longer than the context": (
        lambda ex: {"examples": [{k: v * 5 for k, v in e.items()} for e in ex]},
        r"Example 0 has 80 tokens; the model takes 1 to 64",
    ),
    "lengths differ": (lambda ex: {"examples": _with(ex, 3, labels=[1, 2])}, "Example 3: .* one shape"),
    "id outside the vocabulary": (
        lambda ex: {"examples": _with(ex, 2, input_ids=[VOCAB] * LENGTH)},
        r"Example 2 has ids or labels outside \[0, 64\)",
    ),
    "lr 0": (lambda ex: {"lr": 0.0}, "lr must be a finite number > 0"),
    "lr nan": (lambda ex: {"lr": float("nan")}, "lr must be a finite number > 0"),
    "steps 0": (lambda ex: {"steps": 0}, "steps must be None or an integer >= 1"),
    "holdout 1": (lambda ex: {"holdout": 1.0}, r"holdout must be a finite number in \[0, 1\)"),
    "batch_size True": (lambda ex: {"batch_size": True}, "batch_size must be an integer >= 1"),
    "absent device": (lambda ex: {"device": "gpu0"}, "Unknown device 'gpu0'"),
    # After the parametrisation is in place: diverging gains, then the first loss of a broken model.
    "loss turns non-finite": (lambda ex: {"lr": 1e30}, r"loss at step \d+ is (nan|inf)"),
}


@pytest.fixture(scope="module")
def model_and_examples():
    model = _model()
    return model, _examples(model)


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_refused_and_the_model_is_unchanged(model_and_examples, case):
    model, examples = model_and_examples
    change, message = BAD_CALLS[case]
    call = {"adapter_name": "merged", "examples": examples, "steps": 3, "progress": False, **change(examples)}
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        calibrate(model, call.pop("adapter_name"), call.pop("examples"), **call)
    _assert_same_state(model, before)


def test_a_non_finite_first_loss_is_refused_before_any_update(model_and_examples):
    model, examples = model_and_examples
    lm_head = model.base_model.model.lm_head.weight
    original = lm_head[5, 0].item()
    with torch.no_grad():
        lm_head[5, 0] = float("inf")
    try:
        before = _state(model)
        with pytest.raises(ValueError, match="loss on the training examples is nan"):
            calibrate(model, "merged", examples, steps=3, progress=False)
        _assert_same_state(model, before)
    finally:
        with torch.no_grad():
            lm_head[5, 0] = original


def test_add_weighted_adapter_calibrates_when_given_examples():
    model = _model()
    examples = _examples(model)
    static = _lora(model, "merged", "lora_A")
    report = model.add_weighted_adapter(
        ["task_a", "task_b"], [0.5, 0.5], "calibrated", combination_type="cp", cp_calibration=examples
    )
    assert isinstance(report.calibration, CalibrationReport)
    assert report.calibration.adapter_name == "calibrated"
    calibrated = _lora(model, "calibrated", "lora_A")
    assert any(not torch.equal(calibrated[k], static[k]) for k in static)  # the gains moved
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_a_failed_calibration_in_add_weighted_adapter_leaves_no_adapter():
    model = _model()
    with pytest.raises(ValueError, match="examples is empty"):
        model.add_weighted_adapter(
            ["task_a", "task_b"], [0.5, 0.5], "calibrated", combination_type="cp", cp_calibration=[]
        )
    assert "calibrated" not in model.peft_config


@pytest.mark.cuda
def test_calibration_on_cuda_matches_cpu():
    """The model on CUDA (examples follow it), the same seed: the same gains as on CPU, to rounding."""
    reports = {}
    for device in ("cpu", "cuda"):
        model = _model()
        examples = _examples(model)
        model.to(device)
        reports[device] = calibrate(model, "merged", examples, steps=10, lr=0.05, progress=False)
        assert {p.device.type for p in model.parameters()} == {device}
    cpu, cuda = reports["cpu"].module_gain_mean, reports["cuda"].module_gain_mean
    assert cuda.keys() == cpu.keys()
    assert [cuda[k] for k in cpu] == pytest.approx([cpu[k] for k in cpu], rel=1e-3, abs=1e-4)
    assert reports["cuda"].steps == reports["cpu"].steps

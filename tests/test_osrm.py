"""``osrm_init``: a new adapter's ``lora_A`` starts where the other tasks' inputs have the least energy.

The planted case: a tiny model whose embeddings (the input of ``q`` and ``k``) have almost no energy
along ``PLANTED`` directions, except the padding token's, which has a lot: the new rows of ``q`` and
``k`` must span exactly those directions, which also shows that padding is left out.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import tiny_llama_config
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from peft_cp_merge import OSRMReport, osrm_init
from peft_cp_merge.osrm import bottom_eigenvectors, input_moments

D, VOCAB, RANK = 24, 40, 4
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PlantedNet(nn.Module):
    """Embedding -> q, k (the same input) -> out; ``unused`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.planted = torch.linalg.qr(torch.randn(D, RANK, generator=gen, dtype=torch.float64))[0]
        projector = torch.eye(D, dtype=torch.float64) - self.planted @ self.planted.T
        rows = torch.randn(VOCAB, D, generator=gen, dtype=torch.float64)
        weight = rows @ projector + 1e-4 * rows @ (self.planted @ self.planted.T)
        weight[0] = 10 * self.planted.sum(dim=1)  # token 0 (padding) lies in the planted directions
        self.emb = nn.Embedding(VOCAB, D, _weight=weight.float())
        self.q, self.k, self.out, self.unused = (nn.Linear(D, D) for _ in range(4))

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        return self.out(torch.tanh(self.q(h) + self.k(h)))


def planted_model(targets=("q", "k", "out")):
    torch.manual_seed(0)
    return get_peft_model(PlantedNet(), LoraConfig(r=RANK, lora_alpha=8, target_modules=list(targets)))


def examples(n=24, vocab=VOCAB, seed=1):
    """Examples of 3-12 tokens from 1..vocab-1; every third ends with masked padding (token 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, vocab, (int(torch.randint(3, 12, (), generator=gen)),), generator=gen)
        mask = torch.ones_like(ids)
        if i % 3 == 0:
            ids, mask = torch.cat([ids, torch.zeros(3, dtype=torch.long)]), torch.cat([mask, torch.zeros(3)])
        out.append({"input_ids": ids.tolist(), "attention_mask": mask.long().tolist()})
    return out


def lora_A(model, module):
    return next(p for n, p in model.named_parameters() if n.endswith(f"{module}.lora_A.default.weight"))


def tiny_llama():
    torch.manual_seed(0)
    config = tiny_llama_config(VOCAB)
    return get_peft_model(LlamaForCausalLM(config).eval(), LoraConfig(r=RANK, target_modules=LLAMA_TARGETS))


def base_inputs(model, names, rows):
    """Module name -> (tokens, d_in) float64 inputs of the base model, by plain hooks (a reference)."""
    captured = {name: [] for name in names}
    modules = dict(model.get_base_model().named_modules())
    handles = [
        modules[name].base_layer.register_forward_pre_hook(
            lambda m, args, name=name: captured[name].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for name in names
    ]
    with torch.no_grad():
        for row in rows:
            kept = [i for i, m in zip(row["input_ids"], row["attention_mask"], strict=True) if m]
            model.get_base_model()(input_ids=torch.tensor([kept]))  # the padding is at the end
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts).double() for name, parts in captured.items()}


def test_planted_low_energy_directions_are_recovered_and_padding_is_ignored():
    model = planted_model()
    report = osrm_init(model, "default", examples(), progress=False)
    projector = model.base_model.model.planted @ model.base_model.model.planted.T
    for module in ("q", "k"):
        a = lora_A(model, module).detach().double()
        assert torch.allclose(a @ a.T, torch.eye(RANK, dtype=torch.float64), atol=1e-6)  # A A^T = I
        assert torch.linalg.norm(a.T @ a - projector) < 1e-3  # the rows span the planted directions
    assert report.module_energy_ratio["q"] < 1e-6
    assert report.replaced_energy_ratio_mean > 0.3  # the random rows they replaced: about 1


def test_rows_are_the_bottom_eigenvectors_and_capture_far_less_energy_than_random_rows():
    model, rows = tiny_llama(), examples(16)
    names = [n.removesuffix(".base_layer") for n, _ in model.get_base_model().named_modules()]
    names = [n for n in names if n.split(".")[-1] in LLAMA_TARGETS and not n.endswith("default")]
    names = sorted(set(names))
    report = osrm_init(model, "default", rows, progress=False)
    inputs = base_inputs(model, names, rows)
    gen = torch.Generator().manual_seed(3)
    for name in names:
        h = inputs[name]
        moment = h.T @ h
        a = lora_A(model, name).detach().double()
        energy = float((a @ h.T).square().sum())
        smallest = float(torch.linalg.eigvalsh(moment)[:RANK].sum())
        assert energy == pytest.approx(smallest, rel=1e-4, abs=1e-6 * float(moment.trace()))
        random_rows = torch.linalg.qr(torch.randn(h.shape[1], RANK, generator=gen, dtype=torch.float64))[0].T
        random_energy = float((random_rows @ h.T).square().sum())
        assert energy < 0.1 * random_energy  # far less than random orthonormal rows
    assert report.energy_ratio_max < 0.1 < 0.5 < report.replaced_energy_ratio_mean  # random rows: ~1


def test_outputs_are_unchanged_right_after_init_and_freeze_a():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(5))
    before = model(input_ids=ids).logits
    report = osrm_init(model, "default", examples(8), freeze_a=True, progress=False)
    assert torch.equal(model(input_ids=ids).logits, before)
    assert report.frozen_a
    flags = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
    assert not any(flag for n, flag in flags.items() if "lora_A" in n)
    assert all(flag for n, flag in flags.items() if "lora_B" in n)


def test_modules_reading_one_input_share_one_statistic():
    model = tiny_llama()
    report = osrm_init(model, "default", examples(8), progress=False)
    kinds = sorted(tuple(name.split(".")[-1] for name in group) for group in report.groups)
    assert kinds == sorted(
        [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)] * 2
    )
    assert torch.equal(lora_A(model, "layers.0.self_attn.q_proj"), lora_A(model, "layers.0.self_attn.v_proj"))
    tokens = sum(sum(row["attention_mask"]) for row in examples(8))
    assert report.tokens == tokens  # each group counted its tokens once, padding left out
    planted = osrm_init(planted_model(), "default", examples(), progress=False)
    assert planted.groups == (("q", "k"), ("out",))


def test_a_loader_moments_and_examples_give_the_same_rows():
    rows = examples(12)
    by_list, by_loader, by_moments = planted_model(), planted_model(), planted_model()
    osrm_init(by_list, "default", rows, progress=False)
    loader = DataLoader(
        [{k: torch.tensor(v) for k, v in r.items()} for r in rows if len(r["input_ids"]) == 7], batch_size=2
    )
    osrm_init(by_loader, "default", loader, progress=False)
    same_length = [r for r in rows if len(r["input_ids"]) == 7]
    reference = planted_model()
    osrm_init(reference, "default", same_length, progress=False)
    assert torch.equal(lora_A(by_loader, "out"), lora_A(reference, "out"))

    total = input_moments(by_moments, "default", rows)
    own = input_moments(by_moments, "default", rows[:4])
    report = osrm_init(by_moments, "default", total.minus(own), progress=False)
    direct = planted_model()
    osrm_init(direct, "default", rows[4:], progress=False)
    assert report.examples == 8
    a, b = lora_A(by_moments, "out").detach(), lora_A(direct, "out").detach()
    assert torch.allclose(a.T @ a, b.T @ b, atol=1e-5)  # the same subspace


def test_max_examples_takes_the_first_ones():
    report = osrm_init(planted_model(), "default", examples(20), max_examples=5, progress=False)
    assert isinstance(report, OSRMReport)
    assert report.examples == 5


def test_inverse_iteration_matches_eigh_above_the_dense_size():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2000, 300, generator=gen, dtype=torch.float64) * torch.logspace(
        0, -3, 300, dtype=torch.float64
    )
    moment = h.T @ h
    vectors = bottom_eigenvectors(moment, 6)
    values, reference = torch.linalg.eigh(moment)
    assert torch.linalg.norm(vectors @ vectors.T - reference[:, :6] @ reference[:, :6].T) < 2e-2
    assert float((vectors.T @ moment @ vectors).trace()) == pytest.approx(float(values[:6].sum()), rel=1e-5)
    singular = h[:100].T @ h[:100]  # rank 100 < 300: any null-space vectors are right
    null = bottom_eigenvectors(singular, 6)
    assert float((null.T @ singular @ null).trace()) < 1e-9 * float(singular.trace())


def state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
    )


def assert_same_state(model, before):
    tensors, flags, modes = before
    after = model.state_dict()
    assert tensors.keys() == after.keys()
    assert all(torch.equal(tensors[k], after[k]) for k in tensors)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert modes == [m.training for m in model.modules()]


def with_nonzero_b(model):
    with torch.no_grad():
        lora_A(model, "out")  # exists
        next(p for n, p in model.named_parameters() if n.endswith("out.lora_B.default.weight")).fill_(0.1)
    return model


def with_infinite_embedding(model):
    with torch.no_grad():
        model.base_model.model.emb.weight[5] = float("inf")
    return model


BAD = {
    "no examples": (planted_model, [], {}, "empty"),
    "unknown adapter": (planted_model, examples(), {"adapter_name": "other"}, "Unknown adapter 'other'"),
    "B not zero": (lambda: with_nonzero_b(planted_model()), examples(), {}, "not freshly initialised"),
    "never reached": (lambda: planted_model(("q", "unused")), examples(), {}, "never reach 1 module"),
    "non-finite": (lambda: with_infinite_embedding(planted_model()), examples(), {}, "Non-finite"),
    "embedding target": (lambda: planted_model(("q", "emb")), examples(), {}, "Linear modules only"),
    "id out of range": (tiny_llama, [{"input_ids": [1, VOCAB]}], {}, "outside"),
    "forward fails": (planted_model, [{"input_ids": [1, VOCAB]}], {}, "forward pass failed"),
    "float ids": (planted_model, [{"input_ids": [1.0, 2.0]}], {}, "integers"),
    "mask not 0/1": (planted_model, [{"input_ids": [1, 2], "attention_mask": [1, 2]}], {}, "0 and 1"),
    "all masked": (planted_model, [{"input_ids": [1, 2], "attention_mask": [0, 0]}], {}, "no token"),
    "not a dict": (planted_model, [[1, 2]], {}, "must be a dict"),
    "max_examples": (planted_model, examples(), {"max_examples": 0}, "max_examples"),
    "batch_size": (planted_model, examples(), {"batch_size": 1.5}, "batch_size"),
    "freeze_a": (planted_model, examples(), {"freeze_a": "yes"}, "freeze_a"),
    "max_memory_gb 0": (planted_model, examples(), {"max_memory_gb": 0}, "max_memory_gb"),
    "max_memory_gb nan": (planted_model, examples(), {"max_memory_gb": float("nan")}, "max_memory_gb"),
    "max_memory_gb str": (planted_model, examples(), {"max_memory_gb": "8"}, "max_memory_gb"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_refused_and_the_model_is_unchanged(case):
    make, other, kwargs, message = BAD[case]
    model = make()
    before = state(model)
    kwargs = {"adapter_name": "default", **kwargs}
    with pytest.raises(ValueError, match=message):
        osrm_init(model, other_examples=other, progress=False, **kwargs)
    assert_same_state(model, before)


def test_force_rewrites_a_trained_adapter_and_a_plain_model_is_refused():
    model = with_nonzero_b(planted_model())
    report = osrm_init(model, "default", examples(), force=True, progress=False)
    assert report.module_energy_ratio["q"] < 1e-6
    with pytest.raises(ValueError, match="Expected a PeftModel"):
        osrm_init(PlantedNet(), "default", examples())

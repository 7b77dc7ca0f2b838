"""``osrm_init`` under a memory budget: statistics in several passes, forwards stopped early.

Splitting the modules into passes must not change a single row (each pass sums the same float32
batch products), every forward must stop once the hooked modules have their inputs (the LM head
never runs), and ``input_moments``, which holds every statistic at once, refuses a budget too small.
"""

import pytest
import torch
from test_osrm import examples, lora_A, tiny_llama

from peft_cp_merge import osrm_init
from peft_cp_merge.osrm import input_moments, statistics_gb
from peft_cp_merge.osrm_statistics import module_passes, moment_bytes


def a_rows(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def test_passes_give_the_rows_of_one_pass_and_forwards_stop_before_the_head():
    rows = examples(10)
    one, many = tiny_llama(), tiny_llama()
    head_calls = []
    for model in (one, many):
        model.get_base_model().lm_head.register_forward_pre_hook(lambda m, a: head_calls.append(1))
    single = osrm_init(one, "default", rows, max_memory_gb=None, progress=False)
    smallest = min(moment_bytes(p.shape[1]) for n, p in many.named_parameters() if "lora_A" in n)
    split = osrm_init(many, "default", rows, max_memory_gb=1.5 * smallest / 2**30, progress=False)
    assert head_calls == []  # every forward stopped after the last hooked module
    assert a_rows(one).keys() == a_rows(many).keys()
    assert all(torch.equal(a_rows(one)[k], a_rows(many)[k]) for k in a_rows(one))
    assert split.tokens == single.tokens
    assert split.examples == single.examples
    assert len(split.groups) > len(single.groups)  # no sharing across passes
    assert split.module_energy_ratio == pytest.approx(single.module_energy_ratio)


def test_module_passes_respect_the_budget_and_the_order():
    d_ins = {"a": 8, "b": 8, "c": 16, "d": 4, "e": 100}
    budget = 2 * moment_bytes(8) + 4 * 8 * 8
    passes = module_passes(d_ins, budget)
    assert [name for chunk in passes for name in chunk] == list(d_ins)
    assert passes == [["a", "b"], ["c"], ["d"], ["e"]]  # "e" alone exceeds it: a pass of its own
    assert module_passes(d_ins, float("inf")) == [list(d_ins)]


def test_statistics_gb_and_input_moments_refuse_a_budget_too_small():
    model = tiny_llama()
    expected = sum(moment_bytes(p.shape[1]) for n, p in model.named_parameters() if "lora_A" in n)
    assert statistics_gb(model, "default") == pytest.approx(expected / 2**30)
    with pytest.raises(ValueError, match=r"need up to .* over max_memory_gb"):
        input_moments(model, "default", examples(4), max_memory_gb=expected / 2**30 / 2)
    moments = input_moments(model, "default", examples(4), max_memory_gb=expected / 2**30)
    assert moments.examples == 4
    assert lora_A(model, "layers.0.self_attn.q_proj").requires_grad  # nothing written

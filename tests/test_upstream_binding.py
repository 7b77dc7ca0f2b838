"""How ``combination_type="cp"`` reaches this package, for whichever PEFT is imported.

In the normal suite PEFT has no combination-type hook, so "cp" comes through the wrapper.
``test_upstream.py`` runs this same file against copies of PEFT with the ``upstream/`` patches, and
says through ``PEFT_CP_MERGE_EXPECT`` what must happen there: ``hook`` (patch 0001: "cp" registered
through ``register_combination_type``) or ``peft`` (patches 0001 + 0002: PEFT's own "cp" is left in
place, with a warning).
"""

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

from peft_cp_merge import add_cp_weighted_adapter
from peft_cp_merge import peft_binding as binding

EXPECT = os.environ.get("PEFT_CP_MERGE_EXPECT", "wrapper")
ADAPTERS, WEIGHTS, RANK = ["x", "y", "z"], [0.5, -1.0, 2.0], 3


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(12, 10), nn.Linear(10, 6)

    def forward(self, x):
        return self.lin1(self.lin0(x))


@pytest.fixture
def planted():
    """Three rank-3 adapters whose deltas ``U diag(c_i) V^T`` share ``U`` and ``V`` in each layer.

    Their stack has CP rank 3, so a rank-3 "cp" merge is exactly ``sum_i w_i dW_i``.
    """
    torch.manual_seed(0)
    config = LoraConfig(target_modules=["lin0", "lin1"], r=RANK, lora_alpha=RANK, init_lora_weights=False)
    model = get_peft_model(TwoLinear(), config, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, config)
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            v = torch.randn(RANK, layer.in_features)
            u = torch.randn(layer.out_features, RANK)
            for name in ADAPTERS:
                layer.lora_A[name].weight.data = v.clone()
                layer.lora_B[name].weight.data = u * torch.randn(RANK)
    return model


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_cp_is_bound_as_expected():
    if EXPECT == "peft":
        with pytest.warns(UserWarning, match="PEFT has its own combination_type='cp'"):
            binding.register()
    assert binding.registered_via() == {"wrapper": "wrapper", "hook": "hook", "peft": None}[EXPECT]


def test_cp_through_peft_equals_the_direct_merge(planted):
    # The sum-like cp (whitening and the flat spectrum off), the merge PEFT's own "cp" (patch 0002)
    # implements; PEFT's own takes cp_rank only.
    sum_like = {} if EXPECT == "peft" else {"cp_whiten": False, "cp_isotropic": False}
    planted.add_weighted_adapter(
        ADAPTERS, WEIGHTS, "via_peft", combination_type="cp", cp_rank=RANK, **sum_like
    )
    add_cp_weighted_adapter(planted, ADAPTERS, WEIGHTS, "direct", rank=RANK, whiten=False, isotropic=False)
    for layer in _layers(planted):
        exact = sum(w * layer.get_delta_weight(a) for a, w in zip(ADAPTERS, WEIGHTS, strict=True))
        torch.testing.assert_close(layer.get_delta_weight("direct"), exact, atol=1e-4, rtol=1e-4)
        if EXPECT == "peft":  # PEFT's own cp: the same maths, other ALS details
            torch.testing.assert_close(layer.get_delta_weight("via_peft"), exact, atol=1e-4, rtol=1e-4)
        else:  # this package's merge, bit for bit
            assert torch.equal(layer.lora_A["via_peft"].weight, layer.lora_A["direct"].weight)
            assert torch.equal(layer.lora_B["via_peft"].weight, layer.lora_B["direct"].weight)


def test_unregister_then_register_again(planted):
    if EXPECT == "peft":
        pytest.skip("PEFT's own 'cp' is never replaced")
    try:
        binding.unregister()
        assert not binding.is_registered()
        assert not hasattr(LoraModel.add_weighted_adapter, "_peft_cp_merge_original")
        with pytest.raises(ValueError, match="Invalid combination_type"):
            planted.add_weighted_adapter(ADAPTERS, WEIGHTS, "merged", combination_type="cp")
    finally:
        binding.register()
    report = planted.add_weighted_adapter(ADAPTERS, WEIGHTS, "merged", combination_type="cp", cp_rank=RANK)
    assert report.rank == RANK


def test_unknown_cp_options_are_refused_before_the_model_changes(planted):
    if EXPECT == "peft":
        pytest.skip("PEFT's own 'cp' has its own checks")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['cp_ranks'\]"):
        planted.add_weighted_adapter(ADAPTERS, WEIGHTS, "merged", combination_type="cp", cp_ranks=RANK)
    assert "merged" not in planted.peft_config

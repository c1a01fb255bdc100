"""One pass-start signal: the wrapper's forward pre-hook on the top-level model (shared with capture_routing)
counts each forward pass once, hands its index on, and is gone after unwrap."""

import pytest
import torch
from conftest import build_tiny, make_inputs

from specmoe import SpeculativeMoE
from specmoe.predictors import OraclePredictor
from specmoe.runtime.hooks import PassMarker
from specmoe.traces import capture_routing

NEW = 4


def _hooks(module):
    return len(module._forward_pre_hooks) + len(module._forward_hooks)


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
def test_one_pass_per_forward_call_handed_to_capture_and_scheduler(family):
    model = build_tiny(family)
    inputs = make_inputs(model)
    before = _hooks(model)
    enc_before = _hooks(model.get_encoder()) if family == "switch_transformers" else 0
    smoe = SpeculativeMoE(model, None, 0.5, device="cpu")
    assert model._specmoe_passes is smoe._passes and _hooks(model) == before + 2
    seen = []
    with torch.no_grad(), capture_routing(model) as cap:
        smoe._passes.listeners.append(seen.append)
        smoe.generate(**inputs, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
    # generate: a prefill and NEW - 1 decode passes (+ the encoder run alone for encoder-decoder models)
    expected = NEW + (1 if family == "switch_transformers" else 0)
    assert seen == list(range(expected)) and len(cap.passes) == expected
    assert smoe.hot.pass_index == expected - 1  # what the scheduler's begin got last
    with torch.no_grad():  # a direct call: the encoder runs inside the model's forward, one pass in all
        smoe(**inputs, **({"decoder_input_ids": inputs["input_ids"][:, :1]} if family == "switch_transformers" else {}))
    assert smoe._passes.index == expected
    smoe.unwrap()
    assert "_specmoe_passes" not in model.__dict__ and _hooks(model) == before
    if family == "switch_transformers":
        assert _hooks(model.get_encoder()) == enc_before


def test_the_oracle_follows_the_pass_index_not_layer_order():
    model = build_tiny("mixtral")
    inputs = make_inputs(model)
    with torch.no_grad(), capture_routing(model) as cap:
        ref = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    oracle = OraclePredictor(cap.routing())  # the one routing table, cut into the passes the model ran
    smoe = SpeculativeMoE(model, oracle, 1.0, device="cpu")
    passes = []
    smoe._passes.listeners.append(lambda i: passes.append(oracle._pass))
    with torch.no_grad():
        assert torch.equal(smoe.generate(**inputs, max_new_tokens=NEW, do_sample=False), ref)
        smoe.generate(**inputs, max_new_tokens=NEW, do_sample=False)  # reset: the oracle counts from 0 again
    assert passes == list(range(len(cap.passes))) * 2
    smoe.unwrap()


def test_a_marker_is_shared_and_removed_after_its_last_user():
    model = build_tiny("qwen2_moe")
    before = _hooks(model)
    a, b = [], []
    m1 = PassMarker.attach(model, a.append)
    m2 = PassMarker.attach(model, b.append)
    assert m1 is m2
    with torch.no_grad():
        model(**make_inputs(model))
    m1.detach(model, a.append)
    with torch.no_grad():
        model(**make_inputs(model))
    assert a == [0] and b == [0, 1]
    m2.detach(model, b.append)
    assert "_specmoe_passes" not in model.__dict__ and _hooks(model) == before

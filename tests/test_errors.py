"""Bad input gets a clear error and leaves the model untouched."""

import pytest
import torch
from conftest import build_tiny
from transformers import LlamaConfig, LlamaForCausalLM

from specmoe import MoEGeometry, SpeculativeMoE
from specmoe.predictors import PreGatePredictor, RandomPredictor
from specmoe.runtime.capacity import parse_bytes, resolve_capacity


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: p.device for n, p in model.named_parameters()}


def assert_untouched(model, snap):
    state, devices = snap
    now = model.state_dict()
    assert state.keys() == now.keys() and all(torch.equal(state[k], now[k]) for k in state)
    assert {n: p.device for n, p in model.named_parameters()} == devices
    assert getattr(model, "_specmoe_wrapper", None) is None
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize(
    "capacity, error, match",
    [
        (0, ValueError, ">= 1"),
        (-3, ValueError, ">= 1"),
        (0.0, ValueError, r"\(0, 1\]"),
        (1.5, ValueError, r"\(0, 1\]"),
        (float("nan"), ValueError, r"\(0, 1\]"),
        (True, TypeError, "cache_capacity"),
        (None, TypeError, "cache_capacity"),
        ("1KiB", ValueError, "smaller than one expert"),
        ("lots", ValueError, "memory size"),
    ],
)
def test_bad_capacity(capacity, error, match):
    model = build_tiny("mixtral")
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        SpeculativeMoE(model, cache_capacity=capacity)
    assert_untouched(model, snap)


def test_dense_model():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64))
    snap = snapshot(model)
    with pytest.raises(TypeError, match="Supported: .*Mixtral"):
        SpeculativeMoE(model)
    assert_untouched(model, snap)


def test_predictor_for_another_geometry():
    model = build_tiny("qwen2_moe")
    snap = snapshot(model)
    other = RandomPredictor(geometry=MoEGeometry(num_layers=24, num_experts=60, top_k=4, hidden_size=64))
    with pytest.raises(ValueError, match="num_layers: .* has 24, model has 2.*num_experts"):
        SpeculativeMoE(model, other)
    assert_untouched(model, snap)


def test_not_a_predictor():
    model = build_tiny("qwen2_moe")
    snap = snapshot(model)
    with pytest.raises(TypeError, match="Predictor protocol"):
        SpeculativeMoE(model, predictor="pregate")
    assert_untouched(model, snap)


def test_wrapping_twice():
    model = build_tiny("olmoe")
    smoe = SpeculativeMoE(model, cache_capacity=0.5)
    with pytest.raises(ValueError, match="already wrapped"):
        SpeculativeMoE(model, PreGatePredictor(), cache_capacity=0.5)
    smoe.unwrap()


def test_predictor_geometry_is_remembered_after_binding():
    """A training-free predictor binds to the first model; a model of another shape is then refused."""
    pred = PreGatePredictor()
    SpeculativeMoE(build_tiny("qwen2_moe"), pred).unwrap()
    switch = build_tiny("switch_transformers")
    snap = snapshot(switch)
    with pytest.raises(ValueError, match="another routing geometry"):
        SpeculativeMoE(switch, pred)
    assert_untouched(switch, snap)


def test_capacity_forms():
    assert resolve_capacity(1.0, 2, 8, 100) == 16
    assert resolve_capacity(0.25, 2, 8, 100) == 4
    assert resolve_capacity(0.01, 2, 8, 100) == 1
    assert resolve_capacity(5, 2, 8, 100) == 5
    assert resolve_capacity(500, 2, 8, 100) == 16  # clamped to every expert
    assert resolve_capacity("1000B", 2, 8, 100) == 10
    assert resolve_capacity("1KiB", 2, 8, 100) == 10
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("1.5 GB") == 1_500_000_000 and parse_bytes("42") == 42

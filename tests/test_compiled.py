"""Compiled decode (`SpeculativeMoE(..., compile=...)`, runtime/compiled.py): the same greedy tokens as the eager
wrapped and the unwrapped model, the experts calls as the only graph breaks, and no recompilation after warm-up.

Graphs and breaks are checked with dynamo's "eager" backend (tracing without code generation: the same graph
breaks, guards and recompilations as inductor, seconds instead of minutes on 2 cores); one test runs inductor.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import build_tiny, make_inputs
from specmoe import SpeculativeMoE
from specmoe.predictors import PreGatePredictor
from specmoe.runtime.config import OffloadConfig

FAMILIES4 = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _greedy(m, inputs, n):
    return m.generate(**inputs, max_new_tokens=n, do_sample=False)


def _compiles() -> tuple[int, int]:
    return int(counters["stats"]["unique_graphs"]), int(counters["frames"]["total"])


@pytest.mark.parametrize("family", FAMILIES4)
def test_compiled_decode_same_tokens_no_recompiles(family):
    torch._dynamo.reset()
    counters.clear()
    inputs = make_inputs(build_tiny(family), length=6)
    warm = None
    for capacity in (0.25, 1.0):
        for predictor in (None, "pregate"):
            model = build_tiny(family)
            expected = _greedy(model, inputs, 8)
            eager = SpeculativeMoE(model, PreGatePredictor() if predictor else None, capacity)
            assert torch.equal(_greedy(eager, inputs, 8), expected)
            eager.unwrap()
            smoe = SpeculativeMoE(model, PreGatePredictor() if predictor else None, capacity, compile="eager")
            got = _greedy(smoe, inputs, 8)
            assert torch.equal(got, expected), (family, capacity, predictor)
            stats = smoe.compile_stats
            assert stats["compiled_steps"] == 7 and stats["eager_steps"] == 1  # prefill eager, decode compiled
            if warm is None:  # warm-up compiled: each MoE layer's experts call broke the graph, nothing else did
                assert stats["graphs"] > smoe.geometry.num_layers and stats["compile_s"] > 0
                reasons = counters["graph_break"]
                assert reasons and all("torch.compiler.disable" in r for r in reasons), list(reasons)
                warm = _compiles()
                # other new-token counts and another prompt length replay the same graphs
                for length, n in ((4, 3), (9, 13)):
                    _greedy(smoe, make_inputs(model, length=length, seed=length), n)
                assert smoe.compile_stats["compiled_steps"] == 7 + 2 + 12
            else:  # a new model and wrapper (other capacity, predictor) too
                assert stats["graphs"] == 0
            smoe.unwrap()
            assert "forward" not in model.__dict__  # the model's forward is its own again
    assert _compiles() == warm, "recompiled after warm-up"


def test_compiled_decode_bf16_same_tokens():
    model = build_tiny("qwen3_moe", dtype=torch.bfloat16)
    inputs = make_inputs(model, length=6)
    expected = _greedy(model, inputs, 8)
    smoe = SpeculativeMoE(model, PreGatePredictor(), 0.25, compile="eager")
    assert torch.equal(_greedy(smoe, inputs, 8), expected)
    assert smoe.compile_stats["compiled_steps"] == 7


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SPECMOE_INDUCTOR_TEST"), reason="inductor's C++ compile: ~90 s on 2 busy "
                    "cores; set SPECMOE_INDUCTOR_TEST=1 (benchmarks/compiled_decode.py checks inductor's tokens too)")
def test_compiled_decode_inductor_same_tokens():
    model = build_tiny("qwen3_moe")
    inputs = make_inputs(model, length=5)
    expected = _greedy(model, inputs, 6)
    smoe = SpeculativeMoE(model, PreGatePredictor(), 0.5, compile=True)
    assert torch.equal(_greedy(smoe, inputs, 6), expected)
    stats = smoe.compile_stats
    assert stats["backend"] == "inductor" and stats["compiled_steps"] == 5 and stats["compile_s"] > 0
    before = _compiles()
    _greedy(smoe, make_inputs(model, length=7, seed=3), 9)
    assert _compiles() == before


def test_compile_refusals_and_default():
    assert OffloadConfig().compile is False
    with pytest.raises(ValueError, match="compile must be"):
        OffloadConfig(compile="fast")
    model = build_tiny("switch_transformers")
    with pytest.raises(ValueError, match="encoder-decoder"):
        SpeculativeMoE(model, None, 0.5, compile=True)
    assert getattr(model, "_specmoe_wrapper", None) is None and "forward" not in model.__dict__
    smoe = SpeculativeMoE(build_tiny("mixtral"), None, 0.5)
    assert smoe.compile_stats is None  # eager stays the default


def test_simulator_compiled_compute_model_charges_segments_not_ops():
    from specmoe.sim.compute import COMPUTE_MODELS, load_op_counts, pass_costs
    from specmoe.sim.hardware import HardwareProfile
    from specmoe.sim.shapes import ModelShape

    shape, profile = ModelShape.from_name("qwen1.5-moe-a2.7b"), HardwareProfile.from_name("rtx3090")
    ops = load_op_counts(shape.model_type)
    eager, compiled = COMPUTE_MODELS["hf-eager"], COMPUTE_MODELS["compiled"]  # the preset from the calibration file
    e, c = (pass_costs(shape, profile, m, ops, 1, 512) for m in (eager, compiled))
    assert e.host_layer == pytest.approx(ops.layer * eager.op_s)
    assert c.host_layer == pytest.approx(compiled.segments_per_layer * compiled.segment_s) and c.host_layer < e.host_layer
    assert c.host_experts == e.host_experts and c.host_wrapper == e.host_wrapper  # the hot path stays eager
    assert c.dev_layer == e.dev_layer
    assert "assum" in compiled.source

"""Compiled decode (`SpeculativeMoE(..., compile=...)`, runtime/compiled.py): the same greedy tokens as the eager
wrapped and the unwrapped model, a decode step as ONE graph with the runtime's experts calls inside as the
`specmoe::experts` op (or, where that cannot work, as graph breaks), and no recompilation after warm-up.

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
            if warm is None:  # warm-up compiled one graph: the experts calls are ops inside it, nothing broke it
                assert stats["graphs"] == 1 and stats["compile_s"] > 0 and stats["experts_call"] == "custom op"
                assert not counters["graph_break"], dict(counters["graph_break"])
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


def _per_step(smoe, inputs, n: int = 5) -> tuple[float, float]:
    """(compiled regions entered, specmoe::experts calls) per decode step, from the profiler's events."""
    from torch.profiler import ProfilerActivity, profile

    def count(new):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            smoe.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        names = [e.name for e in prof.events()]
        return sum(x.startswith("Torch-Compiled Region") for x in names), names.count("specmoe::experts")

    full, one = count(n), count(1)
    return tuple((a - b) / (n - 1) for a, b in zip(full, one))


def test_a_decode_step_is_one_segment_with_an_experts_op_per_layer():
    """What compiled_decode.py measures, on a tiny model: one compiled region per step, the L experts calls in
    it; with the op unavailable (CUDA on a torch without graph partition) each experts call breaks the graph."""
    import specmoe.runtime.wrapper as wrapper

    model = build_tiny("qwen2_moe")
    inputs = make_inputs(model, length=5)
    expected = _greedy(model, inputs, 6)
    smoe = SpeculativeMoE(model, None, 0.5, compile="eager")
    assert torch.equal(_greedy(smoe, inputs, 6), expected)
    assert _per_step(smoe, inputs) == (1.0, smoe.geometry.num_layers)
    smoe.unwrap()
    torch._dynamo.reset()
    counters.clear()
    original = wrapper.experts_wrap
    wrapper.experts_wrap = lambda device: torch.compiler.disable  # the fallback: a break per experts call
    try:
        smoe = SpeculativeMoE(model, None, 0.5, compile="eager")
    finally:
        wrapper.experts_wrap = original
    assert torch.equal(_greedy(smoe, inputs, 6), expected)
    assert smoe.compile_stats["experts_call"] == "graph break"
    segments, ops = _per_step(smoe, inputs)
    assert segments > smoe.geometry.num_layers and ops == 0
    assert counters["graph_break"] and all("torch.compiler.disable" in r for r in counters["graph_break"])
    smoe.unwrap()


def test_experts_op_contract_and_the_cuda_fallback(monkeypatch, caplog):
    """The op: schema, fake impl and aot dispatch agree (torch.library.opcheck); outside a compiled step it says
    so in one line. On CUDA without inductor's graph partition the experts call is a graph break, logged."""
    from specmoe.runtime import compiled

    hidden, ids, weights = torch.randn(3, 8), torch.randint(0, 4, (3, 2)), torch.rand(3, 2)
    with pytest.raises(RuntimeError, match="only inside a compiled decode step"):
        torch.ops.specmoe.experts(hidden, ids, weights, 0)
    monkeypatch.setattr(compiled._ACTIVE, "calls", {0: lambda h, i, w: h * w.sum(-1, keepdim=True)}, raising=False)
    torch.library.opcheck(torch.ops.specmoe.experts.default, (hidden, ids, weights, 0),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert torch.equal(torch.ops.specmoe.experts(hidden, ids, weights, 0), hidden * weights.sum(-1, keepdim=True))
    assert compiled.experts_wrap(torch.device("cpu")) is compiled._op_wrap
    assert compiled.experts_wrap(torch.device("cuda")) is (compiled._op_wrap if compiled.partition_supported()
                                                           else torch.compiler.disable)
    monkeypatch.setattr(compiled, "partition_supported", lambda: False)
    with caplog.at_level("INFO", logger=compiled.__name__):
        assert compiled.experts_wrap(torch.device("cuda")) is torch.compiler.disable
    assert "no inductor graph partition" in caplog.text


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


def test_simulator_compiled_compute_model_charges_regions_ops_and_replays_not_dense_ops():
    from specmoe.io import read_json
    from specmoe.sim.compute import COMPILED_FILE, COMPUTE_MODELS, load_op_counts, pass_costs
    from specmoe.sim.hardware import HardwareProfile
    from specmoe.sim.shapes import ModelShape

    shape, profile = ModelShape.from_name("qwen1.5-moe-a2.7b"), HardwareProfile.from_name("rtx3090")
    ops = load_op_counts(shape.model_type)
    eager, compiled = COMPUTE_MODELS["hf-eager"], COMPUTE_MODELS["compiled"]  # the preset from the calibration file
    e, c = (pass_costs(shape, profile, m, ops, 1, 512) for m in (eager, compiled))
    cal = read_json(COMPILED_FILE)
    assert cal["segments_per_pass"] == 1 and cal["experts_op_calls_per_layer"] == 1  # one graph, an op per layer
    assert e.host_layer == pytest.approx(ops.layer * eager.op_s)
    segment_s, op_s = (cal[k] * eager.op_s for k in ("segment_in_eager_ops", "experts_op_in_eager_ops"))
    assert c.host_layer == pytest.approx(cal["segments_per_layer"] * segment_s + op_s +
                                         cal["replays_per_layer"] * cal["replay_s"]) and c.host_layer < e.host_layer
    assert c.host_pass == pytest.approx(segment_s + cal["replays_per_pass"] * cal["replay_s"] + compiled.sync_s)
    assert c.host_experts == e.host_experts and c.host_wrapper == e.host_wrapper  # the hot path stays eager
    assert c.dev_layer == e.dev_layer
    assert "measured on" in compiled.source and "assumed" in compiled.source

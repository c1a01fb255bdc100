"""Trained predictors: they learn a routing process with structure, beat random, survive save/load, refuse other
geometries, and run inside SpeculativeMoE without changing tokens (prefetching for the next token too)."""

import pytest
import torch
from conftest import build_tiny, make_inputs
from routing_synth import synthetic_trace

from specmoe import MoEGeometry, SpeculativeMoE
from specmoe.predictors import (
    HiddenStatePredictor, HistoryPredictor, InterLayerPredictor, PreGatePredictor, RandomPredictor, load_predictor,
)
from specmoe.runtime.adapters import find_moe_layers
from specmoe.traces import collect_traces, load_traces
from specmoe.training.evaluate import EvalConfig, evaluate_predictors
from specmoe.training.loop import TrainConfig, train_predictor

QUICK = TrainConfig(steps=150, batch_size=128, lr=3e-3, eval_every=50, val_tokens=256, warmup_steps=10,
                    device="cpu")


@pytest.fixture(scope="module")
def splits():
    return synthetic_trace().split(seed=0)


@pytest.fixture(scope="module")
def trained(splits):
    geo = splits["train"].geometry
    torch.manual_seed(0)
    inter = InterLayerPredictor(geo, dim=32, layers=1, heads=2, ff=64, dropout=0.0)
    hidden = HiddenStatePredictor(geo, dim=32, router_init=False)
    results = {name: train_predictor(p, splits["train"], splits["val"], QUICK, progress=False)
               for name, p in (("interlayer", inter), ("hidden", hidden))}
    return {"history": HistoryPredictor.fit(splits["train"], progress=False), "interlayer": inter,
            "hidden": hidden}, results


def evaluate(predictors, trace, lookahead=2):
    for p in predictors.values():
        p.bind(trace.geometry, [None] * trace.geometry.num_layers)
    return evaluate_predictors(predictors, trace, EvalConfig(lookahead=lookahead, latency_calls=0), progress=False)


def test_each_predictor_learns_the_structure(splits, trained):
    predictors, results = trained
    res = evaluate({**predictors, "random": RandomPredictor(lookahead=2)}, splits["test"])
    recall = {name: r["lookahead"][1]["within"]["recall@k"] for name, r in res.items()}
    cross = {name: r["lookahead"][1]["cross"]["recall@k"] for name, r in res.items()}
    assert recall["random"] < 0.25 and cross["random"] < 0.25  # k/E = 1/8
    assert recall["history"] > 0.8 and cross["history"] > 0.75  # the process is a permutation with 10% noise
    assert recall["interlayer"] > 0.6 and cross["interlayer"] > 0.5
    assert recall["hidden"] > 0.4 and cross["hidden"] > 0.4  # the hidden state is a noisy code of the next set
    for name in ("interlayer", "hidden"):  # the loop kept its best validation weights, better than untrained
        assert results[name].best_val_recall > results[name].initial_val_recall + 0.2
        assert results[name].stopped in ("steps", "early_stopping")


@pytest.mark.parametrize("name", ["interlayer", "hidden"])
def test_runtime_path_equals_training_path(splits, trained, name):
    pred = trained[0][name]
    trace = splits["test"]
    tokens = torch.arange(7)
    for layer in range(trace.geometry.num_layers):
        with torch.no_grad():
            train_path = pred.train_logits(trace, torch.full((7,), layer), tokens)  # [7, D, E]
        runtime = pred.predict(layer, trace.hidden[layer][:7], trace.ids[:7, : layer + 1])
        for t, scores in runtime.items():
            torch.testing.assert_close(scores, train_path[:, t - layer - 1], atol=1e-4, rtol=1e-4)


def test_hidden_predictor_starts_as_the_pregate(splits):
    trace = splits["val"]
    geo = trace.geometry
    g = torch.Generator().manual_seed(0)
    routers = [type("R", (), {"weight": torch.randn(geo.num_experts, geo.hidden_size, generator=g),
                              "bias": torch.randn(geo.num_experts, generator=g)})() for _ in range(geo.num_layers)]
    for r in routers:
        r.logits = lambda h, r=r: h.float() @ r.weight.T + r.bias
    pred = HiddenStatePredictor(geo, lookahead=2, dim=16)  # bind fills its pre-gate from the routers
    pregate = PreGatePredictor(lookahead=2, wrap=True)
    for p in (pred, pregate):
        p.bind(geo, routers)
    h = trace.hidden[3][:10].float()
    ours, theirs = pred.predict(3, h, trace.ids[:10, :4]), pregate.predict(3, h, trace.ids[:10, :4])
    assert ours.keys() == theirs.keys() == {4, 5}  # 4 and 5 are layers 0 and 1 of the next token
    for t in ours:
        torch.testing.assert_close(ours[t], theirs[t], atol=1e-4, rtol=1e-4)
    assert bool(pred.module.gate_ready)
    with pytest.raises(ValueError, match="router_init=False"):
        HiddenStatePredictor(geo, router_init=False).init_from_routers(routers)


@pytest.mark.parametrize("name", ["history", "interlayer", "hidden"])
def test_save_load_round_trip(tmp_path, splits, trained, name):
    pred = trained[0][name]
    pred.save(tmp_path / name)
    geo = splits["train"].geometry
    back = load_predictor(tmp_path / name, geometry=geo)
    assert type(back) is type(pred) and back.config() == pred.config()
    trace = splits["test"]
    for layer in (0, 3):
        a = pred.predict(layer, trace.hidden[layer][:6], trace.ids[:6, : layer + 1])
        b = back.predict(layer, trace.hidden[layer][:6], trace.ids[:6, : layer + 1])
        assert a.keys() == b.keys() and all(torch.equal(a[t], b[t]) for t in a)
    with pytest.raises(ValueError, match="num_experts: .*has 16, model has 60"):
        load_predictor(tmp_path / name, geometry=MoEGeometry(4, 60, 2, 32))
    with pytest.raises(ValueError, match="another routing geometry"):
        back.bind(MoEGeometry(5, 16, 2, 32))


def test_constructor_errors():
    geo = MoEGeometry(4, 16, 2, 32)
    with pytest.raises(ValueError, match="needs the model's geometry"):
        InterLayerPredictor(None)
    with pytest.raises(ValueError, match="lookahead 5 exceeds"):
        HiddenStatePredictor(geo, lookahead=5)
    with pytest.raises(ValueError, match="divisible by heads"):
        InterLayerPredictor(geo, dim=30, heads=4)
    with pytest.raises(ValueError, match="context must be >= 1"):
        HistoryPredictor(geo, context=0)


def make_predictor(name, model, tmp_path):
    """Untrained trainable predictors, or a history predictor counted on the model's own routing."""
    moe = find_moe_layers(model)
    torch.manual_seed(0)
    if name == "interlayer":
        return InterLayerPredictor(moe.geometry, lookahead=2, dim=16, layers=1, heads=2, ff=32)
    if name == "hidden":
        return HiddenStatePredictor(moe.geometry, lookahead=2, dim=16)  # SpeculativeMoE's bind gives the routers
    windows = torch.randint(2, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    collect_traces(model, windows, tmp_path, model_name="tiny", progress=False)
    return HistoryPredictor.fit(load_traces(tmp_path, progress=False), progress=False)


@pytest.mark.parametrize("name", ["interlayer", "hidden", "history"])
def test_inside_speculative_moe_same_tokens_and_cross_token_prefetch(tmp_path, name):
    model = build_tiny("qwen2_moe")
    predictor = make_predictor(name, model, tmp_path)
    inputs = make_inputs(model, batch=2, length=7, left_pad=True)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    smoe = SpeculativeMoE(model, predictor, cache_capacity=0.5)
    with torch.no_grad():
        out = smoe.generate(**inputs, max_new_tokens=5, do_sample=False)
    stats = smoe.stats
    smoe.unwrap()
    assert torch.equal(out, ref)
    assert name != "hidden" or bool(predictor.module.gate_ready)
    assert stats.total.prefetch_issued > 0
    # L=2 and lookahead 2: layer 0 is only ever a target as the next token's first layer
    assert stats.per_layer[0].prefetch_issued > 0

"""The affinity predictor: decode-time scores equal its training features, it keeps the previous tokens' routing
across passes (and forgets it when it should), it learns token-to-token repetition that no per-token predictor
can see, survives save/load, refuses other geometries, and runs inside SpeculativeMoE without changing tokens."""

import json

import pytest
import torch
from conftest import build_tiny, make_inputs
from routing_synth import synthetic_trace

from specmoe import MoEGeometry, SpeculativeMoE
from specmoe.cli import main
from specmoe.predictors import AffinityPredictor, load_predictor
from specmoe.runtime.adapters import find_moe_layers
from specmoe.sim.predictions import predictor_candidates
from specmoe.sim.stream import RoutingStream
from specmoe.traces import RoutingTrace, load_traces
from specmoe.training.evaluate import EvalConfig, decode_replay, evaluate_predictors
from specmoe.training.loop import TrainConfig, train_predictor

QUICK = TrainConfig(steps=120, batch_size=128, lr=5e-2, eval_every=40, val_tokens=256, warmup_steps=10,
                    device="cpu")


def repeating_trace(L=4, E=16, k=2, sequences=40, length=24, stay=0.9, seed=0) -> RoutingTrace:
    """Each layer's experts are the previous token's at that layer with probability `stay`, else fresh: only the
    previous token tells what comes (layers are independent of each other)."""
    g = torch.Generator().manual_seed(seed)
    N = sequences * length
    ids = torch.zeros(N, L, k, dtype=torch.long)
    for i in range(N):
        for layer in range(L):
            fresh = i % length == 0 or torch.rand(1, generator=g).item() > stay
            ids[i, layer] = torch.randperm(E, generator=g)[:k] if fresh else ids[i - 1, layer]
    weights = torch.full((N, L, k), 1.0 / k)
    return RoutingTrace(MoEGeometry(L, E, k, 8), ids, weights, torch.arange(0, N + 1, length))


def random_predictor(geo, hidden=0, **kw):
    torch.manual_seed(0)
    pred = AffinityPredictor(geo, hidden=hidden, **kw)
    torch.nn.init.normal_(pred.module.weight.weight)
    if hidden:
        torch.nn.init.normal_(pred.module.down)
    return pred


@pytest.mark.parametrize("hidden", [0, 8])
def test_decode_scores_equal_the_training_features(hidden):
    trace = synthetic_trace(sequences=6, length=10)
    pred = random_predictor(trace.geometry, hidden=hidden, lookahead=2, context=2, tokens=2)
    a, b = int(trace.offsets[2]), int(trace.offsets[3])
    _, decoded = decode_replay(pred, trace, a, b)  # one pass per token, as the runtime decodes
    for layer in range(trace.geometry.num_layers):
        with torch.no_grad():
            train = pred.train_logits(trace, torch.full((b - a,), layer), torch.arange(a, b))  # [T, D, E]
        assert set(decoded[layer]) == {layer + 1, layer + 2}  # targets past the last layer: the next token
        for t, scores in decoded[layer].items():
            torch.testing.assert_close(scores, train[:, t - layer - 1])


def test_state_across_passes():
    trace = synthetic_trace(sequences=2, length=8)
    geo = trace.geometry
    L = geo.num_layers
    pred = random_predictor(geo, lookahead=1, context=2, tokens=2)
    with torch.no_grad():
        train = [pred.train_logits(trace, torch.full((8,), layer), torch.arange(8))[:, 0] for layer in range(L)]
    pred.reset()
    pred.start_pass(0)  # a prefill of tokens 0..4: the earlier rows' later layers are not routed yet
    out = [pred.predict(layer, torch.zeros(5, 8), trace.ids[:5, : layer + 1])[layer + 1] for layer in range(L)]
    for layer in range(L):
        torch.testing.assert_close(out[layer][0], train[layer][0])  # the first token has no earlier token
    torch.testing.assert_close(out[L - 1], train[L - 1][:5])  # the next token's layer 0: all known by then
    assert not torch.allclose(out[0][1:], train[0][1:5])  # at layer 0, token i-1's layer 1 was not routed yet
    pred.start_pass(1)  # decode token 5: the prefill's tokens are complete now
    for layer in range(L):
        if layer == 1:  # admission skips this call: the runtime still shows the routing
            pred.observe(layer, trace.ids[5:6, : layer + 1])
            continue
        torch.testing.assert_close(pred.predict(layer, torch.zeros(1, 8), trace.ids[5:6, : layer + 1])[layer + 1],
                                   train[layer][5:6])
    pred.start_pass(2)  # token 6, whose token slots read token 5's routing, layer 1 included
    torch.testing.assert_close(pred.predict(0, torch.zeros(1, 8), trace.ids[6:7, :1])[1], train[0][6:7])
    pred.start_pass(4)  # pass 3 ran without the predictor: nothing is known of the token before
    fresh = random_predictor(geo, lookahead=1, context=2, tokens=2)
    fresh.start_pass(0)
    torch.testing.assert_close(pred.predict(0, torch.zeros(1, 8), trace.ids[7:8, :1])[1],
                               fresh.predict(0, torch.zeros(1, 8), trace.ids[7:8, :1])[1])


def test_learns_what_the_previous_token_routed():
    splits = repeating_trace().split(seed=0)
    geo = splits["train"].geometry
    preds = {}
    for name, tokens in (("with tokens", 1), ("without", 0)):
        torch.manual_seed(0)
        preds[name] = AffinityPredictor(geo, lookahead=1, context=1, tokens=tokens)
        train_predictor(preds[name], splits["train"], splits["val"], QUICK, progress=False)
    res = evaluate_predictors(preds, splits["test"], EvalConfig(lookahead=1, latency_calls=0), progress=False)
    recall = {n: r["lookahead"][1]["within"]["recall@k"] for n, r in res.items()}
    assert recall["with tokens"] > 0.75  # 0.9 stay: the previous token's set, bar fresh draws
    assert recall["without"] < 0.35  # layers are independent: about k/E plus the frequency prior
    test = splits["test"]
    probs = torch.sigmoid(decode_replay(preds["with tokens"], test, 0, test.num_tokens)[1][1][2])  # [N, E] layer 2
    routed = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, test.ids[:, 2], True)
    top = probs.max(1)  # probabilities, roughly calibrated: the best guess's, and on average k/E
    assert abs(top.values.mean() - routed.gather(1, top.indices[:, None]).float().mean()) < 0.25
    assert abs(probs.mean() - geo.top_k / geo.num_experts) < 0.05


def test_simulator_replays_it_pass_by_pass():
    trace = synthetic_trace(sequences=3, length=6)
    geo = trace.geometry
    pred = random_predictor(geo, lookahead=1, context=2, tokens=1)
    stream = RoutingStream.from_trace(trace)
    cands = predictor_candidates(stream, pred, geo, progress=False)
    _, decoded = decode_replay(pred, trace, 6, 12)  # the second sequence, decoded
    from specmoe.predictors.base import rank_by_votes, top_candidates

    for i in range(6):
        for layer in range(geo.num_layers):
            scores = decoded[layer][layer + 1][i : i + 1]
            want = rank_by_votes(top_candidates(scores, geo.top_k).flatten().tolist(), geo.top_k)
            assert cands[6 + i][layer] == [((layer + 1) % geo.num_layers, e) for e in want]


def test_save_load_and_geometry(tmp_path):
    geo = MoEGeometry(4, 16, 2, 32)
    pred = random_predictor(geo, hidden=4, lookahead=2, context=3, tokens=1)
    pred.save(tmp_path / "aff")
    meta = json.loads((tmp_path / "aff" / "config.json").read_text())
    assert meta["specmoe_predictor"] == "affinity" and meta["geometry"]["num_experts"] == 16
    assert not list(tmp_path.glob("*.pkl")) and (tmp_path / "aff" / "model.safetensors").is_file()
    back = load_predictor(tmp_path / "aff", geometry=geo)
    assert type(back) is AffinityPredictor and back.config() == pred.config()
    history = torch.randint(0, 16, (3, 4, 2))
    for layer in range(4):
        a, b = pred.predict(layer, torch.zeros(3, 32), history[:, : layer + 1]), \
            back.predict(layer, torch.zeros(3, 32), history[:, : layer + 1])
        assert a.keys() == b.keys() and all(torch.equal(a[t], b[t]) for t in a)
    with pytest.raises(ValueError, match="num_experts: .*has 16, model has 60"):
        load_predictor(tmp_path / "aff", geometry=MoEGeometry(4, 60, 2, 32))
    with pytest.raises(ValueError, match="another routing geometry"):
        back.bind(MoEGeometry(5, 16, 2, 32))
    with pytest.raises(ValueError, match="1 <= context <= 4"):
        AffinityPredictor(geo, context=5)
    with pytest.raises(ValueError, match="lookahead 5 exceeds"):
        AffinityPredictor(geo, lookahead=5)


def test_train_cli(tmp_path):
    from test_training_eval import write_trace

    trace = synthetic_trace(sequences=20, length=12)
    geo = trace.geometry
    routers = [type("R", (), {"weight": torch.zeros(geo.num_experts, geo.hidden_size), "bias": None})()
               for _ in range(geo.num_layers)]
    write_trace(tmp_path / "traces", trace, routers)
    assert main(["train", str(tmp_path / "traces"), "--predictor", "affinity", "--out", str(tmp_path / "aff"),
                 "--steps", "20", "--eval-every", "10", "--batch-size", "64", "--val-tokens", "64", "--device", "cpu",
                 "--context", "2", "--tokens", "1", "--hidden", "4"]) == 0
    back = load_predictor(tmp_path / "aff")
    assert back.kind == "affinity" and (back.context, back.tokens, back.hidden) == (2, 1, 4)
    log = json.loads((tmp_path / "aff" / "training.json").read_text())
    assert log["options"] == {"context": 2, "tokens": 1, "hidden": 4}


@pytest.mark.parametrize("new", [0, 1])  # new=1: only experts not routed at the target layer the token before
def test_inside_speculative_moe_same_tokens(new):
    model = build_tiny("qwen2_moe")
    geo = find_moe_layers(model).geometry
    predictor = random_predictor(geo, lookahead=2, context=2, tokens=2, new=new)
    inputs = make_inputs(model, batch=1, length=7)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    smoe = SpeculativeMoE(model, predictor, cache_capacity=0.5)
    with torch.no_grad():
        out = smoe.generate(**inputs, max_new_tokens=6, do_sample=False)
    stats = smoe.stats
    smoe.unwrap()
    assert torch.equal(out, ref)
    assert stats.total.prefetch_issued > 0
    assert predictor._past is not None and (predictor._past >= 0).all()  # decode steps saw complete tokens before


def test_real_routing_benchmark_with_a_held_out_trace(tmp_path):
    """benchmarks/real_routing.py: train on one imported trace, simulate another (fetch and auto), affinity among
    the predictors, and the candidates' precision at each rank in the JSON and the table."""
    import importlib.util
    from pathlib import Path

    from test_import_routing import make_routing, write_jsonl

    from specmoe.traces.importers import import_routing

    path = Path(__file__).parent.parent / "benchmarks" / "real_routing.py"
    spec = importlib.util.spec_from_file_location("real_routing", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    names = ("problem_id", "token_idx", "layer", "experts", "gating_probs")
    for part, seed in (("train", 0), ("test", 1)):
        routing = make_routing(sequences=3, tokens=4, layers=32, experts=8, k=2, seed=seed)
        src = write_jsonl(tmp_path / f"{part}.jsonl", routing, shuffle=False, names=names)
        import_routing("speculative-moe", [src], tmp_path / part, progress=False)
    assert script.main([str(tmp_path / "train"), "--held-out", str(tmp_path / "test"), "--policies", "lru",
                        "--capacities", "0.25", "--predictors", "none", "oracle", "affinity", "--misses", "fetch",
                        "auto", "--warmup", "1", "--train-steps", "5", "--out", str(tmp_path), "--name", "rr"]) == 0
    (t,) = json.loads((tmp_path / "rr.json").read_text())["traces"]
    assert t["split_sequences"] == {"train": 2, "val": 1, "test": 3}
    assert t["simulated_passes"] == t["split_tokens"]["test"] == load_traces(tmp_path / "test").num_tokens
    assert {(r["predictor"], r["misses_mode"]) for r in t["sweep"]["runs"]} >= {("affinity", "fetch"),
                                                                                 ("affinity", "auto")}
    assert t["ranks"]["oracle"]["precision_at_rank"][0] == 1.0 and t["ranks"]["oracle"]["recall_next_layer"] > 0.9
    assert "| affinity |" in (tmp_path / "rr.md").read_text()

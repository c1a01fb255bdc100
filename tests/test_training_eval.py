"""Metrics on a hand-computed example, the evaluation replay, and `specmoe train` / `specmoe eval` end to end."""

import json

import pytest
import torch
from routing_synth import synthetic_trace

from specmoe.cli import main
from specmoe.predictors import OraclePredictor, load_predictor
from specmoe.training.evaluate import EvalConfig, evaluate_predictors
from specmoe.training.loop import TrainConfig
from specmoe.training.metrics import PredictionMetrics
from specmoe.traces import TraceManifest, TraceWriter
from specmoe.traces.shards import ROUTERS_NAME, write_routers


def test_metrics_by_hand():
    scores = torch.tensor([
        [0.9, 0.1, 0.8, 0.3, 0.7, 0.2],  # ranking 0 2 4 3 5 1; routed {2, 3}, primary 2
        [0.0, 0.0, 0.0, 0.0, 1.0, 2.0],  # ranking 5 4 ...;     routed {5, 4}, primary 5
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # nothing routed: skipped
        [0.1, 0.5, 0.2, 0.3, 0.4, 0.0],  # ranking 1 4 3 2 0 5; routed {1} only
    ])
    routed = torch.tensor([[2, 3], [5, 4], [-1, -1], [1, -1]])
    m = PredictionMetrics(top_k=2, num_experts=6)
    m.add(scores, routed)
    r = m.result()
    assert r["count"] == 3
    expected = {
        "recall@k": (0.5 + 1 + 1) / 3, "precision@k": (0.5 + 1 + 0.5) / 3,
        "recall@2k": 1.0, "precision@2k": (0.5 + 0.5 + 0.25) / 3,
        "recall@4k": 1.0, "precision@4k": (2 / 6 + 2 / 6 + 1 / 6) / 3,  # 4k = 8 > E: all 6 experts
        "top1": 2 / 3, "top3": 1.0, "top5": 1.0, "top10": 1.0, "exact": 2 / 3,
    }
    for name, value in expected.items():
        assert r[name] == pytest.approx(value), name
    half = PredictionMetrics(top_k=2, num_experts=6)
    half.add(scores[:2], routed[:2])
    rest = PredictionMetrics(top_k=2, num_experts=6)
    rest.add(scores[2:], routed[2:])
    assert half.merge(rest).result() == pytest.approx(r)


def test_replay_of_an_oracle_is_perfect_within_the_token():
    trace = synthetic_trace(sequences=6, length=8).split(seed=0)["train"]
    L = trace.geometry.num_layers
    shifted = torch.cat([trace.ids[1:], trace.ids[-1:]])  # the "next pass" holds every token's successor
    oracle = OraclePredictor([trace.ids, shifted], lookahead=2)  # one replayed pass: every sequence at once
    oracle.bind(trace.geometry, [None] * L)
    res = evaluate_predictors({"oracle": oracle}, trace, EvalConfig(pass_tokens=10**6, latency_calls=0),
                              progress=False)["oracle"]
    for d in (1, 2):
        within = res["lookahead"][d]["within"]
        assert within["recall@k"] == 1.0 and within["exact"] == 1.0
        assert within["count"] == trace.num_tokens * (L - d)
        cross = res["lookahead"][d]["cross"]  # only tokens with a successor in their sequence count
        assert cross["count"] == (trace.num_tokens - trace.num_sequences) * d and cross["recall@k"] == 1.0
        assert len(res["lookahead"][d]["per_layer"]) == L


def write_trace(directory, trace, routers):
    manifest = TraceManifest(model="synthetic", geometry=trace.geometry, dtype="float32", source={},
                             hidden_layers=tuple(range(trace.geometry.num_layers)), routers=ROUTERS_NAME)
    with TraceWriter(directory, manifest, shard_tokens=500) as w:
        for s, e in zip(trace.offsets[:-1].tolist(), trace.offsets[1:].tolist()):
            w.add(trace.ids[s:e], trace.weights[s:e], {layer: h[s:e] for layer, h in trace.hidden.items()})
    write_routers(directory / ROUTERS_NAME, routers)


def test_train_and_eval_cli(tmp_path):
    trace = synthetic_trace(sequences=30, length=16)
    geo = trace.geometry
    g = torch.Generator().manual_seed(0)
    routers = [type("R", (), {"weight": torch.randn(geo.num_experts, geo.hidden_size, generator=g), "bias": None})()
               for _ in range(geo.num_layers)]
    write_trace(tmp_path / "traces", trace, routers)
    quick = ["--steps", "30", "--eval-every", "15", "--batch-size", "64", "--val-tokens", "64", "--device", "cpu"]
    for kind, extra in (("interlayer", ["--dim", "16", "--heads", "2", "--ff", "32", "--layers", "1"]),
                        ("hidden", ["--dim", "16"]), ("history", [])):
        assert main(["train", str(tmp_path / "traces"), "--predictor", kind, "--out", str(tmp_path / kind),
                     *(quick if kind != "history" else []), *extra]) == 0
        assert load_predictor(tmp_path / kind, geometry=geo).kind == kind
    log = json.loads((tmp_path / "hidden" / "training.json").read_text())
    assert log["options"] == {"dim": 16, "router_init": True} and log["result"]["history"][0]["step"] == 0
    assert log["train_config"] == {**vars(TrainConfig(steps=30, eval_every=15, batch_size=64, val_tokens=64,
                                                      device="cpu"))}
    args = ["eval", str(tmp_path / "traces"), "--out", str(tmp_path / "eval"), "--latency-calls", "8"]
    for kind in ("interlayer", "hidden", "history"):
        args += ["--predictor", str(tmp_path / kind)]
    assert main(args) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    names = set(report["predictors"])
    assert {"pregate", "random", "interlayer", "hidden"} <= names and len(names) == 6  # two history predictors
    hist = report["predictors"]["history"]["lookahead"]["1"]["within"]
    assert hist["recall@k"] > report["predictors"]["random"]["lookahead"]["1"]["within"]["recall@k"] + 0.3
    assert report["predictors"]["interlayer"]["latency_us"]["decode"] > 0
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| pregate | 1 |" in md and "Across the token boundary" in md
    assert (tmp_path / "eval" / "eval.png").read_bytes()[:4] == b"\x89PNG"

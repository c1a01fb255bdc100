"""specmoe import-routing: interchange JSONL, MoE-Beyond CSVs and the speculative-moe logger JSONL into trace
directories; clear errors for bad input; simulate / train / eval on the routing-only traces it writes.

Every input here is a small file the test writes itself (the real traces carry no license)."""

import csv
import json
import logging

import re

import pytest
import torch

from specmoe.cli import main
from specmoe.predictors import load_predictor
from specmoe.traces import load_traces
from specmoe.traces.importers import RoutingImportError, import_routing


def make_routing(sequences=4, tokens=6, layers=3, experts=8, k=2, seed=0):
    """[S] tensors ids [n, L, k] (distinct experts per row) and weights [n, L, k] (descending), n varying."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(sequences):
        n = tokens + s
        ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n * layers)]).view(n, layers, k)
        w = torch.rand(n, layers, k, generator=g).sort(dim=-1, descending=True).values
        out.append((ids, w))
    return out


def write_jsonl(path, routing, header=None, shuffle=True, weights=True, names=("seq", "token", "layer", "experts",
                                                                               "weights")):
    seq_key, tok_key, layer_key, ids_key, w_key = names
    records = []
    for s, (ids, w) in enumerate(routing):
        for t in range(ids.shape[0]):
            for layer in range(ids.shape[1]):
                order = torch.randperm(ids.shape[2]) if shuffle else torch.arange(ids.shape[2])  # any order in
                rec = {seq_key: f"p{s}", tok_key: t, layer_key: layer, ids_key: ids[t, layer, order].tolist()}
                if weights:
                    rec[w_key] = w[t, layer, order].tolist()
                records.append(rec)
    if shuffle:
        records = [records[i] for i in torch.randperm(len(records), generator=torch.Generator().manual_seed(1))]
    lines = ([json.dumps(header)] if header else []) + [json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(path, ids, header=("Layer ID", "Batch Number", "Token", "Activated Expert IDs")):
    """MoE-Beyond layout: a block of rows per layer (1-based), each the layer's tokens in order."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for layer in range(ids.shape[1]):
            for t in range(ids.shape[0]):
                w.writerow([layer + 1, 0, f"tok,{t}", str(ids[t, layer].tolist())])
    return path


def test_jsonl_round_trip(tmp_path):
    routing = make_routing()
    src = write_jsonl(tmp_path / "r.jsonl", routing, header={"specmoe_routing": 1, "model": "org/tiny-moe",
                                                             "num_experts": 8, "hidden_size": 16})
    manifest = import_routing("jsonl", [src], tmp_path / "trace", progress=False)
    trace = load_traces(tmp_path / "trace", progress=False)
    assert trace.num_sequences == 4 and trace.hidden == {} and trace.routers is None
    assert (trace.geometry.num_layers, trace.geometry.num_experts, trace.geometry.top_k,
            trace.geometry.hidden_size) == (3, 8, 2, 16)
    order = [int(name[1:]) for name in manifest.source["sequence_ids"]]  # as they first appear in the file
    assert sorted(order) == [0, 1, 2, 3]
    assert torch.equal(trace.ids, torch.cat([routing[s][0] for s in order]))  # shuffled in, primary first out
    assert torch.allclose(trace.weights, torch.cat([routing[s][1] for s in order]), atol=1e-3)
    assert manifest.model == "org/tiny-moe" and manifest.hidden_layers == ()
    assert manifest.source["hidden_states"] is False
    assert manifest.source["weights"] == "recorded"
    first = import_routing("jsonl", [src], tmp_path / "two", max_sequences=2, progress=False)
    assert first.num_sequences == 2 and first.model == "org/tiny-moe" and first.geometry == trace.geometry


def test_moe_beyond_csv_round_trip(tmp_path):
    routing = make_routing(sequences=2, experts=64, k=6, layers=4)
    write_csv(tmp_path / "prompt_10_data.csv", routing[1][0])
    write_csv(tmp_path / "prompt_2_data.csv", routing[0][0])  # natural order: prompt_2 first
    (tmp_path / "prompt_5_data.csv").write_text("")  # an empty file (the real set has one) is skipped
    assert main(["import-routing", "moe-beyond", str(tmp_path), "--out", str(tmp_path / "trace")]) == 0
    trace = load_traces(tmp_path / "trace", progress=False)
    assert torch.equal(trace.ids, torch.cat([routing[0][0], routing[1][0]]))  # ids kept in the file's order
    assert torch.allclose(trace.weights, torch.full_like(trace.weights, 1 / 6), atol=1e-3)
    m = trace.manifest
    assert m.model == "deepseek-ai/DeepSeek-V2-Lite-Chat" and trace.geometry.num_experts == 64
    assert m.source["ids_ranked"] is False and m.source["sequence_ids"] == ["prompt_2_data", "prompt_10_data"]
    assert m.source["empty_files_skipped"] == [str(tmp_path / "prompt_5_data.csv")]


def test_speculative_moe_ragged_layers_are_cut(tmp_path, caplog):
    routing = make_routing(sequences=2)
    names = ("problem_id", "token_idx", "layer", "experts", "gating_probs")
    src = write_jsonl(tmp_path / "humaneval.jsonl", routing, shuffle=False, names=names)
    lines = src.read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if json.loads(line)["problem_id"] == "p1")
    src.write_text("\n".join(lines[:last] + lines[last + 1:]) + "\n")  # p1: the last layer lacks its last token
    with caplog.at_level(logging.WARNING):
        m = import_routing("speculative-moe", [src], tmp_path / "trace", num_experts=8, progress=False)
    assert "dropped 2 records" in caplog.text and m.source["records_dropped"] == 2
    trace = load_traces(tmp_path / "trace", progress=False)
    assert trace.num_tokens == routing[0][0].shape[0] + routing[1][0].shape[0] - 1
    assert torch.equal(trace.ids[: routing[0][0].shape[0]], routing[0][0])
    with pytest.raises(RoutingImportError, match="layers have 6..7 tokens"):
        import_routing("speculative-moe", [src], tmp_path / "t2", ragged="error", progress=False)


def test_experts_inferred_with_a_warning(tmp_path, caplog):
    src = write_jsonl(tmp_path / "r.jsonl", make_routing(sequences=1, experts=8), weights=False)
    with caplog.at_level(logging.WARNING):
        m = import_routing("jsonl", [src], tmp_path / "trace", progress=False)
    assert "largest id + 1" in caplog.text and m.geometry.num_experts <= 8 and m.source["weights"].startswith("none")


def _rec(**kw):
    return json.dumps({"seq": 0, "token": 0, "layer": 0, "experts": [1, 2], **kw})


@pytest.mark.parametrize("lines, message", [
    ([_rec(), _rec(token=1, experts=[1, 2, 3])], "3 experts, but .*:1 has 2"),
    ([_rec(), _rec(token=2)], "layer 0 has no record for token 1"),
    ([_rec(), _rec(layer=2)], "no records for MoE layers \\[1\\]"),
    ([_rec(), _rec()], "layer 0 token 0 appears more than once"),
    ([_rec(experts=[1, 1])], "repeat an expert"),
    ([_rec(experts=[1, 9])], "outside \\[0, 8\\)"),
    ([_rec(), "{not json"], ":2: not JSON"),
    ([json.dumps({"seq": 0, "token": 0, "experts": [1, 2]})], "missing fields \\['layer'\\]"),
    ([_rec(weights=[0.5])], "weights must be a list of 2 numbers"),
    ([_rec(token=-1)], "token -1 is below 0"),
    ([json.dumps({"specmoe_routing": 1, "num_experts": "8"}), _rec()], ":1: header fields \\['num_experts'\\]"),
])
def test_bad_jsonl_is_refused_in_one_line(tmp_path, lines, message):
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RoutingImportError, match=message) as err:
        import_routing("jsonl", [tmp_path / "bad.jsonl"], tmp_path / "trace", num_experts=8, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "trace" / "manifest.json").exists()


def test_bad_csv_is_refused(tmp_path, capsys):
    ids = make_routing(sequences=1, experts=64, k=6)[0][0]
    write_csv(tmp_path / "a.csv", ids, header=("Layer", "Batch", "Token", "Experts"))
    assert main(["import-routing", "moe-beyond", str(tmp_path / "a.csv"), "--out", str(tmp_path / "t")]) == 2
    assert re.search(r"a.csv:1: header .* is not MoE-Beyond's", capsys.readouterr().err)
    write_csv(tmp_path / "b.csv", ids)
    text = (tmp_path / "b.csv").read_text().replace('tok,3"', 'other"', 1)  # layer 1's token 3 differs
    rows = text.splitlines()
    rows[1 + ids.shape[0] + 3] = rows[1 + ids.shape[0] + 3].replace("tok,3", "zzz")  # in layer 2
    (tmp_path / "b.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(RoutingImportError, match="layer 2 token 3 is 'zzz'"):
        import_routing("moe-beyond", [tmp_path / "b.csv"], tmp_path / "t", progress=False)
    rows = (tmp_path / "b.csv").read_text().splitlines()
    (tmp_path / "c.csv").write_text("\n".join([rows[0], rows[1].replace("1,0,", "0,0,", 1)]) + "\n")
    with pytest.raises(RoutingImportError, match="Layer ID 0 is below 1"):
        import_routing("moe-beyond", [tmp_path / "c.csv"], tmp_path / "t", progress=False)


def test_train_eval_on_a_routing_only_trace(tmp_path, capsys):
    src = write_jsonl(tmp_path / "r.jsonl", make_routing(sequences=10, tokens=6, layers=3))
    trace = tmp_path / "trace"
    assert main(["import-routing", "jsonl", str(src), "--out", str(trace), "--num-experts", "8",
                 "--hidden-size", "16"]) == 0
    assert main(["train", str(trace), "--predictor", "history", "--out", str(tmp_path / "history")]) == 0
    assert main(["train", str(trace), "--predictor", "interlayer", "--out", str(tmp_path / "interlayer"),
                 "--steps", "10", "--eval-every", "5", "--batch-size", "32", "--val-tokens", "32", "--dim", "16",
                 "--heads", "2", "--ff", "32", "--layers", "1", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["train", str(trace), "--predictor", "hidden", "--out", str(tmp_path / "hidden")]) == 2
    assert "hidden needs the hidden states" in capsys.readouterr().err
    assert main(["eval", str(trace), "--out", str(tmp_path / "eval"), "--latency-calls", "0",
                 "--predictor", str(tmp_path / "history"), "--predictor", str(tmp_path / "interlayer")]) == 0
    assert "note: skipping pregate" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert "pregate" not in report["predictors"]
    assert {"random", "interlayer"} <= set(report["predictors"]) and len(report["predictors"]) == 4
    assert load_predictor(tmp_path / "interlayer").geometry.hidden_size == 16


def test_simulate_an_imported_trace_with_its_own_shape(tmp_path):
    """A Mixtral-geometry trace (32 layers, 8 experts, top-2): simulate picks the mixtral-8x7b shape itself and
    replays a history predictor trained on the routing alone (no model, no hidden states)."""
    routing = make_routing(sequences=4, tokens=4, layers=32, experts=8, k=2)
    src = write_jsonl(tmp_path / "humaneval.jsonl", routing, shuffle=False,
                      names=("problem_id", "token_idx", "layer", "experts", "gating_probs"))
    trace = tmp_path / "trace"
    assert main(["import-routing", "speculative-moe", str(src), "--out", str(trace)]) == 0
    assert main(["train", str(trace), "--predictor", "history", "--out", str(tmp_path / "history")]) == 0
    assert main(["simulate", "--trace", str(trace), "--capacities", "0.25", "--policies", "lru", "belady",
                 "--predictors", "oracle", str(tmp_path / "history"), "--warmup", "2", "--out", str(tmp_path),
                 "--name", "s"]) == 0
    sweep = json.loads((tmp_path / "s.json").read_text())
    assert {r["shape"] for r in sweep["runs"]} == {"mixtral-8x7b"}
    assert {r["predictor"] for r in sweep["runs"]} == {"none", "oracle", "history"}
    runs = {(r["policy"], r["predictor"], r["capacity"]): r for r in sweep["runs"]}
    assert runs[("belady", "none", 0.25)]["misses"] <= runs[("lru", "none", 0.25)]["misses"]


def test_real_routing_benchmark_smoke(tmp_path):
    """benchmarks/real_routing.py on a tiny imported Mixtral-geometry trace: held-out rows only, JSON + md."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "real_routing.py"
    spec = importlib.util.spec_from_file_location("real_routing", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    routing = make_routing(sequences=4, tokens=3, layers=32, experts=8, k=2)
    src = write_jsonl(tmp_path / "r.jsonl", routing, shuffle=False,
                      names=("problem_id", "token_idx", "layer", "experts", "gating_probs"))
    import_routing("speculative-moe", [src], tmp_path / "trace", progress=False)
    assert script.main([str(tmp_path / "trace"), "--policies", "lru", "belady", "--capacities", "0.25",
                        "--predictors", "none", "history", "--warmup", "1", "--out", str(tmp_path),
                        "--name", "rr"]) == 0
    result = json.loads((tmp_path / "rr.json").read_text())
    (t,) = result["traces"]
    assert t["shape"] == "mixtral-8x7b" and result["settings"]["simulated"] is True
    assert t["simulated_passes"] == t["split_tokens"]["test"] < t["trace_tokens"]  # held-out sequences only
    assert {r["predictor"] for r in t["sweep"]["runs"]} == {"none", "history"}
    assert "simulated" in (tmp_path / "rr.md").read_text()

"""Routing traces: shard format round trip, atomic writes, clear errors on bad files, splits, collection."""

import json

import pytest
import torch
from conftest import build_tiny
from routing_synth import char_tokenizer
from safetensors.torch import save_file

import specmoe.io
from specmoe import MoEGeometry
from specmoe.cli import main
from specmoe.runtime.adapters import find_moe_layers
from specmoe.traces import (
    TraceManifest, TraceShard, TraceWriter, capture_routing, collect_traces, load_traces, read_shard, split_sequences,
    write_shard,
)

GEO = MoEGeometry(num_layers=3, num_experts=8, top_k=2, hidden_size=16)


def random_shard(tokens=(5, 7, 4), hidden_layers=(0, 2), seed=0) -> TraceShard:
    g = torch.Generator().manual_seed(seed)
    N = sum(tokens)
    return TraceShard(
        ids=torch.randint(0, GEO.num_experts, (N, GEO.num_layers, GEO.top_k), generator=g),
        weights=torch.rand(N, GEO.num_layers, GEO.top_k, generator=g),
        seq_offsets=torch.tensor([0, *torch.tensor(tokens).cumsum(0).tolist()]),
        hidden={layer: torch.randn(N, GEO.hidden_size, generator=g).half() for layer in hidden_layers},
    )


def manifest(hidden_layers=(0, 2)) -> TraceManifest:
    return TraceManifest(model="unit-test", geometry=GEO, dtype="float32", source={"kind": "synthetic"},
                         hidden_layers=hidden_layers)


def test_shard_round_trip(tmp_path):
    shard = random_shard()
    shard.ids[3, 1, 1] = -1  # a token not routed at a layer survives too
    write_shard(tmp_path / "s.safetensors", shard, GEO)
    back = read_shard(tmp_path / "s.safetensors", GEO)
    assert torch.equal(back.ids, shard.ids) and torch.equal(back.offsets, shard.offsets)
    torch.testing.assert_close(back.weights, shard.weights, atol=1e-3, rtol=1e-3)  # stored in fp16
    assert back.hidden.keys() == {0, 2} and all(torch.equal(back.hidden[k], shard.hidden[k]) for k in back.hidden)
    assert back.hidden[0].dtype == torch.float16


def test_writer_shards_and_manifest(tmp_path):
    with TraceWriter(tmp_path, manifest(), shard_tokens=10) as w:
        for seed, n in enumerate((6, 5, 9, 3)):
            s = random_shard((n,), seed=seed)
            w.add(s.ids, s.weights, s.hidden)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["model"] == "unit-test" and data["geometry"] == GEO.to_dict() and data["dtype"] == "float32"
    assert data["source"] == {"kind": "synthetic"} and data["hidden_layers"] == [0, 2]
    assert [s["tokens"] for s in data["shards"]] == [11, 12] and data["sequences"] == 4
    trace = load_traces(tmp_path, progress=False)
    assert trace.num_tokens == 23 and trace.offsets.tolist() == [0, 6, 11, 20, 23]
    assert torch.equal(trace.ids[11:20], random_shard((9,), seed=2).ids)
    assert load_traces(tmp_path, hidden=False, progress=False).hidden == {}
    with pytest.raises(FileExistsError, match="overwrite"):
        TraceWriter(tmp_path, manifest())


def test_failed_write_leaves_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    write_shard(path, random_shard(seed=1), GEO)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(specmoe.io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_shard(path, random_shard(seed=2), GEO)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left behind


def test_bad_shards_name_the_file(tmp_path):
    path = tmp_path / "s.safetensors"
    write_shard(path, random_shard(), GEO)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"s\.safetensors is truncated"):
        read_shard(path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"ids": torch.zeros(2, 3, 2)}, str(foreign))
    with pytest.raises(ValueError, match=r"foreign\.safetensors is not a specmoe routing-trace shard"):
        read_shard(foreign)
    write_shard(path, random_shard(), GEO)
    with pytest.raises(ValueError, match=r"s\.safetensors.*num_experts: .*has 8, model has 60"):
        read_shard(path, MoEGeometry(3, 60, 2, 16))


def test_trace_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="did not finish"):
        load_traces(tmp_path)
    with TraceWriter(tmp_path, manifest(), shard_tokens=4) as w:
        for seed in range(3):
            s = random_shard((5,), seed=seed)
            w.add(s.ids, s.weights, s.hidden)
    (tmp_path / "shard-00001.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors"):
        load_traces(tmp_path, progress=False)
    (tmp_path / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00001\.safetensors"):
        load_traces(tmp_path, progress=False)
    with pytest.raises(ValueError, match="hidden states given for layers"):
        TraceWriter(tmp_path / "other", manifest()).add(s.ids, s.weights, {})


def test_split_by_sequence_is_disjoint_and_seeded():
    parts = split_sequences(50, (0.8, 0.1, 0.1), seed=3)
    assert [len(p) for p in parts.values()] == [40, 5, 5]
    assert sorted(torch.cat(list(parts.values())).tolist()) == list(range(50))
    again = split_sequences(50, (0.8, 0.1, 0.1), seed=3)
    assert all(torch.equal(parts[k], again[k]) for k in parts)
    assert not torch.equal(split_sequences(50, seed=4)["test"], parts["test"])
    with pytest.raises(ValueError, match="summing to 1"):
        split_sequences(50, (0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="at least 3 sequences"):
        split_sequences(2)


def test_trace_split_keeps_sequences_whole(tmp_path):
    with TraceWriter(tmp_path, manifest()) as w:
        for seed in range(12):
            s = random_shard((3 + seed,), seed=seed)
            s.hidden[0][:, 0] = seed  # tag every token with its sequence
            w.add(s.ids, s.weights, s.hidden)
    trace = load_traces(tmp_path, progress=False)
    splits = trace.split(seed=0)
    tags = {name: set(t.hidden[0][:, 0].int().tolist()) for name, t in splits.items()}
    assert not (tags["train"] & tags["val"]) and not (tags["train"] & tags["test"]) and not (tags["val"] & tags["test"])
    for name, t in splits.items():  # each sequence arrives whole, with its own length
        lengths = (t.offsets[1:] - t.offsets[:-1]).tolist()
        assert sorted(lengths) == sorted(3 + tag for tag in tags[name])
    test = splits["test"]
    ids, valid = test.targets(2, torch.arange(test.num_tokens), lookahead=2, wrap=True)  # 2+1=3 -> next token
    last = test.offsets[1:] - 1
    assert not valid[last].any() and valid[0].all() and (ids[last] == -1).all()
    assert torch.equal(ids[0, 0], test.ids[1, 0]) and torch.equal(ids[0, 1], test.ids[1, 1])


def test_collect_matches_capture_and_saves_routers(tmp_path):
    model = build_tiny("qwen2_moe")
    windows = torch.randint(2, 96, (5, 12), generator=torch.Generator().manual_seed(0))
    manifest = collect_traces(model, windows, tmp_path, model_name="tiny", source={"kind": "random"}, batch_size=2,
                              shard_tokens=30, progress=False)
    assert manifest.num_sequences == 5 and len(manifest.shards) == 2
    trace = load_traces(tmp_path, progress=False)
    with torch.no_grad(), capture_routing(model, hidden_layers=[1]) as cap:
        model(input_ids=windows[3:4])
    ref = cap.passes[0]
    order = ref.weights.argsort(-1, descending=True)
    assert torch.equal(trace.ids[36:48], ref.ids.gather(-1, order))
    torch.testing.assert_close(trace.hidden[1][36:48].float(), ref.hidden[1].float(), atol=1e-2, rtol=1e-2)
    moe = find_moe_layers(model)
    assert all(torch.equal(r.weight, layer.router.weight) for r, layer in zip(trace.routers, moe.layers))


def test_collect_cli(tmp_path):
    model = build_tiny("qwen2_moe")
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "text"
    text.mkdir()
    for i in range(3):
        (text / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 6)
    out = tmp_path / "traces"
    args = ["collect", "--model", str(tmp_path / "model"), "--text", str(text), "--out", str(out), "--window", "16",
            "--max-tokens", "200", "--hidden-layers", "0", "--device", "cpu"]
    assert main(args) == 0
    data = json.loads((out / "manifest.json").read_text())
    assert data["tokens"] == data["sequences"] * 16 and 0 < data["tokens"] <= 200
    assert data["source"]["files_available"] == 3 and data["hidden_layers"] == [0]
    assert main(args) == 2  # an existing trace without --overwrite: a one-line user error


def test_routing_sequences_and_passes():
    """One table: a prefill pass + decode passes per sequence; selecting sequences keeps their passes,
    selecting passes cuts sequences at the ends, and a pass may not be cut by a sequence selection."""
    from specmoe.traces import Routing

    ids = torch.arange(7 * 2 * 1).reshape(7, 2, 1) % 5
    r = Routing(ids, torch.tensor([0, 3, 4, 5, 7]), seq_offsets=torch.tensor([0, 4, 7]), num_experts=5,
                weights=torch.rand(7, 2, 1))
    assert (r.num_passes, r.num_sequences) == (4, 2) and r.sequence_of().tolist() == [0] * 4 + [1] * 3
    back = r.select_sequences([1, 0])
    assert back.pass_offsets.tolist() == [0, 1, 3, 6, 7] and back.seq_offsets.tolist() == [0, 3, 7]
    assert torch.equal(back.ids, torch.cat([ids[4:], ids[:4]])) and torch.equal(back.weights[:3], r.weights[4:])
    cut = r.select_passes(1, 3)
    assert cut.pass_tokens() == [1, 1] and cut.seq_offsets.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="straddles"):
        Routing(ids, torch.tensor([0, 5, 7]), seq_offsets=torch.tensor([0, 4, 7])).select_sequences([0])
    with pytest.raises(ValueError, match="seq_offsets"):
        Routing(ids, seq_offsets=torch.tensor([0, 4, 6]))


def test_shards_and_traces_are_routing(tmp_path):
    """Shards and loaded traces are the one routing table; a trace replays as a decode stream."""
    from specmoe.sim import RoutingStream
    from specmoe.traces import Routing, load_traces

    with TraceWriter(tmp_path, manifest(), shard_tokens=8) as w:
        for s in range(3):
            shard = random_shard(seed=s)
            w.add(shard.ids, shard.weights, shard.hidden)
    trace = load_traces(tmp_path, progress=False)
    assert RoutingStream is Routing and isinstance(trace, Routing)
    assert isinstance(read_shard(tmp_path / "shard-00000.safetensors"), Routing)
    assert trace.num_passes == trace.num_tokens == 48 and trace.num_sequences == 3 and trace.matches(3, 2, 8)
    stream = RoutingStream.from_trace(trace)
    assert torch.equal(stream.seq_offsets, trace.offsets) and torch.equal(stream.weights, trace.weights)
    sub = trace.select([2, 0])
    assert type(sub) is type(trace) and sub.geometry == trace.geometry and sub.num_sequences == 2

"""What a careless or hostile input must not do (issue 21 items 5-8): paths read from files stay inside their
directory, values inside a record never size an allocation, a bad safetensors file or a full disk is one line,
and a predictor directory is replaced whole or not at all."""

import json
import resource
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, one_line_error

from specmoe import load_offloaded
from specmoe.predictors import load_predictor, save_predictor
from specmoe.runtime.checkpoint import SafetensorsCheckpoint
from specmoe.traces.dataset import load_traces
from specmoe.traces.importers import import_routing

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    build_tiny("mixtral").save_pretrained(path)
    return path


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---- item 5: names read from files stay inside their directory ----------------------------------------------
@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors"])
def test_an_index_cannot_name_files_outside_the_checkpoint(saved_model, tmp_path, name, monkeypatch):
    model = _copy_model(saved_model, tmp_path / "m")
    (tmp_path / "outside.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    keys = list(SafetensorsCheckpoint(model).keys())
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    with pytest.raises(ValueError, match="outside|absolute"):
        load_offloaded(model, device="cpu", cache_capacity=4)
    assert not any("passwd" in f or "outside" in f for f in opened), opened


def _trace(tmp_path: Path, layers: int = 2, name: str = "trace") -> Path:
    lines = [json.dumps({"seq": s, "token": t, "layer": l, "experts": [(t + l) % 8, (t + l + 1) % 8]})
             for s in range(4) for t in range(16) for l in range(layers)]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / name
    import_routing("jsonl", [tmp_path / "r.jsonl"], out, num_experts=8, hidden_size=64, progress=False)
    return out


@pytest.mark.parametrize("field, value", [("file", "../other/shard-00000.safetensors"),
                                          ("file", "/etc/passwd"), ("routers", "../../../../etc/passwd")])
def test_a_manifest_cannot_name_files_outside_the_trace(tmp_path, field, value):
    out = _trace(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "shard-00000.safetensors").write_bytes((out / "shard-00000.safetensors").read_bytes())
    manifest = json.loads((out / "manifest.json").read_text())
    if field == "file":
        manifest["shards"][0]["file"] = value
    else:
        manifest["routers"] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="outside|absolute"):
        load_traces(out)


def test_bench_and_simulate_names_stay_inside_out(tmp_path, capsys):
    one_line_error(capsys, ["bench", "--name", "../x", "--out", str(tmp_path / "b")], "--name")
    one_line_error(capsys, ["simulate", "--name", "../x", "--out", str(tmp_path / "s")], "--name")
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.iterdir())


# ---- item 6: a value in a record never sizes an allocation -------------------------------------------------
def test_a_huge_token_index_is_a_gap_not_a_huge_allocation(tmp_path):
    lines = [json.dumps({"seq": 0, "token": t, "layer": l, "experts": [1, 2]}) for t in range(4) for l in range(2)]
    lines.append(json.dumps({"seq": 0, "token": 10**9, "layer": 0, "experts": [1, 2]}))
    lines.append(json.dumps({"seq": 0, "token": 0, "layer": 10**9, "experts": [1, 2]}))
    (tmp_path / "r.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    (tmp_path / "layer.jsonl").write_text("\n".join(lines[:-2] + lines[-1:]) + "\n")
    # in a child with 3 GiB of address space beyond what it has at start: a 10**9-element set or tensor fails
    code = f"""
import resource, sys
from specmoe.traces.importers import RoutingImportError, import_routing
soft = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize() + 3 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (soft, resource.RLIM_INFINITY))
for name in ('r.jsonl', 'layer.jsonl'):
    try:
        import_routing('jsonl', [r'{tmp_path}/' + name], r'{tmp_path}/out-' + name, num_experts=8, progress=False)
    except RoutingImportError as err:
        print(err)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    gap, layers = run.stdout.strip().splitlines()
    assert "no record for token 4" in gap and f"{tmp_path}/r.jsonl:9" in gap  # the file and line past the hole
    assert "no records for MoE layers [2, 3, 4, 5, 6, 7, 8, 9]" in layers and "layer.jsonl:9" in layers


# ---- item 7: bad safetensors files and a full disk are one line ----------------------------------------------
def _bad_files(model: Path):
    data = (model / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    yield "empty", b"", "not a safetensors file"
    yield "4 bytes", data[:4], "not a safetensors file"
    yield "header 2**40", struct.pack("<Q", 2**40) + data[8:], "truncated or not a safetensors file"
    yield "not JSON", data[:8] + b"\xff" * n + data[8 + n:], "header is not JSON"
    yield "truncated", data[: len(data) // 2], "truncated"


def test_bad_safetensors_files_are_one_line_errors_in_every_command(saved_model, tmp_path, capsys):
    trace = _trace(tmp_path, layers=32, name="mixtral-like")  # a shape simulate knows (Mixtral-8x7B)
    for i, (what, content, needle) in enumerate(_bad_files(saved_model)):
        model = _copy_model(saved_model, tmp_path / f"m{i}")
        (model / "model.safetensors").write_bytes(content)
        shard = str(model / "model.safetensors")
        with pytest.raises(ValueError, match=needle):
            load_offloaded(model, device="cpu", cache_capacity=4)
        for argv in (["generate", "--model", str(model), "--prompt", "x"],
                     ["bench", "--model", str(model), "--out", str(tmp_path / f"b{i}")],
                     ["collect", "--model", str(model), "--out", str(tmp_path / f"c{i}")],
                     ["simulate", "--predictors", "pregate", "--model", str(model), "--trace", str(trace),
                      "--shapes", "mixtral-8x7b", "--out", str(tmp_path / f"s{i}")]):
            one_line_error(capsys, argv, shard, needle)


def _limited_files(max_bytes: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return limit


@pytest.mark.parametrize("command", ["import-routing", "train"])
def test_a_full_disk_is_one_line(tmp_path, command):
    trace = _trace(tmp_path)
    argv = {"import-routing": ["import-routing", "jsonl", str(tmp_path / "r.jsonl"), "--num-experts", "8",
                               "--hidden-size", "64", "--out", str(tmp_path / "full")],
            "train": ["train", str(trace), "--predictor", "history", "--out", str(tmp_path / "full")]}[command]
    run = subprocess.run([sys.executable, "-m", "specmoe.cli", *argv], capture_output=True, text=True, timeout=120,
                         preexec_fn=_limited_files(64), cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    err = [line for line in run.stderr.splitlines() if "error" in line.lower()]  # (progress bars aside)
    assert run.returncode == 2 and len(err) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert err[0].startswith(f"specmoe {command}: error: could not write {tmp_path / 'full'}"), err
    assert "File too large" in err[0] or "No space" in err[0], err
    assert not (tmp_path / "full" / "manifest.json").exists() and not (tmp_path / "full" / "config.json").exists()


def test_collect_dtype_must_be_a_dtype(tmp_path, capsys):
    one_line_error(capsys, ["collect", "--dtype", "foo", "--out", str(tmp_path / "c")], "specmoe collect: error:",
              "invalid choice: 'foo'")


# ---- item 8: a predictor directory is replaced whole ---------------------------------------------------------
def test_a_save_killed_midway_leaves_the_old_predictor_whole(tmp_path, monkeypatch):
    from specmoe.geometry import MoEGeometry
    from specmoe.predictors import InterLayerPredictor

    geometry = MoEGeometry(num_layers=2, num_experts=8, top_k=2, hidden_size=64)
    old = InterLayerPredictor(geometry, dim=16, layers=1, heads=2, ff=16)
    save_predictor(old, tmp_path / "p")
    new = InterLayerPredictor(geometry, dim=32, layers=2, heads=2, ff=32)
    calls = []

    def dies_on_the_second_file(path, data):  # the process is killed after the weights are written
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr("specmoe.predictors.base.write_json", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        save_predictor(new, tmp_path / "p")
    monkeypatch.undo()
    assert calls  # it did die between the files
    loaded = load_predictor(tmp_path / "p", geometry=geometry)
    assert loaded.config() == old.config()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_tensors().values(), old.state_tensors().values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # nothing left beside it
    save_predictor(new, tmp_path / "p")  # and a save that finishes replaces it
    assert load_predictor(tmp_path / "p").config() == new.config()


def test_save_predictor_never_replaces_a_directory_of_other_files(tmp_path):
    from specmoe.geometry import MoEGeometry
    from specmoe.predictors import InterLayerPredictor

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        save_predictor(InterLayerPredictor(MoEGeometry(2, 8, 2, 64), dim=16, layers=1, heads=2, ff=16),
                       tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"

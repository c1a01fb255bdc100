"""`specmoe generate`, hub ids through huggingface_hub's own cache layout (offline, nothing downloaded), the
demo's output directory, and eval refusing NaN hidden states."""

import hashlib
import shutil
import subprocess

import pytest
import torch
from conftest import build_tiny, make_inputs
from routing_synth import char_tokenizer

from specmoe import load_offloaded
from specmoe.cli import main
from specmoe.hub import resolve_model

REPO = "tiny-org/tiny-moe"


def _hub_cache(model_dir, cache) -> str:
    """Lay `model_dir` out as huggingface_hub's cache does (blobs, a snapshot of symlinks, refs/main), with
    huggingface_hub's own helpers; returns the commit hash."""
    from huggingface_hub.file_download import (
        _cache_commit_hash_for_specific_revision,
        _create_symlink,
        repo_folder_name,
    )

    storage = cache / repo_folder_name(repo_id=REPO, repo_type="model")
    commit = hashlib.sha1(b"tiny").hexdigest()
    for f in sorted(model_dir.iterdir()):
        blob = storage / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        (storage / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(storage / "snapshots" / commit / f.name), new_blob=False)
    _cache_commit_hash_for_specific_revision(str(storage), "main", commit)
    return commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants, scan_cache_dir

    model = build_tiny("mixtral")
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    char_tokenizer().save_pretrained(tmp_path / "src")
    cache = tmp_path / "hub"
    commit = _hub_cache(tmp_path / "src", cache)
    assert [r.repo_id for r in scan_cache_dir(cache).repos] == [REPO]  # huggingface_hub reads it as its own
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return model, cache, commit


def test_a_hub_id_resolves_to_the_cached_snapshot_offline(offline_hub):
    model, cache, commit = offline_hub
    path = resolve_model(REPO)
    assert path.parent.name == "snapshots" and path.name == commit and (path / "config.json").is_file()
    inputs = make_inputs(model)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        out = load_offloaded(REPO, device="cpu", host_store="mmap").generate(**inputs, max_new_tokens=4,
                                                                             do_sample=False)
    assert torch.equal(out, ref)
    with pytest.raises(FileNotFoundError, match="not in the local cache.*HF_HUB_OFFLINE"):
        resolve_model("tiny-org/not-cached")
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub id"):
        resolve_model("/no/such/dir")


def test_generate_streams_tokens_and_ends_with_one_stats_line(offline_hub, capsys):
    rc = main(["generate", "--model", REPO, "--prompt", "def f(x):", "--max-new-tokens", "6", "--capacity", "0.25",
               "--host-store", "mmap", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and lines[0].startswith("def f(x):")
    last = lines[-1]
    assert last.startswith("[6 tokens") and "tok/s" in last and "hit rate" in last and "MiB moved" in last \
        and "stall" in last, last


def test_generate_runs_the_reference_model_by_default(capsys):
    rc = main(["generate", "--prompt", "import os\n", "--max-new-tokens", "3", "--predictor", "none",
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "[3 tokens" in out


def test_generate_chat_needs_a_chat_template(offline_hub, capsys):
    assert main(["generate", "--model", REPO, "--prompt", "hi", "--chat", "--device", "cpu"]) == 2
    assert "chat template" in capsys.readouterr().err


def test_demo_output_directory_is_ignored_by_git(tmp_path):
    from specmoe.reference.demo import ignored_output_dir

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    out = ignored_output_dir(tmp_path / "specmoe-demo")
    (out / "demo.json").write_text("{}")
    status = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain"], capture_output=True, text=True)
    assert status.stdout == ""


def test_eval_refuses_nan_hidden_states(tmp_path, capsys):
    from specmoe.traces.collect import collect_traces

    model = build_tiny("qwen2_moe")
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    windows = torch.randint(2, 96, (20, 8), generator=torch.Generator().manual_seed(0))
    collect_traces(model, windows, tmp_path / "t", model_name="nan", source={"kind": "random"}, progress=False)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "t"), "--out", str(tmp_path / "e"), "--latency-calls", "1"]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "hidden states" in err


def test_generate_chat_applies_the_template(tmp_path, capsys):
    model = build_tiny("mixtral")
    model.save_pretrained(tmp_path)
    tokenizer = char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    tokenizer.save_pretrained(tmp_path)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--chat", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    assert "[2 tokens" in capsys.readouterr().out

"""The reference model: packaged checkpoint, learned (far from uniform) routing, training recipe, demo."""

import json

import pytest
import torch

from specmoe.cli import main as cli_main
from specmoe.predictors import RandomPredictor, save_predictor
from specmoe.reference.corpus import CorpusConfig, load_corpus
from specmoe.reference.data import eval_windows
from specmoe.reference.model import (CHECKPOINT_DIR, PRESETS, build_config,
                                     load_reference_model, load_reference_prompts, load_reference_tokenizer)
from specmoe.reference.routing_stats import routing_statistics
from specmoe.reference.train import DEFAULT_TRAINING, ReferenceRecipe, main, train
from specmoe.sim.synthetic import build_random_model
from specmoe.training import TrainConfig
from specmoe.runtime.adapters import find_moe_layers


@pytest.fixture(scope="module")
def reference():
    return load_reference_model(), load_reference_tokenizer()


@pytest.fixture(scope="module")
def heldout_windows(reference):
    _, tok = reference
    ids = torch.cat([torch.tensor(tok(p)["input_ids"]) for p in load_reference_prompts()])
    return eval_windows(ids, 32, 64)  # [N, 32]


def test_packaged_checkpoint_loads_with_qwen15_geometry_and_fits_25mb(reference):
    model, tok = reference
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    geo = find_moe_layers(model).geometry
    assert (geo.num_layers, geo.num_experts, geo.top_k) == (24, 60, 4)
    assert model.model.layers[0].mlp.shared_expert is not None
    assert next(model.parameters()).dtype == torch.float32  # stored bf16, cast on load
    size = sum(f.stat().st_size for f in CHECKPOINT_DIR.iterdir() if f.is_file())
    assert size <= 25 * 2**20, f"checkpoint is {size / 2**20:.1f} MiB"
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    training = json.loads((CHECKPOINT_DIR / "training.json").read_text())
    assert training["final_val_loss"] < training["unigram_val_loss"] < training["initial_val_loss"]


def test_trained_routing_is_far_from_uniform_and_from_random_weights(reference, heldout_windows):
    model, _ = reference
    trained = routing_statistics(model, heldout_windows).summary()
    random = routing_statistics(build_random_model(model.config, dtype=torch.float32, seed=0, progress=False), heldout_windows).summary()
    # A random router can hardly tell experts apart (softmax entropy ~ log E); a trained one is decisive.
    assert random["router_entropy"] > 0.98
    assert trained["router_entropy"] < random["router_entropy"] - 0.1
    # Learned routing has favourite experts, and layer l's choice says something about layer l+1's.
    assert trained["max_expert_share"] > 1.4 * random["max_expert_share"]
    assert trained["top1_next_accuracy"] > random["top1_next_accuracy"] + 0.1
    assert trained["next_token_reuse"] > 1.5 * 4 / 60  # consecutive tokens share experts beyond chance (k / E)


def test_loading_a_missing_checkpoint_says_how_to_rebuild(tmp_path):
    with pytest.raises(FileNotFoundError, match="specmoe.reference.train"):
        load_reference_model(path=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    with pytest.raises(ValueError, match="LFS"):
        load_reference_model(path=tmp_path)


def test_corpus_splits_by_file_deterministically(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text("skip = 1\n")
    a = load_corpus(CorpusConfig(root=tmp_path, val_fraction=0.25, seed=3))
    b = load_corpus(CorpusConfig(root=tmp_path, val_fraction=0.25, seed=3))
    assert a.train == b.train and a.val == b.val
    assert not set(a.train) & set(a.val) and len(a.train) + len(a.val) == 40  # test/ left out
    assert a.describe()["fingerprint"] == b.describe()["fingerprint"]
    # A file keeps its side when other files appear.
    (tmp_path / "extra.py").write_text("y = 0\n")
    c = load_corpus(CorpusConfig(root=tmp_path, val_fraction=0.25, seed=3))
    assert set(a.val) <= set(c.val)
    with pytest.raises(ValueError, match="val_fraction"):
        CorpusConfig(val_fraction=0.0)


def test_train_config_validation_and_schedule():
    with pytest.raises(ValueError, match="preset"):
        ReferenceRecipe(preset="gpt5")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="steps or max_minutes"):
        TrainConfig(steps=None)
    cfg = TrainConfig(warmup_steps=10, min_lr_ratio=0.1, steps=100, max_minutes=1.0)
    assert cfg.lr_factor(0, 0.0) == pytest.approx(0.1)
    assert cfg.lr_factor(50, 0.0) == pytest.approx(1.0)
    assert cfg.lr_factor(50, 1.0) == pytest.approx(0.1)
    assert cfg.lr_factor(50, 0.5) == pytest.approx(0.55)
    assert cfg.progress(25, 0.0) == 0.25 and cfg.progress(25, 45.0) == 0.75  # whichever is further
    assert cfg.progress(25, 45.0, budget_s=30.0) == 1.5


def test_recorded_recipe_flags_still_parse(monkeypatch):
    """training.json of the committed checkpoint says --minutes and --eval-every-steps: they still work, and
    --steps replaces the time budget."""
    seen = {}
    monkeypatch.setattr("specmoe.reference.train.train", lambda recipe, cfg, out, corpus, progress: seen.update(
        recipe=recipe, cfg=cfg) or {"steps": 0, "tokens_seen": 0, "train_loop_s": 0, "initial_val_loss": 0.0,
                                    "final_val_loss": 0.0, "unigram_val_loss": 0.0})
    assert main(["--out", "x", "--minutes", "3", "--steps", "7", "--eval-every-steps", "5", "--seq-len", "64", "-q"]) == 0
    assert seen["cfg"].steps == 7 and seen["cfg"].max_minutes is None and seen["cfg"].eval_every == 5
    assert seen["recipe"].seq_len == 64 and seen["cfg"].lr == DEFAULT_TRAINING.lr


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_their_geometry_with_the_load_balancing_loss_on(name):
    p = PRESETS[name]
    model = build_random_model(build_config(p, vocab_size=300, eos_token_id=0), dtype=torch.float32,
                               progress=False, trainable=True).train()
    geo = find_moe_layers(model).geometry
    assert (geo.num_layers, geo.num_experts, geo.top_k) == (p.num_layers, p.num_experts, p.top_k)
    x = torch.randint(1, 300, (2, 16))
    out = model(input_ids=x, labels=x, output_router_logits=True)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert out.loss.item() == pytest.approx(
        model(input_ids=x, labels=x).loss.item() + p.router_aux_loss_coef * out.aux_loss.item(), rel=1e-5)


def test_training_recipe_writes_a_loadable_checkpoint(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):  # a tiny corpus of real stdlib-like code
        (src / f"mod{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40)))
    recipe = ReferenceRecipe(seq_len=32, vocab_size=300, num_prompts=2)
    cfg = TrainConfig(steps=2, batch_size=2, val_tokens=64, warmup_steps=1)
    record = train(recipe, cfg, tmp_path / "ck", CorpusConfig(root=src, val_fraction=0.2), progress=False)
    assert record["steps"] == 2 and record["corpus"]["train_files"] + record["corpus"]["val_files"] == 12
    model = load_reference_model(path=tmp_path / "ck")
    assert find_moe_layers(model).geometry.num_experts == 60
    assert load_reference_prompts(tmp_path / "ck")
    assert (tmp_path / "ck" / "config.json").is_file() and not (tmp_path / "ck.partial").exists()


def test_demo_runs_end_to_end_on_a_small_setting(tmp_path, capsys):
    trained = tmp_path / "random-predictor"
    save_predictor(RandomPredictor(seed=1), trained)
    out = tmp_path / "demo"
    rc = cli_main(["demo", "--device", "cpu", "--prompts", "1", "--prompt-tokens", "8", "--new-tokens", "4",
                   "--capacity", "0.25", "--predictor", str(trained), "--out", str(out), "-q"])
    assert rc == 0
    result = json.loads((out / "demo.json").read_text())
    rows = {r["predictor"].split(" (")[0]: r for r in result["rows"]}
    assert list(rows) == ["none", "pre-gate", "hidden", "random", "oracle"]  # the packaged trained one too
    assert all(r["tokens_match"] for r in rows.values())
    assert rows["none"]["decode"]["prefetch_issued"] == 0
    assert rows["oracle"]["decode"]["misses"] == 0  # replaying each prompt's own routing never misses
    assert rows["oracle"]["decode"]["hits"] == 3 * 24 * 4  # 3 decode steps x 24 layers x top-4 (distinct)
    assert (out / "demo.png").stat().st_size > 0
    assert "oracle" in capsys.readouterr().out

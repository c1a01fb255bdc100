"""A new user's path (issue 21 items 9-13): --threads on every command with a sane default, one rule for existing
output directories, one capacity parser, messages that say the right thing once, routing-only commands that
need no routers file."""

import argparse
import json
import logging
import time

import pytest
import torch
from conftest import build_tiny, one_line_error

from specmoe import cli
from specmoe.cli import COMMANDS, build_parser, main
from specmoe.runtime.capacity import parse_capacity, resolve_capacity



def _trace(tmp_path, layers=2):
    from specmoe.traces.importers import import_routing

    lines = [json.dumps({"seq": s, "token": t, "layer": l, "experts": [(t + l + s) % 8, (t + l + s + 1) % 8]})
             for s in range(6) for t in range(16) for l in range(layers)]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "trace"
    import_routing("jsonl", [tmp_path / "r.jsonl"], out, num_experts=8, hidden_size=64, progress=False)
    return out


# ---- item 9: threads --------------------------------------------------------------------------------------
def test_every_command_takes_threads_and_the_default_is_sane(monkeypatch):
    import importlib

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, (module, _) in COMMANDS.items():
        getattr(importlib.import_module(module), f"add_{name.replace('-', '_')}_arguments")(sub.choices[name])
        assert "--threads" in sub.choices[name]._option_string_actions, name
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert cli.default_threads() == 1  # a 2-core machine: one thread (0.8 -> 30 tok/s measured)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert cli.default_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli.default_threads() == 3


def test_threads_apply_while_the_command_runs_and_are_restored(monkeypatch, tmp_path):
    import specmoe.sim.cli as sim_cli

    seen = []
    monkeypatch.setattr(sim_cli, "run_simulate", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert main(["simulate", "--threads", "3", "--out", str(tmp_path)]) == 0
    assert seen == [3] and torch.get_num_threads() == before


# ---- item 10: existing outputs ------------------------------------------------------------------------------
def test_every_command_refuses_its_existing_outputs_before_any_work(tmp_path, capsys):
    trace = _trace(tmp_path)
    cases = {
        "train": (["train", str(trace), "--predictor", "history"], "config.json"),
        "eval": (["eval", str(trace)], "eval.json"),
        "simulate": (["simulate", "--trace", str(trace)], "simulate.json"),
        "demo": (["demo"], "demo.json"),
        "bench": (["bench"], "bench_cpu.json"),
        "collect": (["collect"], "manifest.json"),
        "import-routing": (["import-routing", "jsonl", str(tmp_path / "r.jsonl")], "manifest.json"),
    }
    for name, (argv, output) in cases.items():
        out = tmp_path / f"out-{name}"
        out.mkdir()
        (out / output).write_text("mine")
        t0 = time.perf_counter()
        one_line_error(capsys, [*argv, "--out", str(out)], f"specmoe {name}: error:", "--overwrite")
        assert time.perf_counter() - t0 < 5, name  # refused before loading anything
        assert (out / output).read_text() == "mine" and len(list(out.iterdir())) == 1, name


def test_outputs_beside_other_files_leave_them_alone_and_add_nothing(tmp_path, capsys):
    from specmoe.reference.demo import ignored_output_dir

    trace = _trace(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert main(["simulate", "--trace", str(trace), "--shapes", "olmoe-1b-7b", "--capacities", "0.5",
                 "--policies", "lru", "--prefetch-policies", "lru", "--predictors", "none", "--out", str(out)]) == 2
    capsys.readouterr()  # (olmoe has another geometry: refused; nothing written)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    ignored_output_dir(out)  # the demo's: an existing directory gets no .gitignore
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (ignored_output_dir(tmp_path / "new") / ".gitignore").is_file()  # one it creates does


def test_train_with_overwrite_replaces_a_predictor_but_not_other_files(tmp_path, capsys):
    trace = _trace(tmp_path)
    out = tmp_path / "p"
    assert main(["train", str(trace), "--predictor", "history", "--out", str(out)]) == 0
    assert main(["train", str(trace), "--predictor", "history", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "training.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    one_line_error(capsys, ["train", str(trace), "--predictor", "history", "--out", str(other), "--overwrite"],
              "not a saved predictor")


# ---- item 11: capacity ----------------------------------------------------------------------------------------
def test_capacity_is_read_one_way_everywhere(capsys, caplog):
    assert [parse_capacity(t) for t in ("0.5", "96", "8GiB")] == [0.5, 96, "8GiB"]
    for argv in (["demo", "--capacity", "0"], ["generate", "--prompt", "x", "--capacity", "0"],
                 ["serve", "--capacity", "0"], ["bench", "--capacities", "0.5", "0"]):
        err = one_line_error(capsys, argv, "capacity '0': a slot count must be >= 1")
        assert "DemoConfig" not in err
    one_line_error(capsys, ["bench", "--capacities", "lots"], "capacity 'lots'", "8GiB")
    with caplog.at_level(logging.WARNING, logger="specmoe.runtime.capacity"):
        assert resolve_capacity("999TiB", 2, 8, 1000) == 16
    assert "999TiB" in caplog.text and "all of them" in caplog.text  # said, not silently cut


def test_bench_takes_a_budget_as_the_fraction_it_comes_to(tmp_path):
    from specmoe.bench import cli as bench_cli
    from specmoe.runtime.capacity import capacity_fraction

    assert capacity_fraction("16KiB", 2, 8, 4096) == 4 / 16
    parser = argparse.ArgumentParser()
    bench_cli.add_bench_arguments(parser)
    assert parser.parse_args(["--capacities", "8GiB", "12", "0.5"]).capacities == ["8GiB", 12, 0.5]


# ---- item 12: messages ------------------------------------------------------------------------------------------
def test_messages_say_the_right_thing_once(tmp_path, capsys):
    trace = _trace(tmp_path)
    err = one_line_error(capsys, ["train", str(trace), "--predictor", "hidden", "--out", str(tmp_path / "h")])
    assert err.count("specmoe train") == 1
    one_line_error(capsys, ["generate", "--model", "/etc", "--prompt", "x"], "no config.json")
    model = tmp_path / "moe"
    build_tiny("mixtral").save_pretrained(model)  # no tokenizer files
    one_line_error(capsys, ["generate", "--model", str(model), "--prompt", "x"], "no tokenizer files")
    from transformers import AutoConfig, AutoModelForCausalLM

    dense = tmp_path / "dense"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64)).save_pretrained(dense)
    one_line_error(capsys, ["generate", "--model", str(dense), "--prompt", "x"], "no MoE layers")  # not the tokenizer
    (model / "config.json").write_text("{corrupt")
    one_line_error(capsys, ["generate", "--model", str(model), "--prompt", "x"], str(model / "config.json"))
    (model / "config.json").unlink()
    one_line_error(capsys, ["simulate", "--out", str(tmp_path / "s"), "--capacities", "0.5", "--threads", "0"],
              "--threads", ">= 1")


def test_ctrl_c_in_generate_ends_the_streamed_line(monkeypatch, capsys):
    import specmoe.generate as gen

    class Tok:
        chat_template = None
        pad_token_id = eos_token_id = 0

        def __call__(self, text, return_tensors):
            return {"input_ids": torch.tensor([[1, 2]])}

    class Smoe:
        device = torch.device("cpu")

        def generate(self, **kwargs):
            print("some streamed text", end="")
            raise KeyboardInterrupt

    monkeypatch.setattr(gen, "load_model", lambda args: (Smoe(), Tok()))
    monkeypatch.setattr(gen, "pad_token_id", lambda smoe, tok: 0)
    monkeypatch.setattr(gen, "_stream_clock", lambda tok, device: None)
    assert main(["generate", "--prompt", "x"]) == 130
    out, err = capsys.readouterr()
    assert out.endswith("some streamed text\n") and err.strip() == "specmoe generate: interrupted"


# ---- item 13: routing-only commands need no routers file -----------------------------------------------------
def test_a_missing_routers_file_blocks_only_what_needs_routers(tmp_path, capsys):
    trace = _trace(tmp_path, layers=32)  # Mixtral-8x7B's routing geometry, which simulate knows
    manifest = json.loads((trace / "manifest.json").read_text())
    manifest["routers"] = "routers.safetensors"  # as `specmoe collect` writes it; the file is then lost
    (trace / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", str(trace), "--predictor", "history", "--out", str(tmp_path / "p")]) == 0
    assert main(["simulate", "--trace", str(trace), "--capacities", "0.5", "--policies", "lru",
                 "--prefetch-policies", "lru", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "p" / "config.json").is_file() and (tmp_path / "s" / "simulate.json").is_file()


# ---- item 14: simulate says which rows do not fit and picks a deployable best ------------------------------------
def test_simulate_marks_rows_that_do_not_fit_and_the_best_is_deployable(tmp_path, capsys):
    from specmoe.sim.report import deployable

    trace = _trace(tmp_path, layers=32)  # Mixtral-8x7B's routing geometry
    assert main(["simulate", "--trace", str(trace), "--shapes", "mixtral-8x7b", "--profiles", "rtx3090",
                 "--capacities", "0.25", "0.75", "--policies", "lru", "default", "--prefetch-policies", "lru",
                 "--predictors", "oracle", "--out", str(tmp_path / "s")]) == 0
    sweep = json.loads((tmp_path / "s" / "simulate.json").read_text())
    md = (tmp_path / "s" / "simulate.md").read_text()
    runs = sweep["runs"]
    assert {r["capacity"]: r["fits"] for r in runs} == {**{c: False for c in (0.25, 0.75)},
                                                        **{r["capacity"]: True for r in runs if r["max_fit"]}}
    rows = [line for line in md.splitlines() if line.startswith("| 0.")]
    assert rows and all((" ✗" in row) == ("(max fit)" not in row) for row in rows)  # 0.25 needs 24.0 of 24 GiB
    assert "wrapped @ capacity 0.25 (GiB)" in md and "wrapped @0." not in md
    memory_row = next(line for line in md.splitlines() if line.startswith("| mixtral-8x7b"))
    best = memory_row.split("|")[-4]  # "tok/s there (best deployable)"
    assert "oracle" not in best and "belady" not in best and best.strip()
    assert not any(deployable(r) for r in runs if r["predictor"] == "oracle" or not r["fits"])
    assert "(link)" in md and "†" in md
    capsys.readouterr()

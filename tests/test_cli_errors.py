"""What a new user tripped on: CLI errors, -v, --version, help texts, and the runtime's guards."""

import argparse
import importlib
import subprocess
import sys
import time

import pytest
import torch
from conftest import build_tiny, make_inputs, one_line_error

from specmoe import SpeculativeMoE, __version__
from specmoe.bench.compare import Schedule, run_schedule
from specmoe.cli import COMMANDS, build_parser, main
from specmoe.predictors import PreGatePredictor
from specmoe.sim.stream import RoutingStream



def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    one_line_error(capsys, ["simulate", "--trace", missing], "specmoe simulate: error:", "not found")
    one_line_error(capsys, ["eval", missing, "--out", str(tmp_path / "e")], "specmoe eval: error:")
    one_line_error(capsys, ["train", missing, "--predictor", "history", "--out", str(tmp_path / "t")])
    one_line_error(capsys, ["bench", "--model", "/nonexistent", "--no-accelerate"], "/nonexistent")
    one_line_error(capsys, ["bench", "--capacities", "1.5"], "capacities")
    one_line_error(capsys, ["collect", "--model", "/nonexistent", "--out", str(tmp_path / "c")], "/nonexistent")
    one_line_error(capsys, ["demo", "--predictor", missing], "--predictor")
    one_line_error(capsys, ["generate", "--prompt", "x", "--predictor", missing], "--predictor")
    one_line_error(capsys, ["generate", "--prompt", "x", "--model", "no-such-org/no-such-model"], "no-such-org")


def test_a_subprocess_shows_no_traceback_and_v_adds_it(tmp_path, capsys, caplog):
    argv = [sys.executable, "-m", "specmoe.cli", "simulate", "--trace", str(tmp_path / "missing")]
    quiet = subprocess.run(argv, capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and len(quiet.stderr.strip().splitlines()) == 1
    with caplog.at_level("ERROR", logger="specmoe"):
        assert main(["-v", "simulate", "--trace", str(tmp_path / "missing")]) == 2
    assert any(r.exc_info for r in caplog.records)  # -v logs the traceback


def test_v_before_or_after_the_command(tmp_path, capsys):
    trace = str(tmp_path / "missing")
    for argv in (["-v", "simulate", "--trace", trace], ["simulate", "-v", "--trace", trace],
                 ["--verbose", "collect", "--out", str(tmp_path / "t"), "--model", "/nonexistent"]):
        assert main(argv) == 2, argv  # parsed: the command ran and failed on its input, not on its options
        assert "unrecognized" not in capsys.readouterr().err
    assert build_parser().parse_args(["demo", "-v"]).verbose
    assert build_parser().parse_args(["-v", "demo"]).verbose
    assert not build_parser().parse_args(["demo"]).verbose


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"specmoe {__version__}"


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, (module, _) in COMMANDS.items():
        p = sub.choices[name]
        getattr(importlib.import_module(module), f"add_{name.replace('-', '_')}_arguments")(p)
        bare = [a.option_strings or a.dest for a in p._actions
                if not a.help and not isinstance(a, argparse._HelpAction)]
        assert not bare, f"specmoe {name}: no help text for {bare}"


def test_collect_checks_the_tokenizer_before_anything_else(tmp_path, capsys):
    build_tiny("qwen2_moe").save_pretrained(tmp_path / "model")  # no tokenizer files
    t0 = time.perf_counter()
    one_line_error(capsys, ["collect", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "t")],
                    "no tokenizer files")
    assert time.perf_counter() - t0 < 5  # no text scanned


def test_simulate_clamps_the_warmup_on_a_short_trace(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(64, generator=g)[:8] for _ in range(5 * 16)]).view(5, 1, 16, 8)
    RoutingStream.from_passes(list(ids)).save(tmp_path / "short.safetensors")  # 5 passes, --warmup 64 default
    rc = main(["simulate", "--trace", str(tmp_path / "short.safetensors"), "--shapes", "olmoe-1b-7b",
               "--capacities", "0.5", "--policies", "lru", "--out", str(tmp_path), "--name", "s"])
    out = capsys.readouterr().out
    assert rc == 0 and "warming up on 2" in out


@pytest.mark.parametrize("kwargs, match", [
    (dict(prefetch_width=0), "prefetch_width"),
    (dict(max_prefetch_inflight=0), "max_prefetch_inflight"),
    (dict(cache_capacity="0.5"), "without a unit"),
])
def test_zero_or_unitless_settings_are_errors_not_defaults(kwargs, match):
    model = build_tiny("mixtral")
    with pytest.raises(ValueError, match=match):
        SpeculativeMoE(model, PreGatePredictor(), device="cpu", **kwargs)
    assert not hasattr(model, "_specmoe_wrapper") or model._specmoe_wrapper is None


def test_the_wrapper_refuses_work_after_unwrap():
    model = build_tiny("mixtral")
    smoe = SpeculativeMoE(model, None, 0.5, device="cpu")
    inputs = make_inputs(model)
    smoe.unwrap()
    for call in (lambda: smoe.generate(**inputs, max_new_tokens=2), lambda: smoe(**inputs),
                 lambda: smoe.set_predictor(PreGatePredictor())):
        with pytest.raises(RuntimeError, match="after unwrap"):
            call()
    assert smoe.unwrap() is model  # unwrapping twice is harmless


def test_stats_totals_are_read_at_the_top():
    model = build_tiny("qwen2_moe")
    smoe = SpeculativeMoE(model, None, 0.25, device="cpu")
    with torch.no_grad():
        smoe.generate(**make_inputs(model), max_new_tokens=3, do_sample=False)
    s = smoe.stats
    assert s.misses > 0 and (s.hits, s.misses, s.bytes_moved) == (s.total.hits, s.total.misses, s.total.bytes_moved)
    assert s.bytes_moved == s.misses * smoe.store.layout.nbytes
    assert "hit rate" in s.summary() and "MiB moved" in s.summary()


def test_phimoe_pregate_takes_k_from_the_routing_the_model_produces():
    import conftest

    old = dict(conftest.FAMILIES["phimoe"])
    conftest.FAMILIES["phimoe"]["num_experts_per_tok"] = 3  # its sparsemixer routes to 2 whatever this says
    try:
        model = build_tiny("phimoe")
    finally:
        conftest.FAMILIES["phimoe"] = old
    inputs = make_inputs(model, batch=2)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    smoe = SpeculativeMoE(model, PreGatePredictor(), 0.5, device="cpu")
    assert smoe.geometry.top_k == 2
    with torch.no_grad():
        assert torch.equal(smoe.generate(**inputs, max_new_tokens=4, do_sample=False), ref)


def test_bench_times_decode_directly_even_when_the_one_token_call_is_slower():
    def generate(input_ids, max_new_tokens, streamer=None, **kw):
        if max_new_tokens == 1:
            time.sleep(0.05)  # a slow 1-token call: (t_N - t_1) would be negative
        if streamer:
            streamer.put(input_ids)
        for _ in range(max_new_tokens):
            if streamer:
                streamer.put(None)
            time.sleep(0.002)
        return torch.zeros(1, max_new_tokens)

    timing = run_schedule(generate, [{"input_ids": torch.zeros(1, 2)}], Schedule.build(1, 5, 0), "cpu")
    # 4 decode steps of >= 2 ms after the first token: well under 500 tok/s, never 1e9
    assert 50 < timing["decode_tok_s"] < 500

"""A plan that fits itself (issue 22 item 4): `specmoe plan` / `sim.plan.make_plan`, and cache_capacity="auto"."""

import json

import pytest
import torch
from prequant_ckpt import dequantized_reference, write_checkpoint

from specmoe import load_offloaded
from specmoe.cli import main
from specmoe.runtime import loading
from specmoe.sim.hardware import HardwareProfile
from specmoe.sim.host import HostProfile
from specmoe.sim.plan import RAM_RESERVE_BYTES, Machine, make_plan
from specmoe.sim.shapes import ModelShape

GiB = 2**30


def machine(gpu_gib=24, ram_gib=64, disk=3e9):
    gpu = HardwareProfile.from_name("rtx3090").with_(memory_bytes=gpu_gib * GiB)
    return Machine(gpu, HostProfile.from_name("ddr5-desktop"), ram_gib * GiB, disk)


def test_tiers_follow_the_machine():
    shape = ModelShape.from_name("qwen3-30b-a3b")  # 54 GiB of bf16 experts
    big = make_plan(shape, machine(ram_gib=128), passes=16, lossy=False)
    assert big.chosen.host_store == "ram" and big.chosen.disk_bytes == 0 and big.chosen.ram_fraction == 1.0
    small = make_plan(shape, machine(ram_gib=32), passes=16, lossy=False)
    c = small.chosen
    assert c.host_store == "mmap" and 0 < c.ram_fraction < 1 and c.disk_s_per_token > 0
    assert c.ram_bytes == 32 * GiB - RAM_RESERVE_BYTES and c.ram_bytes + c.disk_bytes == 48 * 128 * shape.slot_bytes
    assert c.slots == big.chosen.slots  # the GPU tier does not depend on RAM
    assert c.tok_s < big.chosen.tok_s  # the disk is charged
    assert all(not o.lossy for o in small.options)
    assert any("disk 3.0 GB/s" in a for a in small.assumptions) and "synthetic" in small.routing
    # a faster disk, a faster plan: the only difference is the disk charge
    fast = make_plan(shape, machine(ram_gib=32, disk=12e9), passes=16, lossy=False)
    assert fast.chosen.tok_s > c.tok_s


def test_lossy_compression_is_chosen_only_when_allowed_and_labelled():
    shape = ModelShape.from_name("qwen3-30b-a3b")
    plan = make_plan(shape, machine(gpu_gib=16, ram_gib=128), passes=16)
    assert {o.compression for o in plan.options} == {"bf16", "int8", "int4-g128"}
    best = max(plan.options, key=lambda o: o.tok_s)
    assert plan.chosen == best
    int4 = [o for o in plan.options if o.compression == "int4-g128"]
    bf16 = [o for o in plan.options if o.compression == "bf16"]
    assert int4[0].slots > 3 * bf16[0].slots  # ~3.8x smaller slots
    if plan.chosen.lossy:
        assert "changes numerics" in plan.summary() and plan.load_kwargs["compression"] == plan.chosen.compression


def test_published_formats_and_what_does_not_fit():
    oss = make_plan(ModelShape.from_name("gpt-oss-120b"), machine(), passes=16)
    assert oss.chosen.compression == "mxfp4" and not oss.chosen.lossy and oss.chosen.host_store == "ram"
    assert oss.chosen.gpu_bytes <= 24 * GiB and oss.host_threads == machine().host.threads == 8
    assert oss.chosen.misses != "fetch" and oss.load_kwargs["host_threads"] == 8  # its rates' threads, not 24 cores
    with pytest.raises(ValueError, match="non-expert weights"):  # DeepSeek-V3: 31.9 GiB of bf16 non-expert weights
        make_plan(ModelShape.from_name("deepseek-v3"), machine(), passes=16)
    with pytest.raises(ValueError, match="ram must be more than"):
        machine(ram_gib=2)


def test_plan_cli(tmp_path, capsys):
    cfg = tmp_path / "m" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(ModelShape.from_name("olmoe-1b-7b").config))
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(cfg.parent), "--gpu", "8GiB", "--ram", "16GiB", "--disk-gbps", "2",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "simulated decode" in text and "assumptions" in text and "load_offloaded(path, cache_capacity=" in text
    plan = json.loads(out.read_text())
    assert plan["machine"]["gpu_bytes"] == 8 * GiB and plan["machine"]["disk_bytes_per_s"] == 2e9
    assert plan["chosen"]["tok_s"] > 0 and plan["shape"] == "m"
    assert main(["plan", "--model", "olmoe-1b-7b", "--gpu", "h100", "--ram", "16GiB", "--lossless"]) == 0
    assert main(["plan", "--model", "no-such-model-here", "--ram", "16GiB"]) == 2


def test_load_offloaded_auto_capacity(tmp_path, monkeypatch):
    path = write_checkpoint("mxfp4", tmp_path / "oss")
    ref = dequantized_reference("mxfp4", path)
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=4, do_sample=False)
    smoe = load_offloaded(path, cache_capacity="auto", device="cpu")
    assert smoe.num_slots == 2 * 8  # a tiny model: every expert fits
    with torch.no_grad():
        assert torch.equal(smoe.generate(ids, max_new_tokens=4, do_sample=False), expected)
    slot = smoe.store.layout.nbytes
    monkeypatch.setattr(loading, "_meminfo_available", lambda: 16 * slot + 4 * 5 * slot)  # room for 5 slots
    assert load_offloaded(path, cache_capacity="auto", device="cpu").num_slots == 5
    monkeypatch.setattr(loading, "_meminfo_available", lambda: 16 * slot)
    with pytest.raises(ValueError, match="no room for one expert"):
        load_offloaded(path, cache_capacity="auto", device="cpu")


def test_frontier_figures_are_the_plan_of_their_settings():
    """benchmarks/results/frontier_fit.json (README's frontier table) is what make_plan gives for its settings."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "frontier_fit.json"
    data = json.loads(path.read_text())
    rows = {(r["model"], r["host"], r["experts"]): r for r in data["rows"]}
    assert {m for m, _, _ in rows} == {"gpt-oss-120b", "glm-4.5-air", "qwen3-235b-a22b", "deepseek-v3",
                                       "qwen3-next-80b-a3b", "llama-4-scout"}
    r = rows[("gpt-oss-120b", "ddr5-desktop", "as published")]
    assert r["format"] == "mxfp4" and "synthetic" in r["routing"]
    plan = make_plan(ModelShape.from_name("gpt-oss-120b"),
                     Machine(HardwareProfile.from_name("rtx3090"), HostProfile.from_name("ddr5-desktop"),
                             64 * GiB, 3e9), lossy=False, passes=data["settings"]["passes"])
    assert plan.chosen.tok_s == pytest.approx(r["tok_s"], rel=1e-6) and plan.chosen.slots == r["slots"]
    q8 = rows[("gpt-oss-120b", "ddr5-desktop", "as published, int8 activations")]
    plan8 = make_plan(ModelShape.from_name("gpt-oss-120b"),
                      Machine(HardwareProfile.from_name("rtx3090"), HostProfile.from_name("ddr5-desktop"),
                              64 * GiB, 3e9), lossy=False, passes=data["settings"]["passes"], activations=("int8",))
    assert plan8.chosen.tok_s == pytest.approx(q8["tok_s"], rel=1e-6) and q8["host_activations"] == "int8"
    assert r["host_activations"] == "fp32" and q8["host_kernel"] == "mxfp4-int8act"
    assert ("glm-4.5-air", "ddr5-desktop", "as published, int8 activations") not in rows  # bf16: no such kernel
    assert not rows[("deepseek-v3", "3090-box", "as published")]["fits"]
    assert all(f["source"].startswith("https://") for figs in data["published"].values() for f in figs)


def test_int8_host_activations_are_tried_where_allowed_and_labelled():
    """make_plan tries the int8-activation kernel for host misses of MXFP4 experts when numerics may change (not
    with lossy=False, not for formats without that kernel), says which activations each option assumes, and
    passes the setting on when it picks it."""
    shape = ModelShape.from_name("gpt-oss-120b")
    plan = make_plan(shape, machine(), passes=16)
    modes = {(o.misses, o.host_activations) for o in plan.options}
    assert modes == {("fetch", "fp32"), ("auto", "fp32"), ("auto", "int8")}
    q8 = next(o for o in plan.options if o.host_activations == "int8")
    exact = next(o for o in plan.options if o.misses == "auto" and o.host_activations == "fp32")
    assert q8.slots == exact.slots and q8.tok_s != exact.tok_s  # the same tiers, another host kernel's rate
    if plan.chosen.host_activations == "int8":
        assert plan.load_kwargs["host_activations"] == "int8" and "changes numerics" in plan.summary()
    else:
        assert "host_activations" not in plan.load_kwargs
    assert {o.host_activations for o in make_plan(shape, machine(), passes=16, lossy=False).options} == {"fp32"}
    bf16 = make_plan(ModelShape.from_name("qwen3-30b-a3b"), machine(ram_gib=128), passes=16)
    assert {o.host_activations for o in bf16.options} == {"fp32"}  # no int8 kernel for bf16 / int8 / int4

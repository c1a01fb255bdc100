"""Memory counts compressed slots: the simulator's shapes and memory plan, and the issue's RTX 3090 goals."""

# Shape legend: L MoE layers, E experts, S slots

import pytest

from specmoe.runtime.capacity import resolve_capacity
from specmoe.sim.bounds import memory_plan
from specmoe.sim.hardware import HardwareProfile
from specmoe.sim.shapes import ModelShape

RTX3090 = HardwareProfile.from_name("rtx3090")


@pytest.mark.parametrize("name,scheme,at_least", [
    ("mixtral-8x7b", "int4-g128", 0.8), ("deepseek-v2-lite", "int4", 1.0), ("qwen1.5-moe-a2.7b", "int4", 1.0),
    ("deepseek-v2-lite", "int4-g128", 1.0), ("qwen1.5-moe-a2.7b", "int4-g128", 1.0)])
def test_compressed_models_fit_an_rtx3090(name, scheme, at_least):
    bf16 = memory_plan(ModelShape.from_name(name), RTX3090)
    plan = memory_plan(ModelShape.from_name(name).compressed(scheme), RTX3090)
    assert plan["max_capacity"] >= at_least > bf16["max_capacity"]
    assert plan["slot_bytes"] * 3.4 < plan["uncompressed_slot_bytes"] == bf16["slot_bytes"]
    fits = {row["capacity"]: row["fits"] for row in plan["wrapped"]}
    assert all(fits[c] == (c <= plan["max_capacity"]) for c in fits)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "olmoe-1b-7b", "qwen3-30b-a3b"])
def test_a_budget_buys_about_3_5x_more_int4_experts(name):
    shape = ModelShape.from_name(name)
    L, E = shape.moe_layers, shape.num_experts
    budget = "2GiB"
    bf16 = resolve_capacity(budget, L, E, shape.slot_bytes)
    int4 = resolve_capacity(budget, L, E, shape.compressed("int4-g128").slot_bytes)
    int8 = resolve_capacity(budget, L, E, shape.compressed("int8").slot_bytes)
    assert 3.4 <= int4 / bf16 <= 3.9 and 1.9 <= int8 / bf16 <= 2.01


def test_compressed_slot_is_what_a_copy_moves():
    shape = ModelShape.from_name("mixtral-8x7b")
    for scheme in ("int8", "int4", "int4-g128"):
        c = shape.compressed(scheme)
        assert c.transfer_bytes == c.slot_bytes < c.uncompressed_slot_bytes == shape.slot_bytes
        assert c.to_dict()["uncompressed_slot_bytes"] == shape.slot_bytes

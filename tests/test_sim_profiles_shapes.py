"""Hardware profiles and model shapes: validation, presets, and parameter arithmetic against live models."""

import dataclasses

import pytest
from conftest import build_tiny
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

from specmoe.runtime.adapters import find_moe_layers
from specmoe.runtime.store import ExpertLayout
from specmoe.sim.bounds import memory_plan
from specmoe.sim.hardware import GB, PROFILES, HardwareProfile
from specmoe.sim.shapes import PRESETS, ModelShape


def test_profiles_have_sources_and_sane_numbers():
    assert {"rtx3090", "rtx4090", "a6000", "h100", "h200"} <= set(PROFILES)
    for p in PROFILES.values():
        assert "sheet" in p.source or "whitepaper" in p.source, p.name
        assert p.h2d_bytes_per_s < p.memory_bytes_per_s
    p = HardwareProfile.from_name("RTX-3090")
    assert p.memory_bytes == 24 * 2**30 and p.h2d_bytes_per_s == 24 * GB and p.memory_bytes_per_s == 936.2 * GB


@pytest.mark.parametrize("bad", [dict(memory_bytes=0), dict(h2d_bytes_per_s=-1.0), dict(bf16_flops=float("nan")),
                                 dict(h2d_bytes_per_s=2e15), dict(name=""), dict(copy_latency_s=1.0)])
def test_profile_validation(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(PROFILES["rtx3090"], **bad)


def test_profile_lookup_errors_and_device_names():
    with pytest.raises(ValueError, match="rtx3090"):
        HardwareProfile.from_name("tpu-v9")
    assert HardwareProfile.for_device_name("NVIDIA H100 80GB HBM3").name == "h100"
    assert HardwareProfile.for_device_name("NVIDIA H100 PCIe").name == "h100-pcie"
    assert HardwareProfile.for_device_name("NVIDIA H200").name == "h200"
    with pytest.raises(ValueError):
        HardwareProfile.for_device_name("NVIDIA A100-SXM4-80GB")


def test_qwen15_expert_bytes_by_hand():
    s = ModelShape.from_name("qwen1.5-moe-a2.7b")
    # config.json: hidden_size 2048, moe_intermediate_size 1408, bf16; an expert is gate+up [2*1408, 2048]
    # and down [2048, 1408]: 3 * 2048 * 1408 values of 2 bytes.
    assert s.expert_bytes == 3 * 2048 * 1408 * 2 == 17_301_504
    assert (s.moe_layers, s.num_experts, s.top_k) == (24, 60, 4)
    assert s.routed_expert_bytes == 24 * 60 * 17_301_504
    assert s.slot_bytes == s.expert_bytes  # both tensors' sizes are multiples of 256 B
    assert 14.2e9 < s.total_params < 14.4e9  # "14.3B parameters in total" (model card)
    assert 2.6e9 < s.active_params < 2.8e9  # "2.7B activated"


@pytest.mark.parametrize("name,total_b", [("mixtral-8x7b", 46.7), ("olmoe-1b-7b", 6.9), ("qwen3-30b-a3b", 30.5),
                                          ("deepseek-v2-lite", 15.7), ("gpt-oss-20b", 20.9)])
def test_presets_match_published_totals(name, total_b):
    assert abs(ModelShape.from_name(name).total_params / 1e9 - total_b) < 0.1


def test_mxfp4_experts_are_about_a_quarter_of_bf16():
    q, b = ModelShape.from_name("gpt-oss-20b"), ModelShape.from_name("gpt-oss-20b", expert_dtype="bf16")
    assert q.expert_params == b.expert_params
    assert 0.25 < q.expert_bytes / b.expert_bytes < 0.3  # 4.25 bits per value + bf16 biases


def tiny_deepseek_v2():
    cfg = AutoConfig.for_model(
        "deepseek_v2", hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, vocab_size=96, n_group=1, topk_group=1)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe", "qwen3_moe", "gpt_oss", "deepseek_v2"])
def test_counts_equal_live_models(family):
    model = tiny_deepseek_v2() if family == "deepseek_v2" else build_tiny(family)
    shape = ModelShape.from_config(model.config, dtype="fp32", expert_dtype="fp32")
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    moe = find_moe_layers(model)
    assert shape.geometry == moe.geometry
    assert shape.slot_bytes == ExpertLayout(moe.specs).nbytes  # the runtime's slot size


def test_defaults_of_transformers_configs_are_the_published_models():
    for config, name in ((Qwen2MoeConfig(), "qwen1.5-moe-a2.7b"), (MixtralConfig(), "mixtral-8x7b")):
        a, b = ModelShape.from_config(config), ModelShape.from_name(name)
        assert (a.total_params, a.active_params, a.slot_bytes, a.geometry) == \
            (b.total_params, b.active_params, b.slot_bytes, b.geometry)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_config_round_trip(name):
    shape = ModelShape.from_name(name)
    again = ModelShape.from_config(shape.to_config(), expert_dtype=shape.expert_dtype)
    assert again.total_params == shape.total_params and again.geometry == shape.geometry


def test_shape_errors():
    with pytest.raises(ValueError, match="qwen1.5-moe-a2.7b"):
        ModelShape.from_name("llama-3-8b")
    with pytest.raises(ValueError, match="model_type"):
        ModelShape.from_config({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(ModelShape.from_name("olmoe-1b-7b"), top_k=65)


def test_memory_plan_rtx3090_qwen():
    shape, p = ModelShape.from_name("qwen1.5-moe-a2.7b"), PROFILES["rtx3090"]
    plan = memory_plan(shape, p, capacities=(0.25, 1.0))
    assert not plan["unwrapped_fits"]  # 28.6 GB of bf16 weights
    assert plan["wrapped"][0]["fits"] and not plan["wrapped"][1]["fits"]
    slots = plan["max_slots"]
    used = shape.nonexpert_bytes + slots * shape.slot_bytes + plan["kv_bytes"] + plan["reserve_bytes"]
    assert used <= p.memory_bytes < used + shape.slot_bytes
    assert 0.5 < plan["max_capacity"] < 1.0


def test_kv_bytes_sliding_window_caps_growth():
    s = ModelShape.from_name("gpt-oss-20b")
    assert s.kv_bytes(256) - s.kv_bytes(128) == 12 * 128 * s.kv_values_per_token * 2  # only the 12 full layers grow
    assert s.kv_bytes(0) == 0


def test_compressed_shape_transfer_bytes():
    shape = ModelShape.from_name("qwen1.5-moe-a2.7b")
    assert shape.transfer_bytes == shape.slot_bytes and shape.compression == "none"
    int8 = shape.compressed("int8")
    assert int8.name == "qwen1.5-moe-a2.7b+int8" and int8.uncompressed_slot_bytes == shape.slot_bytes
    assert int8.slot_bytes == int8.transfer_bytes  # slots hold the compressed expert
    assert 1.9 < shape.slot_bytes / int8.transfer_bytes < 2.0  # int8 codes + one fp16 scale per row
    assert 3.5 < shape.slot_bytes / shape.compressed("int4-g128").transfer_bytes < 4.0
    assert int8.compressed("none") == shape
    with pytest.raises(ValueError):
        shape.compressed("int3")

"""Any model's shape: config-derived shapes (formula or meta-device counts), published quantization, the six new
presets, `simulate --shape-config`, and traces of a geometry no preset has."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from specmoe.cli import main
from specmoe.runtime.adapters import find_moe_layers
from specmoe.runtime.store import ExpertLayout
from specmoe.sim.meta_shape import count_on_meta
from specmoe.sim.shapes import FAMILIES, ModelShape
from specmoe.sim.stream import RoutingStream

TINY = {
    "glm4_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=96, n_routed_experts=8,
                     num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=1, attention_bias=True,
                     use_qk_norm=True),
    "qwen3_next": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                       shared_expert_intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=96, num_experts=8, num_experts_per_tok=2,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=8),
    "llama4_text": dict(hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=96,
                        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2),
    "deepseek_v3": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16,
                        q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, vocab_size=96),
    # not in FAMILIES: counted on the meta device
    "granitemoe": dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96, num_local_experts=8, num_experts_per_tok=2),
    "phimoe": dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=96, num_local_experts=8, num_experts_per_tok=2),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=96,
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 8, "moe_top_k": 2}),
}


def tiny(model_type):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY[model_type]))


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_counts_equal_live_models(model_type):
    model = tiny(model_type)
    shape = ModelShape.from_config(model.config, dtype="fp32", expert_dtype="fp32")
    assert (model_type in FAMILIES) == (model_type not in ("granitemoe", "phimoe", "dbrx"))
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    moe = find_moe_layers(model)
    assert shape.geometry == moe.geometry
    assert shape.slot_bytes == ExpertLayout(moe.specs).nbytes


@pytest.mark.parametrize("model_type", ["glm4_moe", "qwen3_next", "deepseek_v3", "llama4_text"])
def test_formula_and_meta_counts_agree(model_type):
    values = AutoConfig.for_model(model_type, **TINY[model_type]).to_dict()
    formula = ModelShape.from_config(values, expert_dtype="bf16")
    meta = count_on_meta(values)
    assert meta["moe_layers"] == formula.moe_layers and meta["num_experts"] == formula.num_experts
    experts = formula.routed_expert_params
    assert (formula.total_params - experts) == (formula.nonexpert_params)
    meta_shape = ModelShape.from_config({**values, "model_type": model_type}, expert_dtype="bf16")
    assert meta_shape.total_params == formula.total_params


@pytest.mark.parametrize("name,published_b,tolerance", [
    ("gpt-oss-120b", 116.8, 0.1),  # model card: 116.8B total
    ("glm-4.5-air", 106.0, 1.0),  # 106B (model card)
    ("qwen3-235b-a22b", 235.0, 0.5),
    ("deepseek-v3", 671.0, 0.5),  # main model, MTP module apart (README_WEIGHTS.md)
    ("qwen3-next-80b-a3b", 80.0, 0.5),
    ("llama-4-scout", 107.8, 0.1),  # 109B with the vision encoder; its text model alone
])
def test_new_presets_match_published_totals(name, published_b, tolerance):
    shape = ModelShape.from_name(name)
    assert abs(shape.total_params / 1e9 - published_b) <= tolerance
    assert shape.source.startswith("https://huggingface.co/")


def test_published_quantization_is_read():
    oss, dsv3 = ModelShape.from_name("gpt-oss-120b"), ModelShape.from_name("deepseek-v3")
    assert oss.expert_dtype == "mxfp4" and dsv3.expert_dtype == "fp8-b128"
    # DeepSeek-V3 expert: gate_up [4096, 7168] + down [7168, 2048] e4m3, fp32 scale_inv per 128x128 block
    assert dsv3.expert_bytes == 4096 * 7168 + 32 * 56 * 4 + 7168 * 2048 + 56 * 16 * 4
    assert dsv3.expert_params == ModelShape.from_name("deepseek-v3", expert_dtype="bf16").expert_params
    # gpt-oss-120b on disk: ~61 GB as published, experts ~57 GiB of it
    assert 60e9 < oss.total_bytes < 66e9
    # GPTQ int4 (Qwen3-30B-A3B-GPTQ-Int4 style): qweight/qzeros/scales/g_idx per matrix, group 128
    cfg = dict(ModelShape.from_name("qwen3-30b-a3b").config,
               quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                    "sym": True, "checkpoint_format": "gptq"})
    gptq = ModelShape.from_config(cfg)
    assert gptq.expert_dtype == "gptq-int4-g128"

    def matrix(n, k, g=128):
        return (k // 8) * n * 4 + (k // g) * (n // 8) * 4 + (k // g) * n * 2 + k * 4

    assert gptq.expert_bytes == matrix(2 * 768, 2048) + matrix(2048, 768)
    assert gptq.expert_params == 3 * 2048 * 768
    with pytest.raises(ValueError, match="bitsandbytes"):
        ModelShape.from_config(dict(cfg, quantization_config={"quant_method": "bitsandbytes"}))
    with pytest.raises(ValueError, match="3 bits"):
        ModelShape.from_config(dict(cfg, quantization_config={"quant_method": "gptq", "bits": 3}))


def test_from_file_and_errors(tmp_path):
    path = tmp_path / "DeepSeek-V3" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(ModelShape.from_name("deepseek-v3").config))
    shape = ModelShape.from_file(path.parent)
    assert shape.name == "DeepSeek-V3" and shape.total_params == ModelShape.from_name("deepseek-v3").total_params
    with pytest.raises(FileNotFoundError):
        ModelShape.from_file(tmp_path / "nothing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON config"):
        ModelShape.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no MoE layers"):
        ModelShape.from_config(AutoConfig.for_model("llama", hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, vocab_size=32).to_dict())


def _stream(path, L, E, k, passes=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(passes * L)]).view(passes, L, k)
    RoutingStream.from_sequences(ids).save(path)
    return path


def test_simulate_any_geometry_and_shape_config(tmp_path, capsys):
    trace = _stream(tmp_path / "odd.safetensors", L=5, E=20, k=3)  # no preset has L=5 E=20 k=3
    common = ["--capacities", "0.5", "--policies", "lru", "--predictors", "none", "--warmup", "4",
              "--out", str(tmp_path)]
    assert main(["simulate", "--trace", str(trace), *common, "--name", "odd"]) == 0
    assert "replaying on qwen1.5-moe-a2.7b@L5-E20-k3" in capsys.readouterr().out
    runs = json.loads((tmp_path / "odd.json").read_text())["runs"]
    assert {r["shape"] for r in runs} == {"qwen1.5-moe-a2.7b@L5-E20-k3"}
    # a config.json of that geometry: the trace replays on it, its quantization read
    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                               num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                               vocab_size=1000, num_experts=20, num_experts_per_tok=3).to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert main(["simulate", "--trace", str(trace), "--shape-config", str(tmp_path / "m"), *common, "--name", "m"]) == 0
    out = json.loads((tmp_path / "m.json").read_text())
    assert {r["shape"] for r in out["runs"]} == {"m"}
    assert main(["simulate", "--trace", str(trace), "--shapes", "olmoe-1b-7b", *common]) == 2  # wrong geometry
    assert main(["simulate", "--shape-config", str(tmp_path / "none.json"), *common]) == 2

"""More families (issue 22 item 3): Llama-4 and DBRX wrapped with the unwrapped model's tokens, DeepSeek-V4's
experts found where they are (misses="auto" included), and the families specmoe refuses, each with its reason."""

import re

import pytest
import torch
from conftest import make_inputs
from transformers import AutoConfig, AutoModelForCausalLM

from specmoe import SpeculativeMoE
from specmoe.predictors import PreGatePredictor
from specmoe.runtime.adapters import UNSUPPORTED, find_moe_layers
from specmoe.traces import capture_routing

CONFIGS = {
    "llama4_text": dict(hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=96,
                        num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1,
                        attention_chunk_size=16),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=96,
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 8, "moe_top_k": 2}),
    "deepseek_v4": dict(hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=32, q_lora_rank=32, n_routed_experts=4,
                        num_experts_per_tok=2, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16,
                        index_topk=8, vocab_size=96, qk_rope_head_dim=8, hc_mult=4, sliding_window=8,
                        layer_types=["sliding_attention"] * 4),  # alike layers: once taken for experts
    "qwen3_next": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                       shared_expert_intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=96, num_experts=8, num_experts_per_tok=2,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=8),  # 3 Gated-DeltaNet layers, 1 full-attention layer
    "jetmoe": dict(hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
                   intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, vocab_size=96,
                   num_attention_heads=4),
    "zaya": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 moe_intermediate_size=32, num_experts=4, num_experts_per_tok=1, vocab_size=96,
                 router_hidden_size=32, layer_types=["hybrid", "hybrid"]),
    "longcat_flash": dict(hidden_size=64, num_layers=1, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=32,
                          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, ffn_hidden_size=96,
                          expert_ffn_hidden_size=32, n_routed_experts=4, zero_expert_num=2, moe_topk=2,
                          vocab_size=96),
}


def tiny(model_type, seed=0):
    cfg = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    cfg.pad_token_id, cfg.eos_token_id = 0, None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # decisive routing, as conftest.build_tiny does
        for name, p in model.named_parameters():
            if p.dim() == 2 and (".gate." in name or ".router." in name) and "experts" not in name:
                p.normal_(0, 0.5)
    return model


def greedy(call, inputs, n=5):
    with torch.no_grad():
        return call(**inputs, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("model_type", ["llama4_text", "dbrx", "deepseek_v4", "qwen3_next"])
@pytest.mark.parametrize("capacity,predictor", [(0.25, None), (0.5, "pregate")])
def test_wrapped_tokens_equal_unwrapped(model_type, capacity, predictor):
    model = tiny(model_type)
    moe = find_moe_layers(model)
    inputs = make_inputs(model, batch=2, length=6)
    ref = greedy(model.generate, inputs)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    params = {n: p.clone() for n, p in model.named_parameters()}
    classes = [type(m) for m in model.modules()]
    smoe = SpeculativeMoE(model, PreGatePredictor(lookahead=1) if predictor else None, cache_capacity=capacity)
    tokens = greedy(smoe.generate, inputs)
    with torch.no_grad():
        logits = smoe(**inputs).logits
    stats = smoe.stats
    smoe.unwrap()
    assert torch.equal(tokens, ref)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    assert stats.total.misses > 0 and stats.total.hits + stats.total.misses > 0
    assert [type(m) for m in model.modules()] == classes  # Llama-4's swapped classes are back
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert moe.geometry.num_layers == find_moe_layers(model).geometry.num_layers


def test_deepseek_v4_experts_where_they_are_and_auto_misses():
    model = tiny("deepseek_v4")
    moe = find_moe_layers(model)
    assert [layer.name for layer in moe.layers] == [f"model.layers.{i}.mlp.experts" for i in range(4)]
    assert (moe.geometry.num_experts, moe.geometry.top_k, moe.geometry.hidden_size) == (4, 2, 64)
    inputs = make_inputs(model, batch=1, length=6)
    ref = greedy(model.generate, inputs)
    smoe = SpeculativeMoE(model, None, cache_capacity=0.25, misses="auto")
    assert torch.equal(greedy(smoe.generate, inputs), ref)
    smoe.unwrap()


def test_llama4_routing_capture_reads_the_dense_call():
    model = tiny("llama4_text")
    inputs = make_inputs(model, batch=1, length=5)
    chosen = []
    handles = [layer.feed_forward.router.register_forward_hook(lambda m, a, out: chosen.append(out[1].argmax(-1)))
               for layer in model.model.layers]
    with capture_routing(model) as cap, torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    ids = cap.passes[0].ids  # [T, L, k]
    assert ids.shape == (5, 4, 1) and torch.equal(ids[:, :, 0], torch.stack(chosen[-4:], 1))  # (find_moe_layers probes too)


@pytest.mark.parametrize("model_type", ["jetmoe", "zaya", "longcat_flash"])
def test_refused_with_reason(model_type):
    model = tiny(model_type)
    with pytest.raises(TypeError, match=re.escape("cannot be offloaded by specmoe: " + UNSUPPORTED[model_type])):
        SpeculativeMoE(model, None, cache_capacity=0.5)


def test_readme_lists_what_the_tests_check():
    from pathlib import Path

    from conftest import FAMILIES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    supported = readme[readme.index("Supported: every transformers"):readme.index("Refused, with")]
    refused = readme[readme.index("Refused, with"):readme.index("runtime.adapters.UNSUPPORTED")]
    names = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "olmoe": "OLMoE",
             "deepseek_v3": "DeepSeek-V3", "gpt_oss": "GPT-OSS", "granitemoe": "Granite-MoE", "phimoe": "PhiMoE",
             "switch_transformers": "SwitchTransformers", "llama4_text": "Llama-4", "dbrx": "DBRX",
             "deepseek_v4": "DeepSeek-V4", "qwen3_next": "Qwen3-Next"}
    tested = set(FAMILIES) | {"llama4_text", "dbrx", "deepseek_v4", "qwen3_next"}  # test_wrapper's and this file's
    assert tested == set(names)
    assert all(names[f] in supported for f in tested)
    assert {"JetMoE", "Zaya", "LongCat-Flash"} <= set(refused.replace(",", " ").split())
    assert set(UNSUPPORTED) == {"jetmoe", "zaya", "longcat_flash"}

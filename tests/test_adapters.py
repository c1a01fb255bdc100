import pytest
import torch
from conftest import FAMILIES, build_tiny
from transformers import LlamaConfig, LlamaForCausalLM

from specmoe.runtime.adapters import FusedExperts, ModuleListExperts, find_moe_layers

EXPECTED = {  # family -> (MoE layers, experts, top-k, layout)
    "mixtral": (2, 8, 2, FusedExperts),
    "qwen2_moe": (2, 8, 2, FusedExperts),
    "qwen3_moe": (2, 8, 2, FusedExperts),
    "olmoe": (2, 8, 2, FusedExperts),
    "deepseek_v3": (2, 8, 2, FusedExperts),  # 3 decoder layers, the first dense
    "gpt_oss": (2, 8, 2, FusedExperts),
    "granitemoe": (2, 8, 2, FusedExperts),
    "phimoe": (2, 8, 2, FusedExperts),
    "switch_transformers": (4, 8, 1, ModuleListExperts),  # 2 encoder + 2 decoder
}


def test_every_family_is_listed():
    assert set(EXPECTED) == set(FAMILIES)


def test_geometry_and_layout(family):
    model = build_tiny(family)
    moe = find_moe_layers(model)
    L, E, k, layout = EXPECTED[family]
    assert (moe.geometry.num_layers, moe.geometry.num_experts, moe.geometry.top_k) == (L, E, k)
    assert moe.geometry.hidden_size == 64
    assert all(isinstance(layer.layout, layout) for layer in moe.layers)
    assert [layer.index for layer in moe.layers] == list(range(L))
    # every expert tensor of expert 3 is found and has the per-expert shape of the specs
    t = moe.layers[0].layout.expert_tensors(moe.layers[0].experts, 3)
    assert {s.name: s.shape for s in moe.specs} == {n: tuple(v.shape) for n, v in t.items()}
    assert moe.first_decode_layer == (2 if family == "switch_transformers" else 0)


def test_router_weights_score_like_the_router(family):
    """The router weights we hand to predictors give the router's own top-k."""
    model = build_tiny(family)
    moe = find_moe_layers(model)
    layer = moe.layers[0]
    seen = {}
    handle = layer.experts.register_forward_pre_hook(
        lambda m, a, kw: seen.update(zip(("h", "ids", "w"), layer.layout.routing(m, a, kw, moe.geometry.top_k))),
        with_kwargs=True,
    )
    ids = torch.randint(2, 90, (1, 12))
    kwargs = {"decoder_input_ids": ids[:, :3]} if family == "switch_transformers" else {}
    with torch.no_grad():
        model(input_ids=ids, **kwargs)
    handle.remove()
    logits = layer.router.logits(seen["h"])  # [T, E]
    if family == "deepseek_v3":  # sigmoid + group-limited routing: compare the chosen set's mean score instead
        assert logits.gather(1, seen["ids"]).mean() > logits.mean()
        return
    ours = logits.topk(moe.geometry.top_k, dim=-1).indices.sort(-1).values
    routed = seen["ids"].sort(-1).values
    kept = routed >= 0  # Switch drops tokens over capacity
    assert torch.equal(ours[kept.all(-1)], routed[kept.all(-1)])


def test_dense_model_is_refused_with_the_supported_list():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64))
    with pytest.raises(TypeError, match="Mixtral.*SwitchTransformers"):
        find_moe_layers(model)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        find_moe_layers("mixtral")

"""GPU-only checks: pinned store, copy streams and events, device memory, overlap. Skipped without CUDA."""

import pytest
import torch
from conftest import build_tiny, make_inputs
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from specmoe import SpeculativeMoE, load_offloaded
from specmoe.predictors import OraclePredictor, PreGatePredictor
from specmoe.runtime.adapters import find_moe_layers
from specmoe.traces import capture_routing

pytestmark = pytest.mark.gpu


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3", "switch_transformers"])
@pytest.mark.parametrize("compute", ["pool", "gather"])
def test_cuda_same_tokens(family, compute):
    model = build_tiny(family).cuda()
    inputs = {k: v.cuda() for k, v in make_inputs(model, batch=3, left_pad=True).items()}
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    smoe = SpeculativeMoE(model, PreGatePredictor(lookahead=2), cache_capacity=0.25, compute=compute)
    with torch.no_grad():
        out = smoe.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)
    assert smoe.engine.kind == "cuda"
    smoe.unwrap()


def test_store_is_pinned_and_copies_use_their_own_streams():
    model = build_tiny("qwen2_moe")  # on the CPU: wrapping moves non-experts to the GPU
    smoe = SpeculativeMoE(model, cache_capacity=0.5, device="cuda")
    assert smoe.store.pinned and smoe.store.arena.is_pinned()
    compute = torch.cuda.current_stream()
    assert smoe.engine.demand_stream != compute and smoe.engine.prefetch_stream != compute
    assert all(p.device.type == "cuda" for p in model.parameters())
    smoe.unwrap()
    assert all(p.device.type == "cpu" for p in model.parameters())  # back where they were
    assert not smoe.store.pinned


def test_device_holds_only_non_experts_and_slots():
    torch.cuda.empty_cache()
    model = build_tiny("mixtral")
    total = nbytes(model.parameters()) + nbytes(model.buffers())
    experts = nbytes(p for layer in find_moe_layers(model).layers for p in layer.experts.parameters())
    before = torch.cuda.memory_allocated()
    smoe = SpeculativeMoE(model, cache_capacity=0.25, device="cuda")
    used = torch.cuda.memory_allocated() - before
    assert smoe.device == torch.device("cuda", torch.cuda.current_device())  # indexed, as the weights' device
    mem = smoe.memory()
    assert mem["nonexpert_bytes"] == total - experts
    assert used >= mem["nonexpert_bytes"] + mem["cache_bytes"]
    assert used <= mem["nonexpert_bytes"] + mem["cache_bytes"] + 64 * 1024  # + the [L, E] table, allocator slack
    assert used < total - experts / 2
    smoe.unwrap()


def test_load_offloaded_never_puts_the_whole_model_on_the_device(tmp_path):
    model = build_tiny("qwen2_moe")
    model.save_pretrained(tmp_path)
    total = nbytes(model.parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    smoe = load_offloaded(tmp_path, device="cuda", cache_capacity=0.25)
    assert torch.cuda.max_memory_allocated() - base < total
    assert smoe.store.pinned


def big_model():
    """Experts large enough that copies take measurable time next to compute."""
    cfg = Qwen2MoeConfig(vocab_size=512, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=1024,
                         shared_expert_intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=8, num_experts=16, num_experts_per_tok=2, decoder_sparse_step=1,
                         mlp_only_layers=[], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    return model


def test_prefetch_overlaps_copies_with_compute():
    """Replaying the routing one layer ahead, compute waits far less for copies than on demand alone."""
    model = big_model().cuda()  # bf16 kernels round differently per device: the reference runs on the GPU too
    inputs = {"input_ids": torch.randint(0, 512, (1, 16), device="cuda")}
    with capture_routing(model) as cap, torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    stall = {}
    for name, pred in (("none", None), ("oracle", OraclePredictor([p.ids for p in cap.passes], lookahead=2))):
        smoe = SpeculativeMoE(model, pred, cache_capacity=0.3)  # on the model's device
        with torch.no_grad():
            out = smoe.generate(**inputs, max_new_tokens=16, do_sample=False)
        assert torch.equal(out, ref)
        s = smoe.stats
        stall[name] = s.stall_s
        if pred is not None:
            assert s.total.prefetch_used > 0
        smoe.unwrap()  # experts back on the GPU, where they were
    assert stall["oracle"] < 0.5 * stall["none"], stall

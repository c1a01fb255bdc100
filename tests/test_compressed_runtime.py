"""Compressed slots: the pool holds experts compressed, the fused kernel reads them (interpreted on CPU), the
fallback dequantizes routed slots into a scratch, capacity and memory count compressed bytes, and a wrapped
compressed model gives the greedy tokens of the same model with its experts quantize-dequantized."""

# Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k, S slots

import contextlib
import logging

import pytest
import torch
from conftest import build_tiny, make_inputs

from specmoe import SpeculativeMoE
from specmoe.kernels import (MoEKernelConfig, QuantFormat, QuantizedStack, experts_reference, fake_quantize,
                             fused_experts, moe_experts, quantize)
from specmoe.kernels.jit import triton_runs_on
from specmoe.predictors.oracle import RandomPredictor
from specmoe.predictors.pregate import PreGatePredictor
from specmoe.runtime.adapters import find_moe_layers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton cannot run here")
# interpreter: bfloat16 rounds by truncation (a 1-ulp difference can cross into the output); fp16 / fp32 tight
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}


def compressed_problem(T, k, H, I, fmt, dtype, E=6, S=5, seed=0):
    """Routing and a compressed pool: S slots of quantized gate_up [2I, H] and down [H, I] as QuantizedStacks
    strided over S (each part a view into one [S, ...] buffer, as a slot pool's views are)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(S, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(S, H, I, generator=g) / I**0.5

    def stack(w):
        parts = [quantize(w[s], fmt) for s in range(S)]
        stacked = {sfx: torch.stack([p[sfx] for p in parts]) for sfx in parts[0]}
        padded = {sfx: torch.cat([t, torch.zeros_like(t[..., :1]).expand(*t.shape[:-1], 3)], -1)[..., : t.shape[-1]]
                  for sfx, t in stacked.items()}  # views with a row stride != width
        return QuantizedStack.from_parts({s: v.to(DEVICE) for s, v in padded.items()}, fmt, tuple(w.shape[1:]), dtype)

    table = torch.randperm(E, generator=g) % S
    table[E - 1] = -1  # one absent expert contributes nothing
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    return tuple(t.to(DEVICE) for t in (hidden, ids, weights)) + (stack(w1), stack(w2), table.to(DEVICE))


DECODE = MoEKernelConfig(block_t=1, block_k=32, block_i=16, block_h=32)
PREFILL = MoEKernelConfig(block_t=16, block_k=32, block_i=16, block_h=32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt,T,k,H,I,config", [
    (QuantFormat("int8"), 1, 2, 40, 24, DECODE), (QuantFormat("int4", 16), 3, 2, 40, 24, DECODE),
    (QuantFormat("int4", 32), 5, 1, 72, 40, DECODE), (QuantFormat("int4", 16), 17, 2, 40, 24, PREFILL),
    (QuantFormat("int8"), 9, 3, 72, 40, PREFILL)], ids=lambda x: str(x) if isinstance(x, QuantFormat) else None)
def test_compressed_kernel_matches_reference(fmt, T, k, H, I, config, dtype):
    """Odd H and I (not multiples of the group, K padded for int4), decode and prefill paths, two dtypes."""
    p = compressed_problem(T, k, H, I, fmt, dtype, seed=T)
    out = fused_experts(*p, "silu", config)
    ref = experts_reference(*p)
    gate_up, down = p[3], p[4]
    plain = experts_reference(*p[:3], gate_up.dequantize(), down.dequantize(), p[5])  # dequantize all first
    assert torch.equal(ref, plain)  # the reference dequantizes routed slots only, with the same math
    assert out.shape == (T, H) and out.dtype == dtype and ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_without_triton_the_compressed_reference_runs(monkeypatch):
    import specmoe.kernels.experts_kernel as ek

    monkeypatch.setattr(ek, "triton_runs_on", lambda device: False)
    p = compressed_problem(2, 2, 40, 24, QuantFormat("int4", 16), torch.float32)
    assert torch.equal(moe_experts(*p), experts_reference(*p))


def test_compressed_inputs_are_checked():
    p = list(compressed_problem(2, 2, 40, 24, QuantFormat("int8"), torch.float32))
    with pytest.raises(ValueError, match="both be compressed"):
        moe_experts(*p[:4], p[3].dequantize(), p[5])
    with pytest.raises(ValueError, match="qscale"):
        QuantizedStack(QuantFormat("int8"), (48, 40), torch.float32, p[3].qweight, p[3].qscale[:, :3])


def fake_quantized(model, fmt):
    moe = find_moe_layers(model)
    with torch.no_grad():
        for layer in moe.layers:
            for e in range(moe.geometry.num_experts):
                for t in layer.layout.expert_tensors(layer.experts, e).values():
                    if t.dim() == 2:
                        t.copy_(fake_quantize(t, fmt))
    return model


PREDICTORS = {"none": lambda: None, "pregate": lambda: PreGatePredictor(lookahead=2),
              "random": lambda: RandomPredictor(seed=3, lookahead=2)}  # mostly right / mostly wrong guesses


@pytest.mark.parametrize("family,scheme,capacity,predictor,compute,transfer", [
    ("mixtral", "int8", 0.5, "pregate", "gather", None),
    ("qwen2_moe", "int4", 0.25, "random", "auto", "thread"),
    ("gpt_oss", "int4", 0.5, "none", "triton", None),  # the kernel does not apply: dequantized scratch
    ("switch_transformers", "int8", 0.5, "random", "auto", None),  # ModuleList experts
    ("deepseek_v3", "int4-g16", 2, "pregate", "gather", None),  # 1 slot per layer: chunked calls
    ("olmoe", "int4", 0.5, "random", "triton", None),  # the fused kernel reads compressed slots
    ("mixtral", "int4-g16", 3, "pregate", "triton", None),  # kernel + chunks
])
def test_compressed_model_equals_dequantized_model(family, scheme, capacity, predictor, compute, transfer):
    kernel = compute == "triton" and family != "gpt_oss"
    if compute == "triton" and not triton_runs_on(DEVICE):
        pytest.skip("Triton cannot run here")
    fmt = QuantFormat.parse(scheme)
    model = build_tiny(family)
    reference = fake_quantized(build_tiny(family), fmt)
    original = build_tiny(family)
    inputs = make_inputs(model, batch=2, length=6, left_pad=True)
    new = 2 if kernel else 4
    extra = {"decoder_input_ids": inputs["input_ids"][:, :3]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        want_tokens = reference.generate(**inputs, max_new_tokens=new, do_sample=False)
        want_logits = reference(**inputs, **extra).logits
        orig_logits = original(**inputs, **extra).logits

    smoe = SpeculativeMoE(model, PREDICTORS[predictor](), cache_capacity=capacity, compression=scheme,
                          transfer=transfer, compute=compute)
    assert smoe.pool.compressed and smoe.experts_compute.model_compute == "gather"
    with torch.no_grad():
        tokens = smoe.generate(**inputs, max_new_tokens=new, do_sample=False)
        logits = smoe(**inputs, **extra).logits
    stats, memory = smoe.stats, smoe.memory()
    with pytest.warns(UserWarning, match="dequantized"):
        smoe.unwrap()

    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=2e-5 if not kernel else 1e-4, rtol=1e-4)
    assert (logits - orig_logits).abs().max() > 1e-4  # compression did change the numerics
    swaps = stats.total.misses + stats.total.prefetch_issued
    assert swaps > 0 and stats.total.bytes_moved == swaps * memory["host_expert_bytes"]
    assert memory["slot_bytes"] == memory["host_expert_bytes"] and memory["expert_bytes"] > 3 * memory["slot_bytes"]
    assert memory["cache_bytes"] == memory["num_slots"] * memory["slot_bytes"]  # the pool is compressed
    if isinstance(capacity, int):
        assert stats.chunked_calls > 0  # more distinct experts than slots: computed in chunks
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(got, want), name  # unwrap gives back the dequantized experts (and warned)


def test_a_budget_buys_more_compressed_experts():
    """The same budget: slots = budget // compressed slot bytes. Tiny experts (H=64) carry more scale and
    padding overhead than real ones (3.5-3.8x for int4, see test_sim_memory_plan_counts_compressed_slots)."""
    counts = {}
    for scheme in ("none", "int8", "int4"):
        model = build_tiny("mixtral", dtype=torch.bfloat16)
        budget = 4 * 36 * 1024  # 4 bf16 experts of 2*96*64 + 64*96 values (of 16)
        smoe = SpeculativeMoE(model, None, cache_capacity=f"{budget}B", compression=None if scheme == "none" else scheme)
        mem = smoe.memory()
        assert smoe.num_slots == budget // mem["slot_bytes"] and mem["cache_bytes"] <= budget
        counts[scheme] = smoe.num_slots
        with contextlib.suppress(Warning), pytest.warns(UserWarning) if scheme != "none" else contextlib.nullcontext():
            smoe.unwrap()
    assert counts == {"none": 4, "int8": 7, "int4": 12}


def test_fallback_says_why_once(caplog):
    model = build_tiny("mixtral")
    with caplog.at_level(logging.INFO, logger="specmoe.runtime.compute"):
        smoe = SpeculativeMoE(model, None, compression="int8", compute="pool", device="cpu")
    assert smoe.experts_compute.model_compute == "gather"
    assert caplog.text.count("cannot run the model's experts on compressed slots") == 1
    with pytest.warns(UserWarning):
        smoe.unwrap()


@needs_triton
def test_kernel_fallback_for_unsupported_layers_says_why(caplog):
    model = build_tiny("gpt_oss")  # transposed experts with biases: the kernel does not apply
    with caplog.at_level(logging.INFO, logger="specmoe.runtime.compute"):
        smoe = SpeculativeMoE(model, None, compression="int4", compute="triton")
    assert smoe.experts_compute.kernel.activation == {}
    lines = [r.getMessage() for r in caplog.records if "does not support it" in r.getMessage()]
    assert len(lines) == 2 and all("dequantized into a scratch" in line for line in lines)  # one per MoE layer
    with pytest.warns(UserWarning):
        smoe.unwrap()

"""The fused experts kernel reads the publishers' formats in the slots (issue 22): MXFP4, block-scaled FP8, GPTQ
int4 (act-order too) and AWQ int4 slot pools, dequantized in registers, against the reference dequantize +
matmul (interpreted on CPU: tiny shapes); the runtime chooses it for such slots and says so (`kernel_name`)."""

# Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k, S slots

import pytest
import torch
from prequant_ckpt import act_order_g_idx, write_checkpoint

from specmoe import SpeculativeMoE, load_offloaded
from specmoe.kernels import MoEKernelConfig, experts_reference, fused_experts, moe_experts
from specmoe.kernels.jit import triton_runs_on
from specmoe.kernels.prequant import PrequantFormat, PrequantStack, quantize, quantize_gptq
from specmoe.runtime.adapters import ExpertTensorSpec
from specmoe.runtime.compression import PrequantCodec
from specmoe.runtime.store import ExpertLayout

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton cannot run here")
# the interpreter rounds float32 -> bfloat16 by truncation: one ulp of a dequantized weight can cross into the output
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}
DECODE = MoEKernelConfig(block_t=1, block_k=32, block_i=16, block_h=32)
PREFILL = MoEKernelConfig(block_t=16, block_k=32, block_i=16, block_h=32)


def prequant_problem(fmt: str, T, k, H, I, dtype, act_order=False, E=6, S=4, seed=0):
    """Routing and a slot pool [S, Bc] in a publisher's layout (`PrequantCodec`), read through its views as
    `PrequantStack`s, exactly as the runtime's pool is."""
    g = torch.Generator().manual_seed(seed)
    fmt = PrequantFormat.parse(fmt)
    specs = (ExpertTensorSpec("gate_up_proj", (2 * I, H), dtype), ExpertTensorSpec("down_proj", (H, I), dtype))
    codec = PrequantCodec(ExpertLayout(specs), fmt)
    data = torch.zeros(S, codec.layout.nbytes, dtype=torch.uint8)
    for s in range(S):
        parts = {}
        for name, (n, kk) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
            w = torch.randn(n, kk, generator=g) / kk**0.5
            q = quantize_gptq(w, fmt.block, act_order_g_idx(kk, fmt.block, g)) if act_order else quantize(w, fmt)
            parts.update({name + sfx: t for sfx, t in q.items()})
        codec.layout.pack(data[s], parts)
    weights = codec.weights(codec.layout.views(data.to(DEVICE)))
    table = torch.randperm(E, generator=g) % S
    table[E - 1] = -1  # one absent expert contributes nothing
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    rw = torch.rand(T, k, generator=g)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    return tuple(t.to(DEVICE) for t in (hidden, ids, rw)) + (weights["gate_up_proj"], weights["down_proj"],
                                                             table.to(DEVICE))


CASES = [  # (format, act-order, T, k, H, I, config): K multiples of each format's block; FP8 blocks partial
    ("mxfp4", False, 1, 2, 64, 32, DECODE), ("mxfp4", False, 17, 2, 64, 32, PREFILL),
    ("fp8-b16", False, 3, 2, 40, 24, DECODE), ("fp8-b16", False, 17, 2, 40, 24, PREFILL),
    ("gptq-int4-g16", False, 2, 2, 48, 32, DECODE), ("gptq-int4-g16", True, 17, 2, 48, 32, PREFILL),
    ("gptq-int4-g16", True, 1, 1, 48, 32, DECODE),
    ("awq-int4-g16", False, 2, 2, 48, 32, DECODE), ("awq-int4-g16", False, 17, 3, 48, 32, PREFILL)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt,act_order,T,k,H,I,config", CASES,
                         ids=lambda x: x if isinstance(x, str) else "act" if x is True else None)
def test_kernel_reads_the_published_slots(fmt, act_order, T, k, H, I, config, dtype, monkeypatch):
    p = prequant_problem(fmt, T, k, H, I, dtype, act_order, seed=T + k)
    gate_up, down = p[3], p[4]
    assert isinstance(gate_up, PrequantStack) and str(gate_up.fmt) == fmt
    ref = experts_reference(*p)  # dequantizes the routed slots, then matmuls
    plain = experts_reference(*p[:3], gate_up.dequantize(), down.dequantize(), p[5])  # dequantize all first
    assert torch.equal(ref, plain) and ref.abs().max() > 0.1
    with monkeypatch.context() as mp:  # the kernel never asks for a dequantized copy: it reads the parts
        mp.setattr(PrequantStack, "dequantize", lambda *a, **kw: pytest.fail("dequantized outside the kernel"))
        out = fused_experts(*p, "silu", config)
    assert out.shape == (T, H) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_kernel_checks_prequant_stacks():
    p = prequant_problem("gptq-int4-g16", 2, 2, 48, 32, torch.float32)
    other = prequant_problem("awq-int4-g16", 2, 2, 48, 32, torch.float32)
    with pytest.raises(ValueError, match="share one compression format"):
        moe_experts(*p[:3], p[3], other[4], p[5])
    with pytest.raises(ValueError, match="both pre-quantized"):
        moe_experts(*p[:3], p[3], p[4].dequantize(), p[5])
    with pytest.raises(ValueError, match=r"qweight.*int32"):
        PrequantStack(p[3].fmt, p[3].shape, torch.float32, {**p[3].parts, ".qweight": p[3].parts[".qweight"].float()})


def test_without_triton_the_prequant_reference_runs(monkeypatch):
    import specmoe.kernels.experts_kernel as ek

    monkeypatch.setattr(ek, "triton_runs_on", lambda device: False)
    p = prequant_problem("fp8-b16", 2, 2, 40, 24, torch.float32)
    assert torch.equal(moe_experts(*p), experts_reference(*p))


@needs_triton
def test_runtime_chooses_the_kernel_for_published_slots(tmp_path):
    """An AWQ checkpoint loaded with compute="triton": the kernel computes every MoE layer from its slots, which
    hold AWQ's experts in GPTQ's layout (converted without loss at load; the name says so), and gives the
    tokens of the model with its experts dequantized; compute="auto" on a CPU runs the model's implementation
    on a dequantized scratch, and says that."""
    from prequant_ckpt import dequantized_reference

    path = write_checkpoint("awq", tmp_path / "awq")
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        want = dequantized_reference("awq", path).generate(ids, max_new_tokens=2, do_sample=False)
    smoe = load_offloaded(path, cache_capacity=0.5, device=DEVICE, compute="triton")
    names = {smoe.experts_compute.kernel_name(layer) for layer in smoe.moe.layers}
    assert names == {"triton-fused-gptq-int4-g32"}
    with torch.no_grad():
        assert torch.equal(smoe.generate(ids.to(DEVICE), max_new_tokens=2, do_sample=False).cpu(), want)
    if DEVICE.type == "cpu":
        auto = load_offloaded(path, cache_capacity=0.5, device="cpu")
        assert {auto.experts_compute.kernel_name(layer) for layer in auto.moe.layers} == {
            "gather-dequantized-gptq-int4-g32"}


@needs_triton
def test_mxfp4_slots_of_a_model_the_kernel_computes():
    """compression="mxfp4" on a Qwen3-MoE model: MXFP4 slots, read by the kernel; on gpt-oss's experts
    (transposed, biases, clamped gate) too, with its gate, and the name says which."""
    from prequant_ckpt import tiny_model

    model = tiny_model("gptq", dtype=torch.bfloat16)  # Qwen3-MoE, H = I = 64: K a multiple of MXFP4's 32
    smoe = SpeculativeMoE(model, None, cache_capacity=0.5, compression="mxfp4", compute="triton", device=DEVICE)
    assert {smoe.experts_compute.kernel_name(layer) for layer in smoe.moe.layers} == {"triton-fused-mxfp4"}
    smoe.unwrap()
    gpt = SpeculativeMoE(tiny_model("mxfp4", dtype=torch.bfloat16), None, cache_capacity=0.5, compression="mxfp4", compute="triton",
                         device=DEVICE)
    assert {gpt.experts_compute.kernel_name(layer) for layer in gpt.moe.layers} == {"triton-fused-mxfp4-swiglu_oai"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["mxfp4", "fp8-b128", "gptq-int4-g128", "awq-int4-g128"])
@pytest.mark.parametrize("T,k,block_t", [(1, 4, 1), (100, 4, 16)])
def test_kernel_reads_published_slots_on_cuda_at_model_sizes(fmt, T, k, block_t):
    """Qwen1.5-MoE's expert sizes (H 2048, I 1408: FP8's last block is partial), compiled, bf16."""
    p = prequant_problem(fmt, T, k, 2048, 1408, torch.bfloat16, act_order=fmt.startswith("gptq"), E=8, S=6)
    cfg = MoEKernelConfig(block_t=block_t, block_k=64, block_i=64 if block_t > 1 else 32, block_h=64)
    out = fused_experts(*p, "silu", cfg)
    torch.testing.assert_close(out, experts_reference(*p), atol=6e-2, rtol=3e-2)

"""gpt-oss's own experts through the fused kernel (issue 22): gate_up transposed ([in, out]) with gate and up
columns interleaved, biases, the clamped SwiGLU with alpha and limit, read from slots in a publisher's format
(MXFP4 as gpt-oss ships it; FP8 / GPTQ as compression of a bf16 gpt-oss), with the biases added and the gate
computed in registers. Checked against the reference (dequantize + torch ops), the reference against
transformers' `GptOssExperts`, and the runtime on the tiny gpt-oss MXFP4 checkpoint (interpreted on CPU)."""

# Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k, S slots

import pytest
import torch
from prequant_ckpt import dequantized_reference, tiny_model, write_checkpoint

from specmoe import SpeculativeMoE, load_offloaded
from specmoe.kernels import MoEKernelConfig, experts_reference, fused_experts, moe_experts
from specmoe.kernels.jit import triton_runs_on
from specmoe.kernels.prequant import PrequantFormat, PrequantStack, quantize
from specmoe.runtime.adapters import ExpertTensorSpec
from specmoe.runtime.compression import PrequantCodec
from specmoe.runtime.store import ExpertLayout

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton cannot run here")
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}
DECODE = MoEKernelConfig(block_t=1, block_k=32, block_i=16, block_h=32)
PREFILL = MoEKernelConfig(block_t=16, block_k=32, block_i=16, block_h=32)
LIMIT = 0.7  # small enough that the clamps bind on these values (gpt-oss's is 7.0)


def oai_problem(fmt: str, T, k, H, I, dtype, E=6, S=4, seed=0):
    """A slot pool [S, Bc] of gpt-oss experts in a publisher's format, laid out as the runtime lays it out
    (`PrequantCodec(transposed=True)` of gpt-oss's [H, 2I] / [I, H] weights and [2I] / [H] biases), and routing.
    Returns (hidden, ids, weights, gate_up stack, down stack, table) and the gate's keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    specs = (ExpertTensorSpec("gate_up_proj", (H, 2 * I), dtype),
             ExpertTensorSpec("gate_up_proj_bias", (2 * I,), dtype),
             ExpertTensorSpec("down_proj", (I, H), dtype), ExpertTensorSpec("down_proj_bias", (H,), dtype))
    codec = PrequantCodec(ExpertLayout(specs), PrequantFormat.parse(fmt), transposed=True)
    data = torch.zeros(S, codec.layout.nbytes, dtype=torch.uint8)
    for s in range(S):
        model = {"gate_up_proj": torch.randn(H, 2 * I, generator=g) / H**0.5,
                 "gate_up_proj_bias": (torch.randn(2 * I, generator=g) * 0.3).to(dtype),
                 "down_proj": torch.randn(I, H, generator=g) / I**0.5,
                 "down_proj_bias": (torch.randn(H, generator=g) * 0.3).to(dtype)}
        codec.layout.pack(data[s], codec.encode(model))
    w = codec.weights(codec.layout.views(data.to(DEVICE)))
    table = torch.randperm(E, generator=g) % S
    table[E - 1] = -1
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    rw = torch.rand(T, k, generator=g)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    gate = dict(gate_up_bias=w["gate_up_proj_bias"], down_bias=w["down_proj_bias"], act_params=(1.702, LIMIT))
    return (*(t.to(DEVICE) for t in (hidden, ids, rw)), w["gate_up_proj"], w["down_proj"], table.to(DEVICE)), gate


def test_reference_is_transformers_gpt_oss_experts():
    """The reference's "swiglu_oai" on [out, in] stacks (interleaved rows, biases) is `GptOssExperts.forward`
    on the same (dequantized) weights in its [in, out] layout, clamps binding."""
    experts = tiny_model("mxfp4").model.layers[0].mlp.experts  # fp32, E = 8, H = I = 64
    experts.limit = 0.5
    E, H, I2 = experts.gate_up_proj.shape
    fmt = PrequantFormat.parse("mxfp4")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            getattr(experts, name).normal_(0, 0.3, generator=g)
        parts = {name: [quantize(getattr(experts, name)[e].T, fmt) for e in range(E)]
                 for name in ("gate_up_proj", "down_proj")}
        stacks = {name: PrequantStack(fmt, tuple(getattr(experts, name).shape[:0:-1]), torch.float32,
                                      {sfx: torch.stack([p[sfx] for p in ps]) for sfx in fmt.suffixes})
                  for name, ps in parts.items()}
        for name, st in stacks.items():  # the module computes with exactly the dequantized codes
            getattr(experts, name).copy_(st.dequantize().transpose(1, 2))
        hidden = torch.randn(5, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(5)])
        rw = torch.rand(5, 2, generator=g)
        want = experts(hidden, ids, rw)
        got = experts_reference(hidden, ids, rw, stacks["gate_up_proj"], stacks["down_proj"], torch.arange(E),
                                "swiglu_oai", gate_up_bias=experts.gate_up_proj_bias, down_bias=experts.down_proj_bias,
                                act_params=(experts.alpha, experts.limit))
    gu = hidden @ experts.gate_up_proj[ids[0, 0]] + experts.gate_up_proj_bias[ids[0, 0]]
    assert (gu[:, 0::2] > 0.5).any() and (gu[:, 1::2].abs() > 0.5).any()  # both clamps bind
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


CASES = [("mxfp4", 1, 2, DECODE), ("mxfp4", 17, 2, PREFILL), ("gptq-int4-g16", 3, 2, DECODE),
         ("fp8-b16", 17, 3, PREFILL)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt,T,k,config", CASES, ids=lambda x: x if isinstance(x, str) else None)
def test_kernel_computes_gpt_oss_experts_from_published_slots(fmt, T, k, config, dtype, monkeypatch):
    p, gate = oai_problem(fmt, T, k, 64, 32, dtype, seed=T + k)
    ref = experts_reference(*p, "swiglu_oai", **gate)
    assert (ref - experts_reference(*p, "swiglu_oai", **{**gate, "act_params": (1.702, 7.0)})).abs().max() > 1e-2
    with monkeypatch.context() as mp:  # the kernel reads the parts: nothing is dequantized outside it
        mp.setattr(PrequantStack, "dequantize", lambda *a, **kw: pytest.fail("dequantized outside the kernel"))
        out = fused_experts(*p, "swiglu_oai", config, **gate)
    assert out.shape == (T, 64) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_gpt_oss_gate_arguments_are_checked():
    p, gate = oai_problem("mxfp4", 2, 2, 64, 32, torch.float32)
    with pytest.raises(ValueError, match="act_params"):
        moe_experts(*p, "swiglu_oai")
    with pytest.raises(ValueError, match="act_params"):
        moe_experts(*p, "silu", act_params=(1.0, 1.0))
    with pytest.raises(ValueError, match="both biases"):
        moe_experts(*p, "swiglu_oai", gate_up_bias=gate["gate_up_bias"], act_params=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"down_bias \[S, H\]"):
        moe_experts(*p, "swiglu_oai", **{**gate, "down_bias": gate["down_bias"][:, :10]})


def test_without_triton_the_gpt_oss_reference_runs(monkeypatch):
    import specmoe.kernels.experts_kernel as ek

    monkeypatch.setattr(ek, "triton_runs_on", lambda device: False)
    p, gate = oai_problem("mxfp4", 3, 2, 64, 32, torch.float32)
    assert torch.equal(moe_experts(*p, "swiglu_oai", **gate), experts_reference(*p, "swiglu_oai", **gate))


@needs_triton
def test_runtime_runs_the_kernel_on_gpt_oss_mxfp4_checkpoint(tmp_path):
    """The tiny gpt-oss MXFP4 checkpoint with compute="triton": every MoE layer runs the kernel from the
    published MXFP4 slots ("triton-fused-mxfp4-swiglu_oai"), with the tokens of transformers' own
    (dequantized) load, host misses too (the host kernel); compute="auto" on a CPU stays on the model's
    implementation over a dequantized scratch; a bf16 gpt-oss compressed to FP8 runs it too, and one in its own
    [in, out] layout does not."""
    path = write_checkpoint("mxfp4", tmp_path / "mxfp4")
    ids = torch.tensor([[3, 5, 7, 9, 11, 2]])
    with torch.no_grad():
        ref = dequantized_reference("mxfp4", path)
        want = ref.generate(ids, max_new_tokens=3, do_sample=False)
    for misses in ("fetch", "host"):
        smoe = load_offloaded(path, cache_capacity=0.25, device=DEVICE, compute="triton", misses=misses)
        assert {smoe.experts_compute.kernel_name(layer) for layer in smoe.moe.layers} == {
            "triton-fused-mxfp4-swiglu_oai"}
        with torch.no_grad():
            assert torch.equal(smoe.generate(ids.to(DEVICE), max_new_tokens=3, do_sample=False).cpu(), want)
        assert smoe.stats.total.misses > 0
    if DEVICE.type == "cpu":
        auto = load_offloaded(path, cache_capacity=0.25, device="cpu")
        assert {auto.experts_compute.kernel_name(layer) for layer in auto.moe.layers} == {"gather-dequantized-mxfp4"}
    fp8 = SpeculativeMoE(tiny_model("mxfp4", dtype=torch.bfloat16), None, cache_capacity=0.5, compression="fp8-b32",
                         compute="triton", device=DEVICE)
    assert {fp8.experts_compute.kernel_name(layer) for layer in fp8.moe.layers} == {"triton-fused-fp8-b32-swiglu_oai"}
    own = SpeculativeMoE(tiny_model("mxfp4"), None, cache_capacity=0.5, compute="triton", device=DEVICE)
    assert {own.experts_compute.kernel_name(layer) for layer in own.moe.layers} == {
        "pool" if DEVICE.type == "cuda" else "gather"}
    with torch.no_grad():
        own_model = tiny_model("mxfp4")
        assert torch.equal(own.generate(ids.to(DEVICE), max_new_tokens=3, do_sample=False).cpu(),
                           own_model.generate(ids, max_new_tokens=3, do_sample=False))

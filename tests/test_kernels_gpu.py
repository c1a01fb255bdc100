"""The kernels compiled for real: for a CUDA architecture without a GPU (ptxas, in a subprocess without the
interpreter), and run on CUDA when there is one (marked gpu; skipped otherwise)."""

# Shape legend: T tokens, H hidden, I intermediate, k top-k

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, make_inputs
from test_kernels_moe import TOL, make_problem
from test_compressed_runtime import TOL as COMPRESSED_TOL, compressed_problem, fake_quantized

from specmoe import SpeculativeMoE
from specmoe.kernels import MoEKernelConfig, QuantFormat, dequantize, dequantize_into, experts_reference, quantize
from specmoe.kernels import fused_experts
from specmoe.kernels.jit import triton

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(triton is None or not _nvidia_backend(), reason="needs triton's NVIDIA backend")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels compile for real in the tests below")
def test_kernels_compile_for_hopper():
    """Without a GPU: catches what the interpreter accepts and the compiler rejects (bf16 variants, sm_90)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "specmoe.kernels.compile_check", "--arch", "90", "--dtypes",
                           "bfloat16"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == 22  # 20 fused experts variants (8 publishers', 4 gpt-oss), 2 dequantize


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("T,k,block_t", [(1, 2, 1), (8, 4, 1), (8, 4, 16), (100, 4, 16), (300, 6, 64)])
def test_kernel_on_cuda_at_model_sizes(T, k, block_t, dtype):
    """Hidden and intermediate sizes of real models (Qwen1.5-MoE's 1408 is not a multiple of 128)."""
    p = make_problem(T, k, 1024, 1408, E=16, S=20, dtype=dtype)
    cfg = MoEKernelConfig(block_t=block_t, block_k=64, block_i=64 if block_t > 1 else 32, block_h=64)
    out = fused_experts(*p, "silu", cfg)
    ref = experts_reference(*p, "silu")
    torch.testing.assert_close(out, ref, **TOL[dtype])


@gpu
@pytest.mark.parametrize("fmt", ["int8", "int4-g128", "int4-g64"])
@pytest.mark.parametrize("T,k,block_t", [(1, 2, 1), (8, 4, 1), (100, 4, 16), (300, 6, 64)])
def test_compressed_kernel_on_cuda_at_model_sizes(fmt, T, k, block_t):
    """Compressed slots at real sizes (I = 1408 is not a multiple of 128: int4 pads K), bf16 activations."""
    p = compressed_problem(T, k, 1024, 1408, QuantFormat.parse(fmt), torch.bfloat16, E=16, S=20)
    cfg = MoEKernelConfig(block_t=block_t, block_k=64, block_i=64 if block_t > 1 else 32, block_h=64)
    out = fused_experts(*p, "silu", cfg)
    ref = experts_reference(*p, "silu")
    torch.testing.assert_close(out, ref, **COMPRESSED_TOL[torch.bfloat16])


@gpu
def test_compressed_kernel_benchmark_on_cuda(tmp_path):
    """benchmarks/moe_kernel.py with compressed slots on a small preset: every row computes, figures written."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("moe_kernel", ROOT / "benchmarks" / "moe_kernel.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "k.json"
    assert script.main(["--presets", "qwen1.5-moe-a2.7b", "--tokens", "1", "64", "--repeats", "3",
                        "--implementations", "triton", "grouped_mm", "--compression", "int4-g128",
                        "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["implementation"] for r in rows} == {"triton", "grouped_mm", "triton-int4-g128"}
    assert all(r["median_us"] > 0 for r in rows)


@gpu
@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-g128"])
def test_dequant_on_cuda(fmt):
    fmt = QuantFormat.parse(fmt)
    w = (torch.randn(1408, 1000) * 0.02).to(torch.bfloat16)
    parts = {k: v.cuda() for k, v in quantize(w, fmt).items()}
    out = torch.empty(1408, 1000, dtype=torch.bfloat16, device="cuda")
    dequantize_into(out, parts, fmt)
    ref = dequantize(parts, fmt, (1408, 1000), torch.bfloat16)
    torch.testing.assert_close(out, ref, atol=0, rtol=2**-7)  # one bf16 rounding apart at most (FMA)


@gpu
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("compute,compression", [("triton", None), ("triton", "int8"), ("auto", "int4"),
                                                 ("pool", "int4")])
def test_wrapper_on_cuda(family, compute, compression):
    """Kernel compute and compressed slots on CUDA ("pool" + compression falls back to dequantized scratches)."""
    model = build_tiny(family)
    reference = build_tiny(family) if compression is None else fake_quantized(build_tiny(family),
                                                                              QuantFormat.parse(compression))
    inputs = make_inputs(model, batch=2, length=6, left_pad=True)
    with torch.no_grad():
        want = reference.cuda().generate(**{k: v.cuda() for k, v in inputs.items()}, max_new_tokens=5,
                                         do_sample=False)
    smoe = SpeculativeMoE(model, None, cache_capacity=0.25, device="cuda", compute=compute, compression=compression)
    with torch.no_grad():
        tokens = smoe.generate(**inputs, max_new_tokens=5, do_sample=False)
    stats = smoe.stats
    smoe.unwrap()
    assert torch.equal(tokens.cpu(), want.cpu())
    assert stats.total.misses > 0

"""Triton kernels, each with a plain PyTorch reference.

* `experts_kernel`: one MoE layer's routed experts (gate/up, activation, down, weighted top-k sum) computed
  from the cache's slot pool through the expert->slot table (`fused_experts`; `moe_experts` falls back to
  `reference.experts_reference` where Triton cannot run).
* `gates`: which transformers experts modules the kernel computes as they are (`kernel_activation`).
* `quant`: int8 per-channel / int4 group-wise expert compression, `QuantizedStack` (a compressed slot pool's
  matrices, which `fused_experts` / `experts_reference` read directly) and a dequantize kernel.
* `prequant`: the publishers' formats (MXFP4, block-scaled FP8, GPTQ / AWQ int4) and `PrequantStack`, which
  `fused_experts` / `experts_reference` read directly too.
* `launch_config`: launch configurations as data (`configs/*.json`, per device, shape and token bucket),
  with a logged fallback to untuned defaults; `benchmarks/autotune_moe_kernel.py` writes them on a GPU.
* `compile_check`: compile every kernel variant for a CUDA arch without a GPU.

The benchmark problem (the kernel vs transformers' experts on one slot pool) is `specmoe.bench.kernel_problem`.
On CPU the kernels run in triton's interpreter when TRITON_INTERPRET=1 was set before triton was imported.
"""

from .jit import triton_runs_on
from .launch_config import LaunchConfigs, MoEKernelConfig, launch_configs, shape_key
from .experts_kernel import FORMATS, align_pairs, fused_experts, moe_experts, weight_format
from .gates import kernel_activation
from .quant import QuantFormat, QuantizedStack, dequantize, dequantize_into, fake_quantize, quantize
from .reference import ACTIVATIONS, experts_reference

__all__ = [
    "ACTIVATIONS", "FORMATS", "LaunchConfigs", "MoEKernelConfig", "QuantFormat", "QuantizedStack", "align_pairs", "dequantize",
    "dequantize_into", "experts_reference", "fake_quantize", "fused_experts", "kernel_activation",
    "launch_configs", "moe_experts", "quantize", "shape_key", "triton_runs_on", "weight_format",
]

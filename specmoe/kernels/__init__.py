"""Triton kernels, each with a plain PyTorch reference: fused routed experts on the slot pool, and
dequantization of compressed experts. Launch configurations are data (`configs/*.json`)."""

from .jit import triton_runs_on
from .launch_config import LaunchConfigs, MoEKernelConfig, launch_configs, shape_key
from .experts_kernel import align_pairs, fused_experts, kernel_activation, moe_experts
from .quant import QuantFormat, dequantize, dequantize_into, fake_quantize, quantize
from .reference import ACTIVATIONS, experts_reference

__all__ = [
    "ACTIVATIONS", "LaunchConfigs", "MoEKernelConfig", "QuantFormat", "align_pairs", "dequantize",
    "dequantize_into", "experts_reference", "fake_quantize", "fused_experts", "kernel_activation",
    "launch_configs", "moe_experts", "quantize", "shape_key", "triton_runs_on",
]

"""Which transformers experts modules the fused kernel computes as they are: their layout flags, their gate and
activation, in the kernel's terms (`experts_kernel.fused_experts`'s ``activation``)."""

from __future__ import annotations

import torch


def kernel_activation(experts: torch.nn.Module) -> tuple[str | None, str]:
    """Whether the fused kernel computes what a transformers experts module computes.

    Supported: `use_experts_implementation` experts with 3-D gate_up_proj [E, 2I, H] / down_proj [E, H, I],
    concatenated gate then up, not transposed, no biases, no post-expert norm, the default gate
    (act(gate) * up) with a SiLU or GELU (exact or tanh) activation: Mixtral, Qwen2/3-MoE, OLMoE,
    DeepSeek-V2/V3, Granite-MoE, Phi-MoE, ... Not here: GPT-OSS (transposed, biases, its own clamped gate),
    which the kernel computes as "swiglu_oai" from slots in a publisher's format (the runtime's
    `compute.FusedKernelCompute` decides that); ModuleList experts (SwitchTransformers).

    Returns:
        (activation name, "") when supported, else (None, the reason).
    """
    flags = {"has_gate": True, "is_concatenated": True, "is_transposed": False, "has_bias": False,
             "has_post_expert_norm": False, "_is_expert_parallel": False}
    for name, want in flags.items():
        if getattr(experts, name, want) != want:
            return None, f"{name}={getattr(experts, name)!r}"
    for name, dims in (("gate_up_proj", 3), ("down_proj", 3)):
        p = getattr(experts, name, None)
        if not isinstance(p, torch.Tensor) or p.dim() != dims:
            return None, f"no 3-D {name}"
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return None, "this transformers version has no default experts gate to compare with"
    if getattr(type(experts), "_apply_gate", None) is not _default_apply_gate:
        return None, f"{type(experts).__name__} has its own gate function"
    activation = _activation_name(getattr(experts, "act_fn", None))
    if activation is None:
        return None, f"activation {type(getattr(experts, 'act_fn', None)).__name__} is not SiLU or GELU"
    return activation, ""


def _activation_name(act) -> str | None:
    if act is None:
        return None
    name = type(act).__name__
    if isinstance(act, torch.nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if isinstance(act, torch.nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if name == "GELUActivation":
        return "gelu"
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation"):
        return "gelu_tanh"
    return None

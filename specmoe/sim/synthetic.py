"""The one random-weight model builder: a transformers config built on the meta device and materialised piecewise.

The model is created with parameters on the meta device (buffers such as rotary tables stay real), then each
parameter is allocated where it belongs: the routed experts on `experts_device` (the host, for offloading)
and everything else on `device`, so the whole model is never on the device unless asked. Weights follow the
usual initialisation (normal(0, initializer_range) for matrices, ones for norms, zeros for biases); random
numbers are drawn on the GPU when there is one (fast) and copied where they go.

Random weights give real copy and compute times but not real routing: never publish hit rates from them.
The reference model starts its training from here too (`trainable=True`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..runtime.adapters import find_moe_layers
from .shapes import ModelShape

logger = logging.getLogger(__name__)

# A shape scaled down for CPU smoke runs: the family and the routing geometry's *kind*, tiny sizes.
SMOKE_OVERRIDES = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=512,
                       num_hidden_layers=4, max_position_embeddings=512)


def smoke_config(shape: ModelShape, num_experts: int = 8):
    """`shape`'s family at tiny sizes (4 layers, `num_experts` experts, same top-k capped at 2)."""
    overrides = {k: v for k, v in SMOKE_OVERRIDES.items() if k in shape.config or k in ("head_dim", "num_hidden_layers")}
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if key in shape.config:
            overrides[key] = num_experts
    overrides["num_experts_per_tok"] = min(shape.top_k, 2)
    if shape.config.get("layer_types"):
        overrides["layer_types"] = shape.config["layer_types"][: overrides["num_hidden_layers"]]
    if shape.model_type == "olmoe":
        overrides["intermediate_size"] = 32
    return shape.to_config(**overrides)


def _fill(param_name: str, shape: tuple, dtype: torch.dtype, device: torch.device, std: float,
          gen: torch.Generator, gen_device: torch.device) -> torch.Tensor:
    leaf = param_name.rsplit(".", 1)[-1]
    if len(shape) == 1 and ("norm" in param_name or "layernorm" in param_name):
        return torch.ones(shape, dtype=dtype, device=device)
    if leaf.endswith("bias") or leaf == "bias":
        return torch.zeros(shape, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    flat = out.view(-1)
    chunk = 1 << 27  # draw at most 128M values at a time
    for start in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - start)
        flat[start : start + n].copy_(torch.randn(n, generator=gen, device=gen_device, dtype=torch.float32)
                                      .mul_(std).to(dtype))
    return out


def build_random_model(config, *, dtype=torch.bfloat16, device="cpu", experts_device="cpu", seed: int = 0,
                       progress: bool = True, trainable: bool = False) -> nn.Module:
    """Build a transformers causal LM from `config` with random weights, experts on `experts_device` and the
    rest on `device`, without ever materialising it elsewhere.

    Args:
        config: a transformers config (e.g. `ModelShape.to_config()`).
        dtype: parameter dtype.
        device: where non-expert parameters and buffers go.
        experts_device: where the routed experts go ("cpu" to offload them; `device` for all on the device).
        seed: the random seed (the same seed gives the same weights on any device).
        progress: a progress bar over the tensors.
        trainable: parameters require gradients (to train the model from this initialisation).

    Returns:
        The model in eval mode.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    device, experts_device = torch.device(device), torch.device(experts_device)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    moe = find_moe_layers(model)
    expert_ids = {id(p) for layer in moe.layers for p in layer.experts.parameters()}
    gen_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    std = float(getattr(config, "initializer_range", 0.02))
    named = [(name, module, leaf, p) for name, module in model.named_modules()
             for leaf, p in module.named_parameters(recurse=False) if p.is_meta]
    for name, module, leaf, p in tqdm(named, desc="materialise", unit="tensor", disable=not progress, leave=False):
        target = experts_device if id(p) in expert_ids else device
        data = _fill(f"{name}.{leaf}", tuple(p.shape), p.dtype, target, std, gen, gen_device)
        module._parameters[leaf] = nn.Parameter(data, requires_grad=trainable)
    for name, module in model.named_modules():
        for leaf, b in list(module.named_buffers(recurse=False)):
            module._buffers[leaf] = b.to(device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()

"""Plain PyTorch references for the kernels: the routed experts of one MoE layer computed from a slot pool.

These define what the Triton kernels compute (tests compare against them) and are the fallback wherever
Triton cannot run (CPU without TRITON_INTERPRET=1). Numerics: matmuls accumulate in float32 from operands in
the weights' dtype, the activated intermediate is rounded to the weights' dtype (as the model's own
experts do), the top-k sum is in float32 and the result is cast to the hidden state's dtype.
"""

# Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k, S slots, P = T*k routed pairs

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .quant import QuantizedStack

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # act(gate) * up, gate rows then up rows
OAI = "swiglu_oai"  # gpt-oss's clamped SwiGLU, gate and up rows interleaved, with (alpha, limit)
KERNEL_ACTIVATIONS = ACTIVATIONS + (OAI,)


def swiglu_oai(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's gate (transformers' `GptOssExperts._apply_gate`) on gate_up [..., 2I] (gate, up interleaved)
    -> [..., I]: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g), g = min(gate, limit)."""
    gate = gate_up[..., 0::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The gate activation by name (one of ACTIVATIONS), in x's dtype."""
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def slots_of_pairs(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Slot of every routed (token, choice) pair: ids [T, k] through table [E]; -1 where the id is negative
    or the expert is absent. Returns [T*k] long."""
    flat = ids.reshape(-1).long()  # [P]
    slots = table.long()[flat.clamp(min=0)]  # [P]
    return torch.where(flat >= 0, slots, torch.full_like(slots, -1))


def experts_reference(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    table: torch.Tensor,
    activation: str = "silu",
    *,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    act_params: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Routed experts of one MoE layer, weights read from cache slots.

    out[t] = sum_j weights[t, j] * down[s] @ (act(gate[s] @ x[t]) * (up[s] @ x[t])), s = table[ids[t, j]],
    with gate/up the first/second half of gate_up's rows. Pairs with a negative id or an absent expert
    (table -1) contribute nothing. With "swiglu_oai" (gpt-oss): out[t] = sum_j weights[t, j] * (down[s] @
    swiglu_oai(gate_up[s] @ x[t] + gate_up_bias[s]) + down_bias[s]), gate and up rows interleaved.

    Args:
        hidden: [T, H] hidden states.
        ids: [T, k] expert ids (any integer dtype).
        weights: [T, k] routing weights.
        gate_up: [S, 2I, H] slot pool view (rows: gate then up), or a `QuantizedStack` of compressed
            [2I, H] matrices (a compressed pool), or a `prequant.PrequantStack` (a publisher's format): only the
            routed slots are dequantized, one at a time.
        down: [S, H, I] slot pool view, or a `QuantizedStack` of [H, I] matrices.
        table: [E] expert -> slot of this layer, -1 when absent.
        activation: one of KERNEL_ACTIVATIONS.
        gate_up_bias, down_bias: [S, 2I] and [S, H] slot biases (added in float32), or None.
        act_params: (alpha, limit) of "swiglu_oai".

    Returns:
        [T, H] in hidden's dtype.
    """
    T, H = hidden.shape
    k = ids.shape[1]
    compressed = not isinstance(gate_up, torch.Tensor)  # a QuantizedStack or a prequant.PrequantStack
    inter = down.shape[-1]
    wdt = gate_up.dtype
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)  # [T, H]
    slots = slots_of_pairs(ids, table)  # [P]
    w = weights.reshape(-1).float()  # [P]
    for s in torch.unique(slots[slots >= 0]).tolist():
        rows = torch.nonzero(slots == s).flatten()  # [n] pair indices
        tokens = rows // k  # [n]
        x = hidden[tokens].to(wdt).float()  # [n, H]
        w1 = gate_up.dequantize(s) if compressed else gate_up[s]  # [2I, H]
        w2 = down.dequantize(s) if compressed else down[s]  # [H, I]
        gu = x @ w1.float().t()  # [n, 2I]
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[s].float()
        if activation == OAI:
            h = swiglu_oai(gu, *act_params).to(wdt).float()  # [n, I]
        else:
            h = (activate(gu[:, :inter], activation) * gu[:, inter:]).to(wdt).float()  # [n, I]
        y = h @ w2.float().t()  # [n, H]
        if down_bias is not None:
            y = y + down_bias[s].float()
        out.index_add_(0, tokens, y * w[rows, None])
    return out.to(hidden.dtype)

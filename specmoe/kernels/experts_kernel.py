"""Fused routed experts of one MoE layer, computed straight from the cache's slot pool (Triton).

One kernel does gate/up, the activation, down and the weighted sum over top-k. A program owns a block of
routed (token, expert) pairs that share one expert and a tile of I: it reduces gate and up over all of H,
activates, multiplies by its [I-tile, H] slice of down and adds its weighted share into a float32 output
with atomics (the sum over I-tiles and over top-k). Every weight element is read once per block of pairs.

* ``block_t == 1`` (decode): one pair per program, no sorting; products are broadcast-and-sum (GEMV).
* ``block_t >= 16`` (prefill): pairs are sorted by expert and padded to blocks (`align_pairs`, device-side,
  no host sync); products use ``tl.dot``.

The expert -> slot lookup happens in the kernel through the layer's row of the cache table, so compute
reads the slots in place. Atomics make the summation order vary between runs on a GPU (float32, so the
difference is at rounding level). The plain PyTorch reference is `specmoe.kernels.reference.experts_reference`.
"""

# Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k, S slots, P = T*k routed pairs

from __future__ import annotations

import logging

import torch

from .jit import interpreting, jit, triton_runs_on
from .launch_config import MoEKernelConfig, launch_configs, shape_key
from .reference import ACTIVATIONS, experts_reference

try:  # triton is optional: without it every entry point falls back to the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None

logger = logging.getLogger(__name__)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}  # silu 0, gelu 1, gelu_tanh 2


@jit
def _fused_experts_kernel(
    x_ptr,  # [T, H] in the weights' dtype
    out_ptr,  # [T, H] float32, zeroed
    w1_ptr,  # gate_up [S, 2I, H], slot-strided
    w2_ptr,  # down [S, H, I], slot-strided
    table_ptr,  # [E] expert -> slot, -1 absent
    pairs_ptr,  # [num_blocks * BLOCK_T] sorted pair ids, P = padding (unused when BLOCK_T == 1)
    block_expert_ptr,  # [num_blocks] expert of each block, -1 = nothing to do
    rw_ptr,  # [P] routing weights
    H, I, P, TOP_K,
    stride_xt, stride_ot,
    stride_w1s, stride_w1n, stride_w1k,
    stride_w2s, stride_w2n, stride_w2k,
    ACT: tl.constexpr,
    DOT_F32: tl.constexpr,  # dots in float32 ("ieee"): fp32 weights, or bf16 under the interpreter
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_i = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    slot = tl.load(table_ptr + expert).to(tl.int64)
    if slot < 0:
        return

    if BLOCK_T == 1:
        pair = pid_m + tl.arange(0, 1)  # [1]
    else:
        pair = tl.load(pairs_ptr + pid_m * BLOCK_T + tl.arange(0, BLOCK_T))  # [BT]
    pmask = pair < P
    token = (pair // TOP_K).to(tl.int64)  # [BT]
    rw = tl.load(rw_ptr + pair, mask=pmask, other=0.0).to(tl.float32)  # [BT]

    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # [BI]
    imask = offs_i < I
    offs_k = tl.arange(0, BLOCK_K)
    w1 = w1_ptr + slot * stride_w1s
    w2 = w2_ptr + slot * stride_w2s

    # ---- gate and up for this I-tile, reduced over all of H ---------------------------------------
    acc_g = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k  # [BK]
        kmask = kk < H
        xt = tl.load(x_ptr + token[:, None] * stride_xt + kk[None, :],
                     mask=pmask[:, None] & kmask[None, :], other=0.0)  # [BT, BK]
        wmask = kmask[:, None] & imask[None, :]
        wg = tl.load(w1 + offs_i[None, :] * stride_w1n + kk[:, None] * stride_w1k, mask=wmask, other=0.0)  # [BK, BI]
        wu = tl.load(w1 + (offs_i[None, :] + I) * stride_w1n + kk[:, None] * stride_w1k, mask=wmask, other=0.0)
        if BLOCK_T == 1:
            xf = xt.to(tl.float32)[:, :, None]  # [1, BK, 1]
            acc_g += tl.sum(xf * wg.to(tl.float32)[None, :, :], axis=1)
            acc_u += tl.sum(xf * wu.to(tl.float32)[None, :, :], axis=1)
        elif DOT_F32:
            acc_g = tl.dot(xt.to(tl.float32), wg.to(tl.float32), acc_g, input_precision="ieee")
            acc_u = tl.dot(xt.to(tl.float32), wu.to(tl.float32), acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(xt, wg, acc_g)
            acc_u = tl.dot(xt, wu, acc_u)

    # ---- activation; the intermediate is rounded to the weights' dtype, as in the model -------------
    if ACT == 0:  # silu: x sigmoid(x)
        gate = acc_g / (1.0 + tl.exp(-acc_g))
    elif ACT == 1:  # exact gelu
        gate = 0.5 * acc_g * (1.0 + tl.math.erf(acc_g * 0.7071067811865476))
    else:  # tanh gelu: 0.5 x (1 + tanh(y)) = x sigmoid(2y)
        y = 0.7978845608028654 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        gate = acc_g / (1.0 + tl.exp(-2.0 * y))
    h = (gate * acc_u).to(w2_ptr.dtype.element_ty)  # [BT, BI]

    # ---- down for this I-tile, weighted, added into the output ------------------------------------
    for n0 in range(0, H, BLOCK_H):
        nn = n0 + tl.arange(0, BLOCK_H)  # [BH]
        nmask = nn < H
        wd = tl.load(w2 + nn[None, :] * stride_w2n + offs_i[:, None] * stride_w2k,
                     mask=imask[:, None] & nmask[None, :], other=0.0)  # [BI, BH]
        if BLOCK_T == 1:
            part = tl.sum(h.to(tl.float32)[:, :, None] * wd.to(tl.float32)[None, :, :], axis=1)  # [1, BH]
        elif DOT_F32:
            part = tl.dot(h.to(tl.float32), wd.to(tl.float32), input_precision="ieee")  # [BT, BH]
        else:
            part = tl.dot(h, wd)
        part = part * rw[:, None]
        tl.atomic_add(out_ptr + token[:, None] * stride_ot + nn[None, :], part,
                      mask=pmask[:, None] & nmask[None, :], sem="relaxed")


def align_pairs(flat_ids: torch.Tensor, num_experts: int, block_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort routed pairs by expert and pad each expert's run to whole blocks, on the device with no host sync.

    Args:
        flat_ids: [P] expert id of each pair (negative: no expert).
        num_experts: E.
        block_t: pairs per block.

    Returns:
        pairs [N * block_t] int32 (pair ids; P marks padding) and block_expert [N] int32 (-1: empty block),
        where N = ceil(P / block_t) + min(E, P) bounds the blocks any routing needs.
    """
    P = flat_ids.numel()
    dev = flat_ids.device
    n_blocks = -(-P // block_t) + min(num_experts, P)
    key = torch.where(flat_ids < 0, num_experts, flat_ids.long())  # [P]; E = no expert
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).index_add_(
        0, key, torch.ones_like(key))  # [E+1]
    blocks = (counts[:num_experts] + block_t - 1) // block_t  # [E]
    block_end = torch.cumsum(blocks, 0)  # [E]
    block_start = torch.cat([block_end - blocks, torch.full((1,), n_blocks, device=dev, dtype=torch.long)])
    order = torch.argsort(key, stable=True)  # [P]
    sorted_key = key[order]
    first = torch.cumsum(counts, 0) - counts  # [E+1] where each key's run starts in sorted order
    rank = torch.arange(P, device=dev) - first[sorted_key]
    dest = block_start[sorted_key] * block_t + rank  # pairs without an expert land past the end
    pairs = torch.full((n_blocks * block_t + P,), P, dtype=torch.int32, device=dev)
    pairs[dest] = order.to(torch.int32)
    block_expert = torch.searchsorted(block_end, torch.arange(n_blocks, device=dev), right=True)  # [N]
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return pairs[: n_blocks * block_t], block_expert


def _check(hidden, ids, weights, gate_up, down, table, activation) -> None:
    if activation not in _ACT_CODE:
        raise ValueError(f"activation {activation!r} is not supported by the kernel; choose one of {ACTIVATIONS}")
    if hidden.dim() != 2 or ids.dim() != 2 or weights.shape != ids.shape or ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"expected hidden [T, H], ids [T, k], weights [T, k]; got {tuple(hidden.shape)}, "
                         f"{tuple(ids.shape)}, {tuple(weights.shape)}")
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
        raise ValueError(f"expected gate_up [S, 2I, H] and down [S, H, I]; got {tuple(gate_up.shape)}, "
                         f"{tuple(down.shape)}")
    H = hidden.shape[1]
    I2 = gate_up.shape[1]
    if I2 % 2 or gate_up.shape[2] != H or tuple(down.shape[1:]) != (H, I2 // 2):
        raise ValueError(f"hidden size {H} and gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)} do not "
                         "form gate_up [S, 2I, H], down [S, H, I]")
    if gate_up.dtype not in DTYPES or down.dtype != gate_up.dtype:
        raise ValueError(f"expert weights must share one of {DTYPES}; got {gate_up.dtype} and {down.dtype}")
    if gate_up.stride(-1) != 1 or down.stride(-1) != 1:
        raise ValueError("expert weights must be contiguous along their last dim (slot pool views are)")
    if ids.dtype.is_floating_point or table.dtype.is_floating_point or table.dim() != 1:
        raise ValueError(f"ids and table must be integer tensors, table [E]; got {ids.dtype}, {table.dtype} "
                         f"{tuple(table.shape)}")
    devices = {t.device for t in (hidden, ids, weights, gate_up, down, table)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def fused_experts(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    table: torch.Tensor,
    activation: str = "silu",
    config: MoEKernelConfig | None = None,
) -> torch.Tensor:
    """Routed experts of one MoE layer with the Triton kernel (see `experts_reference` for the math).

    Args:
        hidden: [T, H] hidden states (cast to the weights' dtype).
        ids: [T, k] expert ids; negative ids contribute nothing.
        weights: [T, k] routing weights.
        gate_up: [S, 2I, H] slot pool view, rows gate then up; any stride over S, contiguous last dim.
        down: [S, H, I] slot pool view.
        table: [E] expert -> slot (the layer's row of the cache table), -1 = absent (contributes nothing).
        activation: "silu", "gelu" or "gelu_tanh".
        config: launch configuration; default from `launch_configs(device)` for this shape and T.

    Returns:
        [T, H] in hidden's dtype.

    Raises:
        ValueError: shapes, dtypes, strides or devices that do not fit the contract above.
        RuntimeError: Triton cannot run on this device (CPU without TRITON_INTERPRET=1, or no triton).
    """
    _check(hidden, ids, weights, gate_up, down, table, activation)
    if not triton_runs_on(hidden.device):
        raise RuntimeError(f"the Triton kernel cannot run on {hidden.device} here (CUDA, or CPU with "
                           "TRITON_INTERPRET=1); use specmoe.kernels.moe_experts for the automatic fallback")
    T, H = hidden.shape
    k = ids.shape[1]
    inter = down.shape[-1]
    P = T * k
    if config is None:
        config = launch_configs(hidden.device).config_for(shape_key(gate_up.dtype, H, inter, k), T)
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)  # [T, H]
    if P == 0:
        return out.to(hidden.dtype)
    x = hidden.to(gate_up.dtype).contiguous()  # [T, H]
    flat = ids.reshape(-1)
    if config.block_t == 1:
        block_expert = flat.to(torch.int32)  # [P]: pair m is block m
        pairs = block_expert  # not read
    else:
        pairs, block_expert = align_pairs(flat, table.numel(), config.block_t)
    rw = weights.reshape(-1).contiguous()  # [P]
    dot_f32 = gate_up.dtype == torch.float32 or (interpreting() and gate_up.dtype == torch.bfloat16)
    grid = (block_expert.numel(), triton.cdiv(inter, config.block_i))
    _fused_experts_kernel[grid](
        x, out, gate_up, down, table.contiguous(), pairs, block_expert, rw,
        H, inter, P, k,
        x.stride(0), out.stride(0),
        gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        down.stride(0), down.stride(1), down.stride(2),
        ACT=_ACT_CODE[activation], DOT_F32=dot_f32,
        BLOCK_T=config.block_t, BLOCK_K=config.block_k, BLOCK_I=config.block_i, BLOCK_H=config.block_h,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out.to(hidden.dtype)


def moe_experts(hidden, ids, weights, gate_up, down, table, activation: str = "silu",
                config: MoEKernelConfig | None = None) -> torch.Tensor:
    """`fused_experts` where Triton runs on the tensors' device, else the PyTorch reference (logged once).

    Same arguments, result and errors as `fused_experts` (minus the RuntimeError).
    """
    if triton_runs_on(hidden.device):
        return fused_experts(hidden, ids, weights, gate_up, down, table, activation, config)
    _check(hidden, ids, weights, gate_up, down, table, activation)
    if hidden.device.type not in _WARNED:
        _WARNED.add(hidden.device.type)
        logger.info("Triton cannot run on %s here (set TRITON_INTERPRET=1 to interpret it on CPU); the fused "
                    "experts use the PyTorch reference", hidden.device)
    return experts_reference(hidden, ids, weights, gate_up, down, table, activation)


_WARNED: set[str] = set()


def kernel_activation(experts: torch.nn.Module) -> tuple[str | None, str]:
    """Whether the fused kernel computes what a transformers experts module computes.

    Supported: `use_experts_implementation` experts with 3-D gate_up_proj [E, 2I, H] / down_proj [E, H, I],
    concatenated gate then up, not transposed, no biases, no post-expert norm, the default gate
    (act(gate) * up) with a SiLU or GELU (exact or tanh) activation: Mixtral, Qwen2/3-MoE, OLMoE,
    DeepSeek-V2/V3, Granite-MoE, Phi-MoE, ... Not: GPT-OSS (transposed, biases, clamped custom gate),
    ModuleList experts (SwitchTransformers).

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

"""Fused routed experts of one MoE layer, computed straight from the cache's slot pool (Triton).

One kernel does gate/up, the activation, down and the weighted sum over top-k. A program owns a block of
routed (token, expert) pairs that share one expert and a tile of I: it reduces gate and up over all of H,
activates, multiplies by its [I-tile, H] slice of down and adds its weighted share into a float32 output
with atomics (the sum over I-tiles and over top-k). Every weight element is read once per block of pairs.

* ``block_t == 1`` (decode): one pair per program, no sorting; products are broadcast-and-sum (GEMV).
* ``block_t >= 16`` (prefill): pairs are sorted by expert and padded to blocks (`align_pairs`, device-side,
  no host sync); products use ``tl.dot``.

Two gates (the ``ACT`` constexpr): transformers' default, ``act(gate) * up`` with gate rows [0, I) and up rows
[I, 2I) of gate_up (SiLU, GELU, GELU-tanh); and gpt-oss's ("swiglu_oai"): gate and up rows interleaved (2j,
2j + 1), a bias added to each, ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g)`` with
``g = min(gate, limit)``, and down's bias added once per routed pair (by the programs of the first I-tile),
all in registers. gpt-oss's [in, out] matrices are read in a publisher's format, whose parts are [out, in].

The slots are read in their own bytes and dequantized in registers, one constexpr per format (`FORMATS`):
plain weights, specmoe's int8 / int4 (`quant.QuantizedStack`) and the publishers' MXFP4, block-scaled FP8,
GPTQ and AWQ int4 (`prequant.PrequantStack`); no dequantized copy of an expert is ever written.

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
from .prequant import PrequantStack
from .quant import QuantizedStack
from .reference import ACTIVATIONS, KERNEL_ACTIVATIONS, OAI, experts_reference

try:  # triton is optional: without it every entry point falls back to the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None

logger = logging.getLogger(__name__)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACT_CODE = {name: i for i, name in enumerate(KERNEL_ACTIVATIONS)}  # silu 0, gelu 1, gelu_tanh 2, swiglu_oai 3
# what a slot pool's weight is, as the kernel's FMT code: plain views, specmoe's own compression
# (`quant.QuantizedStack`), the publishers' formats (`prequant.PrequantStack`)
FORMATS = ("plain", "int8", "int4", "mxfp4", "fp8", "gptq-int4", "awq-int4")
Stack = (QuantizedStack, PrequantStack)


@jit
def _load_weight(w, s, z, g, rows, cols, stride_n, stride_k, stride_sn, stride_sk, stride_zn, stride_zk, mask,
                 wdt: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr):
    """A tile of one slot's weight matrix W [N, K] at (rows, cols) (broadcastable index tiles), in the weights'
    dtype: every format is dequantized here, in registers, with the math of its PyTorch reference (float32, then
    one rounding to the weights' dtype). `FORMATS` names the FMT codes; the strides are those of the format's
    own parts (see `_kernel_weights`).

    0 plain. 1 int8: code * the row's scale. 2 int4: two codes per byte along K (even column low), code *
    scale + zero of the (row, column group). 3 MXFP4: the same packing, e2m1 code * 2**(e8m0 scale - 127) per
    32 columns. 4 FP8-b: e4m3 byte * scale_inv of the (GROUP x GROUP) block. 5 GPTQ: qweight [K/8, N] (eight
    codes along K), group g_idx[k], (code - zero - 1) * scale, zeros packed along N. 6 AWQ: qweight [K, N/8]
    and zeros packed along N in AWQ's order, group k // GROUP, (code - zero) * scale.
    """
    # one static branch per format (the others are not compiled); one return
    if FMT == 0:
        out = tl.load(w + rows * stride_n + cols * stride_k, mask=mask, other=0.0)
    elif FMT == 1:
        q = tl.load(w + rows * stride_n + cols * stride_k, mask=mask, other=0).to(tl.float32)
        scale = tl.load(s + rows * stride_sn, mask=mask, other=0.0).to(tl.float32)
        out = (q * scale).to(wdt)
    elif FMT == 2:
        byte = tl.load(w + rows * stride_n + (cols // 2) * stride_k, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((cols % 2) * 4)) & 15
        scale = tl.load(s + rows * stride_sn + (cols // GROUP) * stride_sk, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(z + rows * stride_zn + (cols // GROUP) * stride_zk, mask=mask, other=0.0).to(tl.float32)
        out = (code.to(tl.float32) * scale + zero).to(wdt)
    elif FMT == 3:  # MXFP4: e2m1 = sign | 2-bit exponent | 1-bit mantissa
        byte = tl.load(w + rows * stride_n + (cols // 2) * stride_k, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((cols % 2) * 4)) & 15
        e = (code >> 1) & 3
        m = code & 1
        normal = (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True)  # (1 + m/2) 2**(e-1)
        mag = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
        val = tl.where(code >= 8, -mag, mag)
        sbits = tl.load(s + rows * stride_sn + (cols // 32) * stride_sk, mask=mask, other=127).to(tl.int32)
        scale = tl.where(sbits == 0, 0x00400000, sbits << 23).to(tl.float32, bitcast=True)  # 2**(s - 127)
        out = (val * scale).to(wdt)
    elif FMT == 4:  # FP8 e4m3fn = sign | 4-bit exponent (bias 7) | 3-bit mantissa, read as bytes
        byte = tl.load(w + rows * stride_n + cols * stride_k, mask=mask, other=0).to(tl.int32)
        e = (byte >> 3) & 15
        m = byte & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m 2**-9
        val = tl.where(byte >= 128, -mag, mag)
        scale = tl.load(s + (rows // GROUP) * stride_sn + (cols // GROUP) * stride_sk, mask=mask, other=0.0)
        out = (val * scale.to(tl.float32)).to(wdt)
    elif FMT == 5:  # GPTQ
        word = tl.load(w + (cols // 8) * stride_k + rows * stride_n, mask=mask, other=0)
        code = (word >> ((cols % 8) * 4)) & 15
        grp = tl.load(g + cols + rows * 0, mask=mask, other=0)  # g_idx[k]: any order (act-order)
        scale = tl.load(s + grp * stride_sk + rows * stride_sn, mask=mask, other=0.0).to(tl.float32)
        zword = tl.load(z + grp * stride_zk + (rows // 8) * stride_zn, mask=mask, other=0)
        zero = (zword >> ((rows % 8) * 4)) & 15
        out = ((code - zero - 1).to(tl.float32) * scale).to(wdt)
    else:  # AWQ: column c of 8 sits in nibble AWQ_ORDER.index(c) = c // 2 + 4 (c % 2)
        shift = ((rows % 8) // 2 + (rows % 2) * 4) * 4
        word = tl.load(w + cols * stride_k + (rows // 8) * stride_n, mask=mask, other=0)
        code = (word >> shift) & 15
        grp = cols // GROUP
        scale = tl.load(s + grp * stride_sk + rows * stride_sn, mask=mask, other=0.0).to(tl.float32)
        zword = tl.load(z + grp * stride_zk + (rows // 8) * stride_zn, mask=mask, other=0)
        zero = (zword >> shift) & 15
        out = ((code - zero).to(tl.float32) * scale).to(wdt)
    return out


@jit
def _fused_experts_kernel(
    x_ptr,  # [T, H] in the weights' dtype
    out_ptr,  # [T, H] float32, zeroed
    w1_ptr,  # gate_up [S, 2I, H] slot-strided, or its format's packed weight part (see _load_weight)
    w2_ptr,  # down [S, H, I] slot-strided, or its packed weight part
    s1_ptr, z1_ptr, g1_ptr,  # gate_up's scales, zeros and GPTQ g_idx (per format; unused ones alias w1)
    s2_ptr, z2_ptr, g2_ptr,  # down's
    b1_ptr, b2_ptr,  # gate_up bias [S, 2I] and down bias [S, H], in their slots (read when HAS_BIAS)
    table_ptr,  # [E] expert -> slot, -1 absent
    pairs_ptr,  # [num_blocks * BLOCK_T] sorted pair ids, P = padding (unused when BLOCK_T == 1)
    block_expert_ptr,  # [num_blocks] expert of each block, -1 = nothing to do
    rw_ptr,  # [P] routing weights
    H, I, P, TOP_K,
    alpha, limit,  # gpt-oss's gate (ACT 3)
    stride_xt, stride_ot,
    stride_w1s, stride_w1n, stride_w1k, stride_s1s, stride_s1n, stride_s1k, stride_z1s, stride_z1n, stride_z1k,
    stride_g1s,
    stride_w2s, stride_w2n, stride_w2k, stride_s2s, stride_s2n, stride_s2k, stride_z2s, stride_z2n, stride_z2k,
    stride_g2s,
    stride_b1s, stride_b2s,
    ACT: tl.constexpr,  # 0 silu, 1 gelu, 2 gelu_tanh: act(gate) * up, halves; 3 gpt-oss's clamped SwiGLU, interleaved
    HAS_BIAS: tl.constexpr,
    FMT: tl.constexpr,  # 0: plain weights; else compressed or pre-quantized slots (`FORMATS`), dequantized in registers
    GROUP: tl.constexpr,  # int4 / GPTQ / AWQ group size along K, FP8 block
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
    s1 = s1_ptr + slot * stride_s1s
    z1 = z1_ptr + slot * stride_z1s
    g1 = g1_ptr + slot * stride_g1s
    s2 = s2_ptr + slot * stride_s2s
    z2 = z2_ptr + slot * stride_z2s
    g2 = g2_ptr + slot * stride_g2s
    if ACT == 3:  # gpt-oss: gate row 2j, up row 2j + 1
        rows_g = 2 * offs_i
        rows_u = 2 * offs_i + 1
    else:  # gate rows [0, I), up rows [I, 2I)
        rows_g = offs_i
        rows_u = offs_i + I
    wdt = x_ptr.dtype.element_ty  # the weights' (dequantized) dtype

    # ---- gate and up for this I-tile, reduced over all of H ---------------------------------------
    acc_g = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k  # [BK]
        kmask = kk < H
        xt = tl.load(x_ptr + token[:, None] * stride_xt + kk[None, :],
                     mask=pmask[:, None] & kmask[None, :], other=0.0)  # [BT, BK]
        wmask = kmask[:, None] & imask[None, :]
        wg = _load_weight(w1, s1, z1, g1, rows_g[None, :], kk[:, None], stride_w1n, stride_w1k, stride_s1n,
                          stride_s1k, stride_z1n, stride_z1k, wmask, wdt, FMT, GROUP)  # [BK, BI]
        wu = _load_weight(w1, s1, z1, g1, rows_u[None, :], kk[:, None], stride_w1n, stride_w1k, stride_s1n,
                          stride_s1k, stride_z1n, stride_z1k, wmask, wdt, FMT, GROUP)
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

    if HAS_BIAS:
        b1 = b1_ptr + slot * stride_b1s
        acc_g += tl.load(b1 + rows_g, mask=imask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b1 + rows_u, mask=imask, other=0.0).to(tl.float32)[None, :]

    # ---- activation; the intermediate is rounded to the weights' dtype, as in the model -------------
    if ACT == 0:  # silu: x sigmoid(x)
        h = (acc_g / (1.0 + tl.exp(-acc_g)) * acc_u).to(wdt)  # [BT, BI]
    elif ACT == 1:  # exact gelu
        h = (0.5 * acc_g * (1.0 + tl.math.erf(acc_g * 0.7071067811865476)) * acc_u).to(wdt)
    elif ACT == 2:  # tanh gelu: 0.5 x (1 + tanh(y)) = x sigmoid(2y)
        y = 0.7978845608028654 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        h = (acc_g / (1.0 + tl.exp(-2.0 * y)) * acc_u).to(wdt)
    else:  # gpt-oss: (clamp(up, -limit, limit) + 1) * g sigmoid(alpha g), g = min(gate, limit)
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        h = ((u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))).to(wdt)

    # ---- down for this I-tile, weighted, added into the output ------------------------------------
    for n0 in range(0, H, BLOCK_H):
        nn = n0 + tl.arange(0, BLOCK_H)  # [BH]
        nmask = nn < H
        wd = _load_weight(w2, s2, z2, g2, nn[None, :], offs_i[:, None], stride_w2n, stride_w2k, stride_s2n,
                          stride_s2k, stride_z2n, stride_z2k, imask[:, None] & nmask[None, :], wdt, FMT,
                          GROUP)  # [BI, BH]
        if BLOCK_T == 1:
            part = tl.sum(h.to(tl.float32)[:, :, None] * wd.to(tl.float32)[None, :, :], axis=1)  # [1, BH]
        elif DOT_F32:
            part = tl.dot(h.to(tl.float32), wd.to(tl.float32), input_precision="ieee")  # [BT, BH]
        else:
            part = tl.dot(h, wd)
        if HAS_BIAS:  # down's bias, once per pair: by the first I-tile's programs
            bd = tl.load(b2_ptr + slot * stride_b2s + nn, mask=nmask & (nn * 0 + pid_i == 0), other=0.0)
            part += bd.to(tl.float32)[None, :]
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


def _geometry(w) -> tuple[int, int, int, torch.dtype]:
    """(S, N, K, dtype) of a slot pool view [S, N, K], a QuantizedStack or a PrequantStack."""
    if isinstance(w, Stack):
        return (w.num, *w.shape, w.dtype)
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        raise ValueError(f"expert weights must be 3-D slot pool views, QuantizedStacks or PrequantStacks, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    return (*w.shape, w.dtype)


def _check(hidden, ids, weights, gate_up, down, table, activation, gate_up_bias=None, down_bias=None,
           act_params=None) -> None:
    if activation not in _ACT_CODE:
        raise ValueError(f"activation {activation!r} is not supported by the kernel; choose one of "
                         f"{KERNEL_ACTIVATIONS}")
    if (activation == OAI) != (act_params is not None):
        raise ValueError(f"act_params (alpha, limit) go with activation {OAI!r} and only with it; got "
                         f"{activation!r} and {act_params!r}")
    if hidden.dim() != 2 or ids.dim() != 2 or weights.shape != ids.shape or ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"expected hidden [T, H], ids [T, k], weights [T, k]; got {tuple(hidden.shape)}, "
                         f"{tuple(ids.shape)}, {tuple(weights.shape)}")
    if type(gate_up) is not type(down) and (isinstance(gate_up, Stack) or isinstance(down, Stack)):
        raise ValueError("gate_up and down must both be compressed (QuantizedStack), both pre-quantized "
                         "(PrequantStack) or both plain tensors")
    if isinstance(gate_up, Stack) and gate_up.fmt != down.fmt:
        raise ValueError(f"gate_up and down must share one compression format, got {gate_up.fmt} and {down.fmt}")
    s1, i2, h1, dt1 = _geometry(gate_up)
    s2, h2, i1, dt2 = _geometry(down)
    H = hidden.shape[1]
    if s1 != s2 or i2 % 2 or h1 != H or (h2, i1) != (H, i2 // 2):
        raise ValueError(f"hidden size {H} and gate_up {(s1, i2, h1)} / down {(s2, h2, i1)} do not "
                         "form gate_up [S, 2I, H], down [S, H, I]")
    if dt1 not in DTYPES or dt2 != dt1:
        raise ValueError(f"expert weights must share one of {DTYPES}; got {dt1} and {dt2}")
    if not isinstance(gate_up, Stack) and (gate_up.stride(-1) != 1 or down.stride(-1) != 1):
        raise ValueError("expert weights must be contiguous along their last dim (slot pool views are)")
    if ids.dtype.is_floating_point or table.dtype.is_floating_point or table.dim() != 1:
        raise ValueError(f"ids and table must be integer tensors, table [E]; got {ids.dtype}, {table.dtype} "
                         f"{tuple(table.shape)}")
    if (gate_up_bias is None) != (down_bias is None):
        raise ValueError("give both biases (gate_up_bias [S, 2I], down_bias [S, H]) or neither")
    if gate_up_bias is not None:
        if tuple(gate_up_bias.shape) != (s1, i2) or tuple(down_bias.shape) != (s1, H) or \
                gate_up_bias.stride(-1) != 1 or down_bias.stride(-1) != 1 or \
                not (gate_up_bias.is_floating_point() and down_bias.is_floating_point()):
            raise ValueError(f"biases must be float gate_up_bias [S, 2I] = {[s1, i2]} and down_bias [S, H] = "
                             f"{[s1, H]}, contiguous in their last dim; got {tuple(gate_up_bias.shape)}, "
                             f"{tuple(down_bias.shape)}")
    biases = () if gate_up_bias is None else (gate_up_bias, down_bias)
    devices = {t.device for t in (hidden, ids, weights, table, *biases)} | {w.device for w in (gate_up, down)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def weight_format(w) -> str:
    """How the kernel reads a slot pool weight: "plain" or its format ("int4-g64", "mxfp4", "fp8-b128",
    "gptq-int4-g128", "awq-int4-g128"), for the log and `kernel_name`."""
    return str(w.fmt) if isinstance(w, Stack) else "plain"


def _kernel_weights(w) -> tuple:
    """(FMT code, GROUP, (weight, scale, zero, g_idx) pointers, 10 strides: weight (slot, n, k), scale (slot, n,
    k), zero (slot, n, k), g_idx (slot)) kernel arguments of a view or a stack; pointers a format does not have
    alias the weight, with stride 0."""
    if isinstance(w, torch.Tensor):
        return 0, 16, (w, w, w, w), (w.stride(0), w.stride(1), w.stride(2), 0, 0, 0, 0, 0, 0, 0)
    if isinstance(w, QuantizedStack):
        q, scale = w.qweight, w.qscale
        if w.fmt.scheme == "int8":
            return 1, 16, (q, scale, q, q), (*q.stride(), scale.stride(0), scale.stride(1), 0, 0, 0, 0, 0)
        zero = w.qzero
        return 2, w.fmt.group_size, (q, scale, zero, q), (*q.stride(), *scale.stride(), *zero.stride(), 0)
    p, kind = w.parts, w.fmt.kind
    if kind == "mxfp4":
        blocks, scales = p["_blocks"], p["_scales"]  # [S, N, K/32, 16], [S, N, K/32]
        if blocks.stride(2) != 16:
            raise ValueError("MXFP4 blocks must be contiguous over their last two dims (slot views are)")
        return 3, 32, (blocks, scales, blocks, blocks), (blocks.stride(0), blocks.stride(1), 1, *scales.stride(),
                                                         0, 0, 0, 0)
    if kind == "fp8":
        q, scale = p[""].view(torch.uint8), p["_scale_inv"]  # e4m3 [S, N, K] read as bytes, [S, N/B, K/B]
        return 4, w.fmt.block, (q, scale, q, q), (*q.stride(), *scale.stride(), 0, 0, 0, 0)
    q, zeros, scales = p[".qweight"], p[".qzeros"], p[".scales"]  # GPTQ [S, K/8, N], AWQ [S, K, N/8]; [S, K/G, ...]
    # stride order (slot, n, k): these parts are [S, k-ish, n-ish]
    strides = (q.stride(0), q.stride(2), q.stride(1), scales.stride(0), scales.stride(2), scales.stride(1),
               zeros.stride(0), zeros.stride(2), zeros.stride(1))
    if kind == "gptq-int4":
        g_idx = p[".g_idx"]  # [S, K]
        return 5, w.fmt.block, (q, scales, zeros, g_idx), (*strides, g_idx.stride(0))
    return 6, w.fmt.block, (q, scales, zeros, q), (*strides, 0)


def fused_experts(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor | QuantizedStack,
    down: torch.Tensor | QuantizedStack,
    table: torch.Tensor,
    activation: str = "silu",
    config: MoEKernelConfig | None = None,
    *,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    act_params: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Routed experts of one MoE layer with the Triton kernel (see `experts_reference` for the math).

    Args:
        hidden: [T, H] hidden states (cast to the weights' dtype).
        ids: [T, k] expert ids; negative ids contribute nothing.
        weights: [T, k] routing weights.
        gate_up: [S, 2I, H] slot pool view, rows gate then up; any stride over S, contiguous last dim. Or a
            `QuantizedStack` of S compressed [2I, H] matrices (a compressed pool), or a `PrequantStack` of them
            in a publisher's format (MXFP4, FP8-b, GPTQ / AWQ int4): read as they are, dequantized in registers.
        down: [S, H, I] slot pool view, or a stack of [H, I] matrices (the same format as gate_up).
        table: [E] expert -> slot (the layer's row of the cache table), -1 = absent (contributes nothing).
        activation: "silu", "gelu" or "gelu_tanh" (gate rows then up rows), or "swiglu_oai": gpt-oss's clamped
            SwiGLU, gate and up rows interleaved (gpt-oss's [in, out] experts given as [out, in] stacks: a
            publisher's format).
        config: launch configuration; default from `launch_configs(device)` for this shape and T.
        gate_up_bias: [S, 2I] bias of each slot's gate_up rows (gpt-oss), or None.
        down_bias: [S, H] bias of each slot's down, added once per routed pair before its routing weight.
        act_params: (alpha, limit) of "swiglu_oai" (gpt-oss's `swiglu_alpha`, `swiglu_limit`).

    Returns:
        [T, H] in hidden's dtype.

    Raises:
        ValueError: shapes, dtypes, strides or devices that do not fit the contract above.
        RuntimeError: Triton cannot run on this device (CPU without TRITON_INTERPRET=1, or no triton).
    """
    _check(hidden, ids, weights, gate_up, down, table, activation, gate_up_bias, down_bias, act_params)
    if not triton_runs_on(hidden.device):
        raise RuntimeError(f"the Triton kernel cannot run on {hidden.device} here (CUDA, or CPU with "
                           "TRITON_INTERPRET=1); use specmoe.kernels.moe_experts for the automatic fallback")
    T, H = hidden.shape
    k = ids.shape[1]
    S, inter2, _, wdtype = _geometry(gate_up)
    inter = inter2 // 2
    P = T * k
    if config is None:
        config = launch_configs(hidden.device).config_for(shape_key(wdtype, H, inter, k), T)
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)  # [T, H]
    if P == 0:
        return out.to(hidden.dtype)
    x = hidden.to(wdtype).contiguous()  # [T, H]
    flat = ids.reshape(-1)
    if config.block_t == 1:
        block_expert = flat.to(torch.int32)  # [P]: pair m is block m
        pairs = block_expert  # not read
    else:
        pairs, block_expert = align_pairs(flat, table.numel(), config.block_t)
    rw = weights.reshape(-1).contiguous()  # [P]
    dot_f32 = wdtype == torch.float32 or (interpreting() and wdtype == torch.bfloat16)
    fmt, group, (w1, s1, z1, g1), w1_strides = _kernel_weights(gate_up)
    _, _, (w2, s2, z2, g2), w2_strides = _kernel_weights(down)
    grid = (block_expert.numel(), triton.cdiv(inter, config.block_i))
    has_bias = gate_up_bias is not None
    b1, b2 = (gate_up_bias, down_bias) if has_bias else (x, x)  # not read without biases
    alpha, limit = (float(v) for v in act_params) if act_params is not None else (0.0, 0.0)
    _fused_experts_kernel[grid](
        x, out, w1, w2, s1, z1, g1, s2, z2, g2, b1, b2, table.contiguous(), pairs, block_expert, rw,
        H, inter, P, k, alpha, limit,
        x.stride(0), out.stride(0),
        *w1_strides, *w2_strides, b1.stride(0) if has_bias else 0, b2.stride(0) if has_bias else 0,
        ACT=_ACT_CODE[activation], HAS_BIAS=has_bias, FMT=fmt, GROUP=group, DOT_F32=dot_f32,
        BLOCK_T=config.block_t, BLOCK_K=config.block_k, BLOCK_I=config.block_i, BLOCK_H=config.block_h,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out.to(hidden.dtype)


def moe_experts(hidden, ids, weights, gate_up, down, table, activation: str = "silu",
                config: MoEKernelConfig | None = None, **gate) -> torch.Tensor:
    """`fused_experts` where Triton runs on the tensors' device, else the PyTorch reference (logged once);
    gate_up/down may be compressed (`QuantizedStack`) or pre-quantized (`PrequantStack`).

    Same arguments (`gate`: gate_up_bias, down_bias, act_params), result and errors as `fused_experts` (minus
    the RuntimeError).
    """
    if triton_runs_on(hidden.device):
        return fused_experts(hidden, ids, weights, gate_up, down, table, activation, config, **gate)
    _check(hidden, ids, weights, gate_up, down, table, activation, **gate)
    if hidden.device.type not in _WARNED:
        _WARNED.add(hidden.device.type)
        logger.info("Triton cannot run on %s here (set TRITON_INTERPRET=1 to interpret it on CPU); the fused "
                    "experts use the PyTorch reference", hidden.device)
    return experts_reference(hidden, ids, weights, gate_up, down, table, activation, **gate)


_WARNED: set[str] = set()

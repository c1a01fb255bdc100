"""Experts as their publishers ship them: MXFP4 (gpt-oss), block-scaled FP8 (DeepSeek-V3, Qwen3-FP8), GPTQ
and AWQ int4, the tensors of one matrix in each format, and the PyTorch reference that dequantizes them.

Unlike `quant.py` (formats specmoe makes itself from bf16 experts), these formats arrive from a checkpoint; the
runtime keeps their bytes as published in the host store, over PCIe and in the slots. The fused experts kernel
reads a slot pool's parts as they are (`PrequantStack`) and dequantizes in registers; elsewhere they are
dequantized on use with the references below.
A matrix W [N, K] (N output channels, K input channels: `y = x @ W.T`) is held as:

* ``mxfp4`` (transformers' integrations/mxfp4.py, gpt-oss): ``_blocks`` uint8 [N, K/32, 16] (two e2m1 codes per
  byte, even column in the low nibble) and ``_scales`` uint8 [N, K/32] (e8m0: 2**(s - 127) per 32 values).
* ``fp8-b128`` (integrations/finegrained_fp8.py, `weight_block_size` [128, 128]): the weight itself as
  float8_e4m3fn [N, K] and ``_scale_inv`` float32 [ceil(N/128), ceil(K/128)]; W = w * scale_inv per block.
* ``gptq-int4-g128`` (GPTQ, `checkpoint_format` "gptq", `sym` either): ``.qweight`` int32 [K/8, N] (eight 4-bit
  codes per int32 along K, lowest nibble first), ``.qzeros`` int32 [K/G, N/8] (packed along N, stored minus 1),
  ``.scales`` float16 [K/G, N], ``.g_idx`` int32 [K]; W.T[k, n] = (q[k, n] - z[g_idx[k], n] - 1) * s[g_idx[k], n].
  Act-order (`desc_act`): g_idx is any map of columns to groups, read as it is.
* ``awq-int4-g128`` (AutoAWQ's GEMM layout, `version` "gemm", `zero_point` true): ``.qweight`` int32 [K, N/8]
  and ``.qzeros`` int32 [K/G, N/8], both packed along N in AWQ's order (nibble i of a word holds column
  8 c + AWQ_ORDER[i]), ``.scales`` float16 [K/G, N]; W.T[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n].
  `awq_to_gptq` rewrites these parts as GPTQ's (g_idx = k // G) without loss: the dequantized W is the same
  bits. A checkpoint's AWQ experts are stored so (`runtime.loading`), and both kernels read GPTQ's layout.

The names are suffixes of the matrix's own name (``gate_up_proj_blocks``, ``down_proj_scale_inv``,
``gate_up_proj.qweight``).
"""

# Shape legend: N rows (output channels), K columns (input channels), G group size, B FP8 block

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32
KINDS = ("mxfp4", "fp8", "gptq-int4", "awq-int4")
SUFFIXES = {"mxfp4": ("_blocks", "_scales"), "fp8": ("", "_scale_inv"),
            "gptq-int4": (".qweight", ".qzeros", ".scales", ".g_idx"), "awq-int4": (".qweight", ".qzeros", ".scales")}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's WQLinear_GEMM packing: nibble i <- column AWQ_ORDER[i] of 8
AWQ_SHIFT = tuple(4 * AWQ_ORDER.index(c) for c in range(8))  # column c of 8 -> its nibble's bit shift


@dataclass(frozen=True)
class PrequantFormat:
    """A publisher's expert format.

    Args:
        kind: "mxfp4", "fp8" (block-scaled e4m3), "gptq-int4" or "awq-int4".
        block: FP8 scale block (square, `weight_block_size`), or GPTQ / AWQ `group_size`; ignored for MXFP4.
    """

    kind: str
    block: int = 128

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"pre-quantized format must be one of {KINDS}, got {self.kind!r}")
        if not (isinstance(self.block, int) and self.block >= 8):
            raise ValueError(f"block/group size must be an int >= 8, got {self.block!r}")

    def __str__(self) -> str:
        return {"mxfp4": "mxfp4", "fp8": f"fp8-b{self.block}", "gptq-int4": f"gptq-int4-g{self.block}",
                "awq-int4": f"awq-int4-g{self.block}"}[self.kind]

    @classmethod
    def parse(cls, text: str) -> "PrequantFormat | None":
        """'mxfp4', 'fp8-b128', 'gptq-int4-g128', 'awq-int4-g128' -> a format; any other text (bf16, ...) -> None."""
        text = str(text)
        if text == "mxfp4":
            return cls("mxfp4", MXFP4_BLOCK)
        for kind, sep in (("fp8", "-b"), ("gptq-int4", "-g"), ("awq-int4", "-g")):
            if text == kind or text.startswith(kind + sep):
                rest = text[len(kind) + len(sep):]
                try:
                    return cls(kind, int(rest) if rest else 128)
                except ValueError:
                    raise ValueError(f"cannot read expert format {text!r}; write e.g. '{kind}{sep}128'") from None
        return None

    @classmethod
    def from_quantization_config(cls, qc: dict | None) -> "PrequantFormat | None":
        """The format of a config.json `quantization_config` (None when absent).

        Raises:
            ValueError: a quantization method or setting specmoe does not read (named in the message).
        """
        if not qc:
            return None
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        method = str(qc.get("quant_method", "")).lower()
        if method == "mxfp4":
            return cls("mxfp4", MXFP4_BLOCK)
        if method == "fp8":
            block = qc.get("weight_block_size") or [128, 128]
            if len(block) != 2 or block[0] != block[1]:
                raise ValueError(f"FP8 weight_block_size {block} is not square; specmoe reads [B, B] blocks")
            if qc.get("activation_scheme", "dynamic") != "dynamic":
                raise ValueError("FP8 with static activation scales is not supported; specmoe reads "
                                 "activation_scheme 'dynamic' (DeepSeek-V3, Qwen3-FP8)")
            return cls("fp8", int(block[0]))
        if method == "gptq":
            if qc.get("bits", 4) != 4:
                raise ValueError(f"GPTQ with {qc.get('bits')} bits is not supported; specmoe reads 4-bit GPTQ")
            if qc.get("checkpoint_format", "gptq") not in ("gptq", None):
                raise ValueError(f"GPTQ checkpoint_format {qc.get('checkpoint_format')!r} is not supported; "
                                 "specmoe reads 'gptq'")
            group = qc.get("group_size", 128)
            if not isinstance(group, int) or group < 8:
                raise ValueError(f"GPTQ group_size {group!r} is not supported; specmoe reads group sizes >= 8 "
                                 "(not -1, per-channel)")
            return cls("gptq-int4", group)
        if method == "awq":
            if qc.get("bits", qc.get("w_bit", 4)) != 4:
                raise ValueError(f"AWQ with {qc.get('bits')} bits is not supported; specmoe reads 4-bit AWQ")
            version = str(qc.get("version", "gemm")).lower()
            if version != "gemm":
                raise ValueError(f"AWQ version {version!r} is not supported; specmoe reads AutoAWQ's 'gemm' layout")
            if not qc.get("zero_point", True):
                raise ValueError("AWQ without zero points (zero_point false) is not supported; specmoe reads "
                                 "zero_point true")
            group = qc.get("group_size", qc.get("q_group_size", 128))
            if not isinstance(group, int) or group < 8:
                raise ValueError(f"AWQ group_size {group!r} is not supported; specmoe reads group sizes >= 8")
            return cls("awq-int4", group)
        raise ValueError(f"quantization method {method!r} is not supported for experts; specmoe reads mxfp4, "
                         "fp8 (block-scaled), gptq and awq (4-bit)")

    # ---- layout --------------------------------------------------------------------------------------
    @property
    def suffixes(self) -> tuple[str, ...]:
        """The part names' suffixes, in `parts` order."""
        return SUFFIXES[self.kind]

    def parts(self, n: int, k: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The tensors of one W [N, K]: suffix -> (shape, dtype).

        Raises:
            ValueError: a matrix this format cannot hold (K not a multiple of the block / pack width).
        """
        if self.kind == "mxfp4":
            if k % MXFP4_BLOCK:
                raise ValueError(f"MXFP4 needs K a multiple of {MXFP4_BLOCK}, got [{n}, {k}]")
            return {"_blocks": ((n, k // MXFP4_BLOCK, 16), torch.uint8), "_scales": ((n, k // MXFP4_BLOCK), torch.uint8)}
        if self.kind == "fp8":
            b = self.block
            return {"": ((n, k), torch.float8_e4m3fn), "_scale_inv": ((math.ceil(n / b), math.ceil(k / b)), torch.float32)}
        g = self.block
        name = "GPTQ" if self.kind == "gptq-int4" else "AWQ"
        if k % g or k % 8 or n % 8:
            raise ValueError(f"{name} int4 needs K a multiple of the group size {g} and of 8, N of 8; got [{n}, {k}]")
        if self.kind == "awq-int4":
            return {".qweight": ((k, n // 8), torch.int32), ".qzeros": ((k // g, n // 8), torch.int32),
                    ".scales": ((k // g, n), torch.float16)}
        return {".qweight": ((k // 8, n), torch.int32), ".qzeros": ((k // g, n // 8), torch.int32),
                ".scales": ((k // g, n), torch.float16), ".g_idx": ((k,), torch.int32)}

    def values(self, suffix: str, shape: tuple[int, ...]) -> int:
        """Weight values a part holds (0 for scales, zeros and indices): the parameter count of the matrix."""
        numel = math.prod(shape)
        return {"_blocks": 2 * numel, ".qweight": 8 * numel, "": numel}.get(suffix, 0)

    # ---- reference dequantization --------------------------------------------------------------------
    def dequantize(self, parts: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in `dtype` from one matrix's parts (suffix -> tensor), or [M, N, K] from parts with a
        leading dim M (a stack of experts)."""
        if self.kind == "mxfp4":
            return dequantize_mxfp4(parts["_blocks"], parts["_scales"], dtype)
        if self.kind == "fp8":
            return dequantize_fp8(parts[""], parts["_scale_inv"], self.block, dtype)
        if self.kind == "awq-int4":
            return dequantize_awq(parts[".qweight"], parts[".qzeros"], parts[".scales"], self.block, dtype)
        return dequantize_gptq(parts[".qweight"], parts[".qzeros"], parts[".scales"], parts[".g_idx"], dtype)


@dataclass(frozen=True, eq=False)
class PrequantStack:
    """S matrices [N, K] in a publisher's format: one weight of every slot of a pre-quantized slot pool (views of
    the slots, no copy), as the fused experts kernel reads them (`kernels.experts_kernel`).

    Args:
        fmt: the format.
        shape: (N, K) of one matrix (the model's [out, in] weight).
        dtype: what they dequantize to (the model's expert dtype).
        parts: suffix -> [S, *part shape] (`fmt.parts`), each contiguous in its last dim.

    Raises:
        ValueError: parts of other shapes or dtypes than `fmt.parts(N, K)` gives.
    """

    fmt: PrequantFormat
    shape: tuple[int, int]
    dtype: torch.dtype
    parts: dict

    def __post_init__(self):
        want = self.fmt.parts(*self.shape)
        if set(want) != set(self.parts):
            raise ValueError(f"{self.fmt} needs parts {sorted(want)}, got {sorted(self.parts)}")
        s = self.num
        for sfx, (shape, dt) in want.items():
            t = self.parts[sfx]
            if tuple(t.shape) != (s, *shape) or t.dtype != dt or t.stride(-1) != 1:
                raise ValueError(f"part {sfx!r} of {s} {tuple(self.shape)} matrices in {self.fmt} should be {dt} "
                                 f"{(s, *shape)} contiguous in its last dim; got {t.dtype} {tuple(t.shape)}")

    @property
    def num(self) -> int:
        return next(iter(self.parts.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.parts.values())).device

    def dequantize(self, index=None) -> torch.Tensor:
        """Matrix `index` (int) -> [N, K], a [n] tensor of slots -> [n, N, K], None -> [S, N, K], in `dtype`
        (the PyTorch reference)."""
        parts = self.parts if index is None else {k: v[index] for k, v in self.parts.items()}
        return self.fmt.dequantize(parts, self.dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """blocks uint8 [..., N, K/32, 16], scales uint8 [..., N, K/32] -> W [..., N, K] (transformers'
    `_convert_moe_packed_tensors` before its transpose)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.uint8)
    vals = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1).flatten(-2)  # [..., N, G, 32]
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1).float())
    return vals.flatten(-2).to(dtype)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: int, dtype=torch.float32) -> torch.Tensor:
    """weight e4m3 [..., N, K], scale_inv [..., ceil(N/B), ceil(K/B)] -> W [..., N, K]."""
    n, k = weight.shape[-2:]
    s = scale_inv.float().repeat_interleave(block, -2)[..., :n, :].repeat_interleave(block, -1)[..., :k]
    return (weight.float() * s).to(dtype)


def dequantize_gptq(qweight, qzeros, scales, g_idx, dtype=torch.float32) -> torch.Tensor:
    """GPTQ int4 (see the module docstring) -> W [..., N, K]."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = (qweight.unsqueeze(-2) >> shifts.view(-1, 1)).bitwise_and_(0xF)  # [..., K/8, 8, N]
    q = q.flatten(-3, -2)  # [..., K, N]
    z = ((qzeros.unsqueeze(-1) >> shifts) & 0xF).flatten(-2).add_(1)  # [..., K/G, N] zero points
    k, n, groups = q.shape[-2], q.shape[-1], z.shape[-2]
    if k % groups == 0 and torch.equal(g_idx, _sorted_g_idx(k, k // groups, g_idx)):  # k // G: groups as a view
        w = q.view(*q.shape[:-2], groups, k // groups, n).sub_(z.unsqueeze(-2)).float()  # [..., K/G, G, N]
        w = w.mul_(scales.unsqueeze(-2)).view(*q.shape)
    elif g_idx.dim() == 1:  # one matrix (one g_idx): rows of the groups, without an index of every element
        g = g_idx.long()
        w = q.sub_(z.index_select(-2, g)).float().mul_(scales.index_select(-2, g))  # [..., K, N]
    else:
        g = g_idx.long().unsqueeze(-1).expand(*g_idx.shape, q.shape[-1])  # [..., K, N]: each column's group
        w = q.sub_(z.gather(-2, g)).float().mul_(scales.gather(-2, g))
    return w.transpose(-1, -2).to(dtype)


def _sorted_g_idx(k: int, group: int, like: torch.Tensor) -> torch.Tensor:
    """k // group for k < K, shaped and placed as `like` (GPTQ's g_idx without act-order)."""
    return (torch.arange(k, dtype=like.dtype, device=like.device) // group).expand_as(like)


def quantize_gptq(w: torch.Tensor, group: int = 128, g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """W [N, K] float -> GPTQ int4 parts (asymmetric, round-to-nearest per group): what a GPTQ checkpoint holds,
    for tests and tiny checkpoints (not GPTQ's error-compensating solver). `g_idx` [K]: each column's group
    (act-order: any map with `group` columns per group); default column // group."""
    n, k = w.shape
    g_idx = torch.arange(k, dtype=torch.int32) // group if g_idx is None else g_idx.to(torch.int32).clone()
    wt = w.float().T  # [K, N]
    index = g_idx.long()[:, None].expand(k, n)
    lo = torch.full((k // group, n), float("inf")).scatter_reduce(0, index, wt, "amin")  # [K/G, N]
    hi = torch.full((k // group, n), float("-inf")).scatter_reduce(0, index, wt, "amax")
    scale = ((hi - lo) / 15).clamp_min(1e-8).half()
    zero = (-lo / scale.float()).round().clamp(1, 15)  # stored minus 1: >= 1 keeps the stored value >= 0
    q = (wt / scale.float()[g_idx.long()] + zero[g_idx.long()]).round().clamp(0, 15).to(torch.int32)  # [K, N]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    qweight = (q.reshape(k // 8, 8, n) << shifts.view(1, 8, 1)).sum(1, dtype=torch.int32)
    zs = (zero.to(torch.int32) - 1).reshape(k // group, n // 8, 8)
    qzeros = (zs << shifts).sum(-1, dtype=torch.int32)
    return {".qweight": qweight, ".qzeros": qzeros, ".scales": scale, ".g_idx": g_idx}


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., R, N/8] packed in AWQ's order -> codes int32 [..., R, N]."""
    shifts = torch.tensor(AWQ_SHIFT, device=packed.device, dtype=torch.int32)
    return (packed.unsqueeze(-1) >> shifts).bitwise_and_(0xF).flatten(-2)


def dequantize_awq(qweight, qzeros, scales, group: int, dtype=torch.float32) -> torch.Tensor:
    """AWQ GEMM int4 (see the module docstring) -> W [..., N, K]."""
    q = _unpack_awq(qweight)  # [..., K, N]
    k, n = q.shape[-2:]
    q = q.view(*q.shape[:-2], k // group, group, n).sub_(_unpack_awq(qzeros).unsqueeze(-2))  # [..., K/G, G, N]
    w = q.float().mul_(scales.float().unsqueeze(-2)).view(*q.shape[:-3], k, n)  # [..., K, N]
    return w.transpose(-1, -2).to(dtype)


def awq_to_gptq(parts: dict[str, torch.Tensor], group: int) -> dict[str, torch.Tensor]:
    """AWQ GEMM int4 parts (``.qweight`` [..., K, N/8], ``.qzeros`` [..., K/G, N/8], ``.scales`` [..., K/G, N])
    -> GPTQ int4 parts (``.qweight`` [..., K/8, N], ``.qzeros``, ``.scales``, ``.g_idx`` [..., K] = k // G) of
    the same W, without loss: ``dequantize_gptq`` of the result equals ``dequantize_awq`` of the input, bit for
    bit (up to the sign of a zero).

    The codes are re-packed along K, the zeros in sequential order. GPTQ stores zero - 1 in a nibble, so it holds
    zeros 1..16 and AWQ's are 0..15: a (group, column) whose AWQ zero is 0 is written negated, code 15 - q, zero
    15, scale -s, since (q - 0) s = ((15 - q) - 15) (-s) exactly (fp16 negation and small integers are exact).
    """
    qweight, qzeros, s = parts[".qweight"], parts[".qzeros"], parts[".scales"]
    k, n = qweight.shape[-2], 8 * qweight.shape[-1]
    if k % group or k % 8 or qzeros.shape[-2] * group != k:
        raise ValueError(f"AWQ parts of K = {k} do not form groups of {group} (qzeros {tuple(qzeros.shape)})")
    z = _awq_codes(qzeros)  # uint8 [..., K/G, N]
    flip = z == 0
    step = max(1, 2**16 // (group * n))  # groups per chunk: the scratch of the codes stays ~64K codes a matrix
    out = torch.empty(*qweight.shape[:-2], k // 8, n, dtype=torch.int32, device=qweight.device)  # [..., K/8, N]
    for g0 in range(0, k // group, step):  # K in chunks of whole groups: [..., rows, N] codes each
        q = _awq_codes(qweight[..., g0 * group:(g0 + step) * group, :])
        q = q.view(*q.shape[:-2], -1, group, n)  # [..., g, G, N]
        q = torch.where(flip[..., g0:g0 + step, :].unsqueeze(-2), 15 - q, q).view(*q.shape[:-3], -1, 4, 2, n)
        out[..., g0 * group // 8:(g0 + step) * group // 8, :] = _words(q[..., 0, :] | (q[..., 1, :] << 4), -2)
    z = torch.where(flip, 14, z - 1).view(*z.shape[:-1], n // 8, 4, 2)  # stored zero - 1, [..., K/G, N/8, 4, 2]
    return {".qweight": out,  # [..., rows/8, 4, N] bytes of each chunk -> [..., rows/8, N] words
            ".qzeros": _words(z[..., 0] | (z[..., 1] << 4), -1),  # [..., K/G, N/8]
            ".scales": torch.where(flip, -s, s),
            ".g_idx": _sorted_g_idx(k, group, torch.empty(*s.shape[:-2], k, dtype=torch.int32, device=s.device))
            .contiguous()}


def _awq_codes(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., R, N/8] packed in AWQ's order -> codes uint8 [..., R, N] (a byte per code: the conversion's
    scratch stays a quarter of int32 codes')."""
    b = packed.contiguous().view(torch.uint8).view(*packed.shape, 4)  # little-endian: byte j = nibbles 2j, 2j+1
    nibbles = torch.stack((b & 15, b >> 4), dim=-1).flatten(-2)  # [..., R, N/8, 8] in nibble order
    return nibbles[..., [s // 4 for s in AWQ_SHIFT]].flatten(-2)  # column c of 8 from its nibble


def _words(nibble_pairs: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 bytes with the 4 bytes of each int32 along `dim` (low byte first) -> int32 with that dim gone."""
    b = nibble_pairs.movedim(dim, -1).contiguous()  # [..., 4]
    return b.view(torch.int32).squeeze(-1)


def quantize_awq(w: torch.Tensor, group: int = 128) -> dict[str, torch.Tensor]:
    """W [N, K] float -> AWQ GEMM int4 parts as AutoAWQ's `WQLinear_GEMM.from_linear` packs them (asymmetric,
    round-to-nearest per group; not AWQ's activation-aware scale search)."""
    n, k = w.shape
    wt = w.float().T.reshape(k // group, group, n)  # [K/G, G, N]
    lo, hi = wt.amin(1), wt.amax(1)
    scale = ((hi - lo) / 15).clamp_min(1e-8).half()
    zero = (-lo / scale.float()).round().clamp(0, 15)  # [K/G, N]
    q = (wt / scale.float().unsqueeze(1) + zero.unsqueeze(1)).round().clamp(0, 15).to(torch.int32).reshape(k, n)

    def pack(x: torch.Tensor) -> torch.Tensor:  # [R, N] codes -> [R, N/8], column 8c + AWQ_ORDER[i] in nibble i
        cols = x.reshape(x.shape[0], n // 8, 8)[..., list(AWQ_ORDER)]
        return (cols << torch.arange(0, 32, 4, dtype=torch.int32)).sum(-1, dtype=torch.int32)

    return {".qweight": pack(q), ".qzeros": pack(zero.to(torch.int32)), ".scales": scale}


def quantize_fp8(w: torch.Tensor, block: int = 128) -> dict[str, torch.Tensor]:
    """W [N, K] float -> block-scaled e4m3 parts (absmax / 448 per block), as DeepSeek-V3's checkpoints hold."""
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.reshape(nb, block, kb, block)
    scale = (blocks.abs().amax((1, 3)) / 448.0).clamp_min(1e-12)  # [nb, kb]
    q = (blocks / scale[:, None, :, None]).reshape(nb * block, kb * block)[:n, :k].to(torch.float8_e4m3fn)
    return {"": q, "_scale_inv": scale}


def quantize_mxfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """W [N, K] float -> MXFP4 parts (nearest e2m1 code after a power-of-two scale per 32 values)."""
    n, k = w.shape
    g = w.float().reshape(n, k // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = g.abs().amax(-1).clamp_min(2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # largest |value| maps to <= 6
    scaled = g / torch.exp2(exp).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES)
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)  # [N, G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return {"_blocks": blocks, "_scales": (exp + 127).to(torch.uint8)}


def quantize(w: torch.Tensor, fmt: PrequantFormat) -> dict[str, torch.Tensor]:
    """W [N, K] -> the parts of `fmt` (the publishers' own quantizers do better; these make test checkpoints)."""
    if fmt.kind == "mxfp4":
        return quantize_mxfp4(w)
    if fmt.kind == "fp8":
        return quantize_fp8(w, fmt.block)
    if fmt.kind == "awq-int4":
        return quantize_awq(w, fmt.block)
    return quantize_gptq(w, fmt.block)

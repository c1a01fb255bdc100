"""Compressed expert weights: int8 per-channel and int4 group-wise, quantized on the host and kept compressed in
the cache slots; the fused experts kernel dequantizes them in registers (`QuantizedStack` is how it receives a
compressed pool), and `dequantize` is the PyTorch reference (also a Triton dequantize kernel, `dequantize_into`).

A matrix W [N, K] (the stored 2-D weight; rows are output channels for transformers' [out, in] weights) is
held as:

* ``int8``: qweight int8 [N, K] and qscale float32 [N]; W ~ qweight * qscale (symmetric, absmax / 127).
* ``int4``: K is padded to Kp, a multiple of the group size G (repeating the last column); qweight uint8
  [N, Kp/2] packs two 4-bit codes per byte (even column in the low nibble), qscale and qzero float16
  [N, Kp/G]; W ~ code * qscale + qzero (asymmetric, codes 0..15, qzero is the group's minimum).

Only floating 2-D tensors are compressed; biases and other tensors stay as they are.
"""

# Shape legend: N rows (output channels), K columns (input channels), Kp padded K, G group size

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .jit import jit, triton_runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

logger = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
SUFFIXES = (".qweight", ".qscale", ".qzero")


@dataclass(frozen=True)
class QuantFormat:
    """How expert matrices are compressed.

    Args:
        scheme: "int8" (per output channel, symmetric) or "int4" (group-wise along K, asymmetric).
        group_size: G, columns per int4 group (a power of two >= 16; ignored for int8).
    """

    scheme: str = "int8"
    group_size: int = 64

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"compression scheme must be one of {SCHEMES}, got {self.scheme!r}")
        g = self.group_size
        if not (isinstance(g, int) and g >= 16 and g & (g - 1) == 0):
            raise ValueError(f"group_size must be a power of two >= 16 (e.g. 64 or 128), got {g!r}")

    @classmethod
    def parse(cls, text: str) -> "QuantFormat":
        """'int8', 'int4' or 'int4-g128'."""
        scheme, _, group = str(text).partition("-g")
        try:
            return cls(scheme, int(group)) if group else cls(scheme)
        except ValueError as err:
            raise ValueError(f"cannot read compression {text!r}: {err}; write 'int8', 'int4' or 'int4-g128'") from None

    def __str__(self) -> str:
        return self.scheme if self.scheme == "int8" else f"int4-g{self.group_size}"

    def padded(self, k: int) -> int:
        return -(-k // self.group_size) * self.group_size

    def parts(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The compressed tensors of one [N, K] matrix: suffix -> (shape, dtype)."""
        n, k = shape
        if self.scheme == "int8":
            return {".qweight": ((n, k), torch.int8), ".qscale": ((n,), torch.float32)}
        kp = self.padded(k)
        groups = kp // self.group_size
        return {".qweight": ((n, kp // 2), torch.uint8), ".qscale": ((n, groups), torch.float16),
                ".qzero": ((n, groups), torch.float16)}


def compressible(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    return len(shape) == 2 and dtype.is_floating_point and shape[0] > 0 and shape[1] > 0


def quantize(w: torch.Tensor, fmt: QuantFormat) -> dict[str, torch.Tensor]:
    """Compress one matrix w [N, K]. Returns {suffix: tensor} as described by `fmt.parts`."""
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D matrix, got shape {tuple(w.shape)}")
    w32 = w.detach().float()
    n, k = w32.shape
    if fmt.scheme == "int8":
        scale = w32.abs().amax(dim=1) / 127.0  # [N]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # [N, K]
        return {".qweight": q, ".qscale": scale}
    G = fmt.group_size
    kp = fmt.padded(k)
    if kp > k:
        w32 = torch.cat([w32, w32[:, -1:].expand(n, kp - k)], dim=1)  # [N, Kp]
    groups = w32.view(n, kp // G, G)  # [N, Kp/G, G]
    lo, hi = groups.amin(-1), groups.amax(-1)  # [N, Kp/G]
    scale = ((hi - lo) / 15.0).clamp_min(1e-7).half()
    zero = lo.half()
    codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15)
    codes = codes.to(torch.uint8).view(n, kp)  # [N, Kp]
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # [N, Kp/2]
    return {".qweight": packed, ".qscale": scale, ".qzero": zero}


def dequantize(parts: dict[str, torch.Tensor], fmt: QuantFormat, shape: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """The PyTorch reference: rebuild the [..., N, K] matrices in `dtype` from `quantize`'s parts (any leading
    dims, e.g. a stack of slots [n, N, K])."""
    n, k = shape
    q = parts[".qweight"]
    if fmt.scheme == "int8":
        return (q.float() * parts[".qscale"].float()[..., None]).to(dtype)
    codes = torch.stack([q & 15, q >> 4], dim=-1).view(*q.shape[:-2], n, -1)[..., :k].float()  # [..., N, K]
    group = torch.arange(k, device=q.device) // fmt.group_size  # [K]
    scale = parts[".qscale"].float()[..., group]  # [..., N, K]
    zero = parts[".qzero"].float()[..., group]
    return (codes * scale + zero).to(dtype)


@dataclass(frozen=True)
class QuantizedStack:
    """S compressed [N, K] matrices, e.g. one weight of every slot of a compressed slot pool (views, no copy).

    Args:
        fmt: how they are compressed.
        shape: (N, K) of one matrix.
        dtype: what they dequantize to (the model's expert dtype).
        qweight: [S, N, K] int8 or [S, N, Kp/2] uint8.
        qscale: [S, N] float32 (int8) or [S, N, Kp/G] float16 (int4).
        qzero: [S, N, Kp/G] float16 (int4), None for int8.
    """

    fmt: QuantFormat
    shape: tuple[int, int]
    dtype: torch.dtype
    qweight: torch.Tensor
    qscale: torch.Tensor
    qzero: torch.Tensor | None = None

    def __post_init__(self):
        got = {".qweight": self.qweight, ".qscale": self.qscale}
        if self.qzero is not None:
            got[".qzero"] = self.qzero
        want = self.fmt.parts(tuple(self.shape))
        s = self.qweight.shape[0]
        if set(got) != set(want):
            raise ValueError(f"{self.fmt} needs parts {sorted(want)}, got {sorted(got)}")
        for sfx, (shape, dt) in want.items():
            t = got[sfx]
            if tuple(t.shape) != (s, *shape) or t.dtype != dt or t.stride(-1) != 1:
                raise ValueError(f"part {sfx} of {s} {tuple(self.shape)} matrices under {self.fmt} should be "
                                 f"{dt} {(s, *shape)} contiguous in its last dim; got {t.dtype} {tuple(t.shape)}")

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], fmt: QuantFormat, shape: tuple[int, int],
                   dtype: torch.dtype) -> "QuantizedStack":
        """From {suffix: [S, ...]} as `quantize` names them (e.g. a slot pool's views of one weight)."""
        return cls(fmt, tuple(shape), dtype, parts[".qweight"], parts[".qscale"], parts.get(".qzero"))

    @property
    def num(self) -> int:
        return self.qweight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def parts(self, index=None) -> dict[str, torch.Tensor]:
        """{suffix: part} of all matrices, or of those at `index` (an int or a [n] tensor of slots)."""
        out = {".qweight": self.qweight, ".qscale": self.qscale}
        if self.qzero is not None:
            out[".qzero"] = self.qzero
        return out if index is None else {k: v[index] for k, v in out.items()}

    def dequantize(self, index=None) -> torch.Tensor:
        """Matrix `index` (int) -> [N, K], matrices at a [n] tensor of slots -> [n, N, K], or all of them
        (None) -> [S, N, K], in `dtype` (the PyTorch reference)."""
        return dequantize(self.parts(index), self.fmt, self.shape, self.dtype)


def fake_quantize(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """w after a compress/decompress round trip, in w's dtype and shape (what the runtime computes with)."""
    return dequantize(quantize(w, fmt), fmt, tuple(w.shape), w.dtype)


@jit
def _dequant_kernel(
    q_ptr,  # int8 [N, K] or uint8 [N, Kp/2]
    scale_ptr,  # float32 [N] or float16 [N, Kp/G]
    zero_ptr,  # float16 [N, Kp/G] (int4 only)
    out_ptr,  # [N, K] in the model's dtype
    N, K, stride_qn, stride_sn, stride_on,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    if BITS == 8:
        q = tl.load(q_ptr + rows[:, None] * stride_qn + cols[None, :], mask=mask, other=0).to(tl.float32)
        s = tl.load(scale_ptr + rows, mask=rows < N, other=0.0)
        w = q * s[:, None]
    else:
        byte = tl.load(q_ptr + rows[:, None] * stride_qn + cols[None, :] // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((cols[None, :] % 2) * 4)) & 15
        g = rows[:, None] * stride_sn + cols[None, :] // GROUP
        s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + g, mask=mask, other=0.0).to(tl.float32)
        w = code.to(tl.float32) * s + z
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


_BLOCK_N, _BLOCK_K = 32, 128  # untuned; the kernel is bound by memory bandwidth


def dequantize_into(out: torch.Tensor, parts: dict[str, torch.Tensor], fmt: QuantFormat) -> None:
    """Write the dequantized matrix into `out` [N, K] (e.g. a cache slot's typed view), on out's device and
    current stream: the Triton kernel where it runs, else the PyTorch reference.

    Raises:
        ValueError: parts whose shapes do not match `out` under `fmt`.
    """
    n, k = out.shape
    want = fmt.parts((n, k))
    for suffix, (shape, dtype) in want.items():
        got = parts.get(suffix)
        if got is None or tuple(got.shape) != shape or got.dtype != dtype:
            raise ValueError(f"compressed part {suffix} should be {dtype} {shape} for a {(n, k)} matrix under "
                             f"{fmt}; got {None if got is None else (got.dtype, tuple(got.shape))}")
    if not triton_runs_on(out.device) or out.stride(1) != 1:
        out.copy_(dequantize(parts, fmt, (n, k), out.dtype))
        return
    q, scale = parts[".qweight"], parts[".qscale"]
    zero = parts.get(".qzero", scale)
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(k, _BLOCK_K))
    _dequant_kernel[grid](
        q, scale, zero, out, n, k, q.stride(0), scale.stride(0), out.stride(0),
        GROUP=fmt.group_size, BITS=8 if fmt.scheme == "int8" else 4, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
    )

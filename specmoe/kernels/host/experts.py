"""Routed experts of one MoE layer on the host CPU, read straight from the host store's bytes (`experts.cpp`).

`HostExpertsKernel` computes, for several routed experts of one layer in one call,

    out[t] = sum over pairs (t, e) with e in chosen: w[t, e] * down_e @ (act(gate_e @ x[t]) * (up_e @ x[t]))

with the weights in the store's format: plain fp32 / bf16 / fp16 [N, K] matrices, the compressed parts
`specmoe.kernels.quant` writes (int8 per row, int4 group-wise), or a publisher's parts as its checkpoint holds
them (`specmoe.kernels.prequant`: MXFP4, block-scaled FP8, GPTQ int4 with g_idx; `prequant_matrix`). Biases
(gpt-oss) are added where given, and gpt-oss's clamped SwiGLU ("swiglu_oai": gate/up rows interleaved,
`act_params` (alpha, limit)) is one of the activations. Nothing is dequantized into memory and nothing
the size of a weight is allocated per call (scratch for activations is kept and grown). Multi-threaded over
output rows (OpenMP, `threads`); the GIL is released during the call. Layout: gate_up [2I, H] (gate rows then
up rows, as transformers' fused experts), down [H, I], SiLU / GELU / GELU-tanh (`ACTIVATIONS`).

Activations are float32 (exact: the dequantized expert's output to float rounding) unless a call asks for
``activations="int8"`` (`HOST_ACTIVATIONS`; MXFP4 only, `INT8_FORMATS`): then each token's x and each pair's
SwiGLU output are rounded to int8 with one scale per 32 columns (d = max|v| / 127, each value off by at most
d / 2) and multiplied with the MXFP4 codes as int8 (llama.cpp's MXFP4 x Q8_0): faster, and not exact.
"""

# Shape legend: T tokens, H hidden, I intermediate, k top-k, n experts in one call, N rows, K columns, G group

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..quant import QuantFormat
from . import build

FORMATS = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3, "int4": 4, "mxfp4": 5, "fp8": 6, "gptq": 7}
PREQUANT = {"mxfp4": "mxfp4", "fp8": "fp8", "gptq-int4": "gptq"}  # PrequantFormat.kind -> kernel format
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "swiglu_oai": 3}
PLAIN = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
BIAS = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
HOST_ACTIVATIONS = ("fp32", "int8")  # exact float32 activations; int8 per 32 columns (opt-in, changes numerics)
INT8_FORMATS = ("mxfp4",)  # kernel formats with an int8-activation path


class Mat(ctypes.Structure):
    """One expert matrix as the kernel reads it (see `experts.cpp` struct Mat)."""

    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("row_bytes", ctypes.c_int64), ("groups", ctypes.c_int64), ("aux", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("bias_fmt", ctypes.c_int64)]


def kernel_format(dtype: torch.dtype, fmt) -> str | None:
    """The kernel format of experts stored in `dtype` (uncompressed) or under `fmt` (a `QuantFormat`, or a
    publisher's `kernels.prequant.PrequantFormat`: "mxfp4", "fp8", "gptq"); None if unsupported."""
    if fmt is not None:
        if isinstance(fmt, QuantFormat):
            return fmt.scheme
        kind = PREQUANT.get(getattr(fmt, "kind", None))
        if kind == "fp8" and not (fmt.block >= 16 and fmt.block & (fmt.block - 1) == 0):
            return None  # FP8 blocks the kernel walks: powers of two >= 16 (128 as published)
        if kind == "gptq" and not (fmt.block >= 16 and fmt.block & (fmt.block - 1) == 0):
            return None
        return kind
    return PLAIN.get(dtype)


def kernel_group(fmt) -> int:
    """The `group` argument of the kernel for experts under `fmt` (None: uncompressed)."""
    if fmt is None:
        return 64
    if isinstance(fmt, QuantFormat):
        return fmt.group_size
    return 32 if fmt.kind == "mxfp4" else fmt.block


def _with_bias(mat: Mat, bias: torch.Tensor | None, n: int) -> Mat:
    if bias is not None:
        if tuple(bias.shape) != (n,) or bias.dtype not in BIAS or not bias.is_contiguous():
            raise ValueError(f"host kernel needs a contiguous fp32/bf16/fp16 bias of shape ({n},), got "
                             f"{bias.dtype} {tuple(bias.shape)}")
        mat.bias, mat.bias_fmt = bias.data_ptr(), BIAS[bias.dtype]
    return mat


def prequant_matrix(parts: dict, shape: tuple[int, int], fmt, bias: torch.Tensor | None = None) -> Mat:
    """A `Mat` of one W [N, K] held in a publisher's format (`kernels.prequant.PrequantFormat`): `parts` maps
    the format's suffixes ("_blocks"/"_scales", ""/"_scale_inv", ".qweight"/".qzeros"/".scales"/".g_idx") to
    the store's tensors, read in place (they must stay alive while the kernel reads them); `bias` [N] optional.

    Raises:
        ValueError: a part whose shape, dtype or layout does not match the format.
    """
    n, k = shape
    for sfx, (shp, dt) in fmt.parts(n, k).items():
        t = parts.get(sfx)
        if t is None or tuple(t.shape) != shp or t.dtype != dt or not t.is_contiguous():
            raise ValueError(f"host kernel needs {fmt} part {sfx!r} as contiguous {dt} {shp}, got "
                             f"{None if t is None else (t.dtype, tuple(t.shape))}")
    ptr = lambda sfx: parts[sfx].data_ptr()  # noqa: E731
    if fmt.kind == "mxfp4":
        mat = Mat(ptr("_blocks"), ptr("_scales"), None, k // 2, k // 32, None, None, 0)
    elif fmt.kind == "fp8":
        mat = Mat(ptr(""), ptr("_scale_inv"), None, k, -(-k // fmt.block), None, None, 0)
    else:
        mat = Mat(ptr(".qweight"), ptr(".scales"), ptr(".qzeros"), 4 * n, n, ptr(".g_idx"), None, 0)
    return _with_bias(mat, bias, n)


def matrix(weight, shape: tuple[int, int], fmt: QuantFormat | None = None, bias: torch.Tensor | None = None) -> Mat:
    """A `Mat` of one [N, K] matrix: a plain tensor (rows contiguous), or {".qweight", ".qscale"[, ".qzero"]}
    parts under `fmt`; `bias` [N] optional. The tensors must stay alive while the kernel reads them.

    Raises:
        ValueError: a tensor whose shape, dtype or strides do not match.
    """
    n, k = shape
    if fmt is None:
        if tuple(weight.shape) != (n, k) or weight.dtype not in PLAIN or weight.stride(1) != 1:
            raise ValueError(f"host kernel needs a row-contiguous fp32/bf16/fp16 {shape} matrix, got "
                             f"{weight.dtype} {tuple(weight.shape)} strides {weight.stride()}")
        return _with_bias(Mat(weight.data_ptr(), None, None, weight.stride(0) * weight.element_size(), 0), bias, n)
    want = fmt.parts((n, k))
    for sfx, (shp, dt) in want.items():
        t = weight.get(sfx)
        if t is None or tuple(t.shape) != shp or t.dtype != dt or not t.is_contiguous():
            raise ValueError(f"host kernel needs {fmt} part {sfx} as contiguous {dt} {shp}, got "
                             f"{None if t is None else (t.dtype, tuple(t.shape))}")
    q, s, z = weight[".qweight"], weight[".qscale"], weight.get(".qzero")
    groups = s.shape[1] if fmt.scheme == "int4" else 0
    return _with_bias(Mat(q.data_ptr(), s.data_ptr(), None if z is None else z.data_ptr(), q.stride(0), groups),
                      bias, n)


_MADV_HUGEPAGE = 14  # Linux


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back a large host tensor with transparent huge pages (madvise MADV_HUGEPAGE), before its
    pages are first written: the host kernel streams experts through it, and with 4 KiB pages its TLB misses
    cost a Mixtral-size expert more than half its read rate (8-10 GB/s against 18-28 GB/s, measured here).
    Returns whether the advice was taken (False off Linux, for small tensors or where THP is off)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < 4 * 2**20 or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    start = -(-t.data_ptr() // 4096) * 4096
    length = (t.data_ptr() + nbytes - start) // 4096 * 4096
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def default_threads() -> int:
    """Host threads when the user gives none: one fewer than this process's physical cores (the device side,
    the Python thread that drives it, keeps one), at most 8 (a desktop's dual-channel RAM is saturated by
    fewer), at least 1."""
    return max(1, min(physical_cores() - 1, 8))


def physical_cores() -> int:
    """Physical cores this process may run on (Linux: distinct (package, core) pairs of its CPUs)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        allowed = set(range(os.cpu_count() or 1))
    try:
        cores, cpu, package = set(), None, "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                package = value
            elif key == "core id" and cpu in allowed:
                cores.add((package, value))
        if cores:
            return len(cores)
    except (OSError, ValueError):
        pass
    return max(1, len(allowed))


def check_threads(threads) -> int:
    if threads is None:
        return default_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"host_threads must be a positive int (threads for experts computed on the host), "
                         f"got {threads!r}")
    return threads


@dataclass
class _Buffers:
    x: torch.Tensor  # [T, Hx] float32, zero beyond H
    scratch: torch.Tensor  # float32, specmoe_host_scratch(...)


class HostExpertsKernel:
    """The compiled kernel, with its reusable buffers. Not thread-safe: one caller at a time (the runtime's
    host worker is one thread).

    Args:
        threads: OpenMP threads per call (`check_threads`; None: `default_threads()`).
        isa: force a build ("avx512", "avx2", "scalar"); default chosen from the CPU.

    Raises:
        RuntimeError: the kernel cannot be had here (use `available()` first to fall back quietly).
    """

    def __init__(self, threads: int | None = None, isa: str | None = None):
        self.lib = build.load(isa)
        if self.lib is None:
            raise RuntimeError("the host experts kernel is not available here (see the log line above)")
        self.threads = check_threads(threads)
        self.isa = self.lib.specmoe_host_isa().decode()
        self._buf: dict[int, _Buffers] = {}

    @property
    def name(self) -> str:
        return f"specmoe-host-{self.isa}"

    def _buffers(self, tokens: int, hx: int, pairs: int, inter: int, group: int) -> _Buffers:
        need = int(self.lib.specmoe_host_scratch(pairs, hx, inter, group))
        buf = self._buf.get(hx)
        if buf is None or buf.x.shape[0] < tokens or buf.scratch.numel() < need:
            rows = max(tokens, buf.x.shape[0] if buf else 0)
            buf = _Buffers(torch.zeros(rows, hx, dtype=torch.float32),
                           torch.empty(max(need, buf.scratch.numel() if buf else 0), dtype=torch.float32))
            self._buf[hx] = buf
        return buf

    def __call__(self, fmt: str, activation: str, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 chosen: list[int], mats: list[tuple[Mat, Mat]], inter: int, group: int = 64,
                 out: torch.Tensor | None = None, act_params: tuple[float, float] | None = None,
                 activations: str = "fp32") -> torch.Tensor:
        """Routed experts `chosen` of one layer for hidden [T, H], ids / weights [T, k] (CPU tensors); `mats`
        the (gate_up [2I, H], down [H, I]) matrices of each chosen expert; `group` the format's
        (`kernel_group`); `act_params` (alpha, limit) of "swiglu_oai"; `activations` "fp32" (exact) or "int8"
        (`INT8_FORMATS` only: rounded per 32 columns, see the module docstring). Returns out [T, H] float32
        (new, or `out` accumulated into).

        Raises:
            ValueError: an unknown format or activation, or mismatched arguments.
        """
        if fmt not in FORMATS or activation not in ACTIVATIONS:
            raise ValueError(f"host kernel formats {sorted(FORMATS)}, activations {sorted(ACTIVATIONS)}; got "
                             f"{fmt!r}, {activation!r}")
        if activations not in HOST_ACTIVATIONS or (activations == "int8" and fmt not in INT8_FORMATS):
            raise ValueError(f"host kernel activations {HOST_ACTIVATIONS} ('int8' for {INT8_FORMATS} only); got "
                             f"{activations!r} for {fmt!r}")
        if len(mats) != len(chosen):
            raise ValueError(f"{len(chosen)} chosen experts but {len(mats)} matrix pairs")
        tokens, hidden_size = hidden.shape
        top_k = ids.shape[-1]
        group = group if fmt in ("int4", "mxfp4", "fp8", "gptq") else 64
        if activation == "swiglu_oai" and act_params is None:
            raise ValueError("activation 'swiglu_oai' needs act_params (alpha, limit)")
        params = torch.tensor(act_params or (0.0, 0.0), dtype=torch.float32)
        hx = -(-hidden_size // max(64, group)) * max(64, group)
        buf = self._buffers(tokens, hx, tokens * top_k, inter, group)
        buf.x[:tokens, :hidden_size].copy_(hidden)
        ids64 = ids.reshape(tokens, top_k).to(torch.int64).contiguous()
        w32 = weights.reshape(tokens, top_k).to(torch.float32).contiguous()
        chosen_t = torch.tensor(chosen, dtype=torch.int64)
        gate_up = (Mat * len(mats))(*(g for g, _ in mats))
        down = (Mat * len(mats))(*(d for _, d in mats))
        if out is None:
            out = torch.zeros(tokens, hidden_size, dtype=torch.float32)
        elif out.dtype != torch.float32 or tuple(out.shape) != (tokens, hidden_size) or not out.is_contiguous():
            raise ValueError(f"out must be contiguous float32 {(tokens, hidden_size)}")
        rc = self.lib.specmoe_host_experts(
            FORMATS[fmt], ACTIVATIONS[activation], group, tokens, hidden_size, inter, hx, buf.x.data_ptr(),
            top_k, ids64.data_ptr(), w32.data_ptr(), len(chosen), chosen_t.data_ptr(), ctypes.addressof(gate_up),
            ctypes.addressof(down), out.data_ptr(), buf.scratch.data_ptr(), self.threads, params.data_ptr(),
            int(activations == "int8"))
        if rc != 0:
            raise ValueError(f"host experts kernel rejected its arguments (code {rc}): fmt {fmt}, group {group}, "
                             f"H {hidden_size}, I {inter}, T {tokens}, k {top_k}")
        return out

    def read_sum(self, buf: torch.Tensor, threads: int | None = None) -> float:
        """Sum of a float32 buffer with the kernel's threads (a read-bandwidth probe)."""
        if buf.dtype != torch.float32 or not buf.is_contiguous():
            raise ValueError("read_sum needs a contiguous float32 buffer")
        return self.lib.specmoe_read_sum(buf.data_ptr(), buf.numel(), threads or self.threads)


_AVAILABLE: dict[str | None, bool] = {}


def available(isa: str | None = None) -> bool:
    """Whether the kernel can be built and loaded here (logs once why not)."""
    if isa not in _AVAILABLE:
        _AVAILABLE[isa] = build.load(isa) is not None
    return _AVAILABLE[isa]

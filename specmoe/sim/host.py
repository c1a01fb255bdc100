"""Host profiles: what the CPU side of a machine can compute from its own RAM, for experts computed on the host.

A routed expert computed on the host (``misses="host"``/``"auto"``) costs, per MoE layer call,

    expert_call_s + max(bytes / memory bandwidth,  weights / kernel weight rate + 2 * weights * tokens / kernel FLOP/s)

its bytes streamed once from RAM, or its kernel's arithmetic where that is slower: the per-weight part (widening
bf16, dequantizing int8/int4) and the per-token part (multiply-adds). A well-vectorised kernel on a desktop
CPU is bound by memory bandwidth at batch-1 decode; the torch ops the runtime uses on a small or busy CPU may
not be, which is why "this machine" measures its kernel rates instead of assuming them
(`measure_host_profile`, validated at real expert shapes by `benchmarks/host_compute.py`).
"""

# Shape legend: T tokens routed to one expert, W weights of one expert, B bytes of one expert

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace

import torch

from ..measure import time_fn

logger = logging.getLogger(__name__)

GB = 10**9
KERNEL_FORMATS = ("bf16", "int8", "int4")


def expert_format(expert_dtype: str, compression: str) -> str:
    """The host kernel an expert runs: its compression scheme, or its dtype when uncompressed."""
    if compression and compression != "none":
        return "int8" if compression.startswith("int8") else "int4"
    if expert_dtype in ("bf16", "fp16", "fp32"):
        return "bf16"
    return "int8" if expert_dtype.startswith("fp8") else "int4"  # mxfp4, gptq-int4: a 4-bit kernel


@dataclass(frozen=True)
class HostKernel:
    """How fast one expert kernel works on a host, beside memory bandwidth.

    Args:
        weights_per_s: weights per second the kernel turns into its compute type (widening, dequantizing),
            once per expert per call whatever the tokens.
        flops: FLOP/s of its per-token multiply-adds (2 per weight per token).
    """

    weights_per_s: float
    flops: float

    def __post_init__(self):
        for name in ("weights_per_s", "flops"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"HostKernel.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class HostProfile:
    """One host: its memory bandwidth, cores and expert kernels.

    Args:
        name: preset name, e.g. "3090-box".
        memory_bytes_per_s: sustained read bandwidth of host RAM (what a streaming kernel reaches).
        cores: physical cores.
        flops: peak fp32 FLOP/s of all cores (for reference; the kernels' rates are what the model uses).
        kernels: (format, HostKernel) for "bf16", "int8" and "int4".
        expert_call_s: fixed cost of computing one expert in one call (dispatch, thread hand-off).
        source: where the numbers come from.
        description: the machine in words.
    """

    name: str
    memory_bytes_per_s: float
    cores: int
    flops: float
    kernels: tuple[tuple[str, HostKernel], ...]
    expert_call_s: float = 20e-6
    source: str = ""
    description: str = ""

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError("HostProfile.name must be a non-empty string, e.g. '3090-box'")
        for field in ("memory_bytes_per_s", "flops"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"HostProfile.{field} must be a positive number, got {value!r}")
        if not isinstance(self.cores, int) or self.cores < 1:
            raise ValueError(f"HostProfile.cores must be a positive int, got {self.cores!r}")
        if not (0 <= self.expert_call_s < 0.1):
            raise ValueError(f"HostProfile.expert_call_s must be seconds in [0, 0.1), got {self.expert_call_s!r}")
        missing = set(KERNEL_FORMATS) - {fmt for fmt, _ in self.kernels}
        if missing:
            raise ValueError(f"HostProfile {self.name}: kernels for {sorted(missing)} missing; give all of "
                             f"{KERNEL_FORMATS}")

    def kernel(self, fmt: str) -> HostKernel:
        for name, kernel in self.kernels:
            if name == fmt:
                return kernel
        raise ValueError(f"no host kernel {fmt!r}; choose one of {KERNEL_FORMATS}")

    def expert_seconds(self, nbytes: int, weights: int, tokens: int, fmt: str) -> float:
        """Host time of one expert of `nbytes` bytes and `weights` weights for `tokens` tokens routed to it."""
        k = self.kernel(fmt)
        arithmetic = weights / k.weights_per_s + 2 * weights * tokens / k.flops
        return self.expert_call_s + max(nbytes / self.memory_bytes_per_s, arithmetic)

    def bandwidth_seconds(self, nbytes: int) -> float:
        """The bandwidth-only prediction of one expert: its bytes read once, nothing else."""
        return nbytes / self.memory_bytes_per_s

    def with_(self, **changes) -> "HostProfile":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["kernels"] = {fmt: asdict(k) for fmt, k in self.kernels}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "HostProfile":
        data = dict(data)
        data["kernels"] = tuple((fmt, HostKernel(**k)) for fmt, k in data["kernels"].items())
        return cls(**data)

    @classmethod
    def from_name(cls, name: str) -> "HostProfile":
        """A preset by name (see `HOST_PROFILES`), or "this-machine" (measured once per process).

        Raises:
            ValueError: an unknown name; the message lists the known ones.
        """
        key = name.lower().replace("_", "-")
        if key in ("this-machine", "here", "local"):
            return measure_host_profile()
        if key in HOST_PROFILES:
            return HOST_PROFILES[key]
        raise ValueError(f"unknown host profile {name!r}; choose one of {sorted(HOST_PROFILES) + ['this-machine']}")


def _simd_kernels(cores_ghz: float, fma_flops_per_cycle: float) -> tuple[tuple[str, HostKernel], ...]:
    """Kernels of a vectorised expert matvec (llama.cpp / kTransformers style, AVX2): one 8-wide widen or
    dequantize per core-cycle, half the cores' peak FMA rate. An assumption, stated in each preset's source."""
    kernel = HostKernel(weights_per_s=cores_ghz * 1e9 * 8, flops=0.5 * cores_ghz * 1e9 * fma_flops_per_cycle)
    return tuple((fmt, kernel) for fmt in KERNEL_FORMATS)


_KERNEL_NOTE = ("kernels assumed: a vectorised AVX2 expert matvec (llama.cpp/kTransformers style) converting 8 "
                "weights per core-cycle and reaching half of peak FMA throughput; at batch-1 decode it is bound "
                "by memory bandwidth either way")

HOST_PROFILES: dict[str, HostProfile] = {p.name: p for p in (
    HostProfile(
        "3090-box", 0.8 * 51.2 * GB, 16, 16 * 3.4e9 * 32, _simd_kernels(16 * 3.4, 32),
        description="AMD Ryzen 9 5950X (16 Zen 3 cores, 3.4 GHz base) with dual-channel DDR4-3200: a typical "
                    "RTX 3090 desktop",
        source="AMD Ryzen 9 5950X product page (16 cores, 3.4 GHz base; Zen 3: two 256-bit FMA pipes = 32 fp32 "
               "FLOP/cycle/core); JEDEC DDR4-3200: 25.6 GB/s per channel, 51.2 GB/s dual channel; sustained read "
               "assumed 80% of that (41 GB/s, typical of STREAM on such desktops); " + _KERNEL_NOTE,
    ),
    HostProfile(
        "ddr5-desktop", 0.8 * 89.6 * GB, 24, 8 * 3.0e9 * 32 + 16 * 2.2e9 * 16,
        _simd_kernels(8 * 3.0 + 16 * 2.2 * 0.5, 32),
        description="Intel Core i9-13900K (8 P-cores 3.0 GHz base + 16 E-cores 2.2 GHz base) with dual-channel "
                    "DDR5-5600",
        source="Intel Core i9-13900K specifications (ark.intel.com: 8 P + 16 E cores, 3.0/2.2 GHz base; P-core two "
               "256-bit FMA = 32 fp32 FLOP/cycle, E-core 16); JEDEC DDR5-5600: 44.8 GB/s per channel, 89.6 GB/s "
               "dual channel; sustained read assumed 80% (72 GB/s); E-cores counted as half a core for "
               "conversion; " + _KERNEL_NOTE,
    ),
)}


# ---- "this machine": measured -----------------------------------------------------------------------------
def _median_time(fn, repeats: int, best: bool = False) -> float:
    """Median (or with `best`, minimum: a shared machine's least disturbed run) seconds of `repeats` timed calls,
    after one warm-up (`specmoe.measure.time_fn` on the CPU)."""
    t = time_fn(fn, "cpu", warmup=1, repeats=repeats, flush_l2=False)
    return (t["min_us"] if best else t["median_us"]) / 1e6


def measure_memory_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Sustained read bandwidth of host RAM: a reduction over a buffer far larger than the caches."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _median_time(lambda: buf.sum(), repeats, best=True)


def measure_kernel(fmt: str, hidden: int = 1024, inter: int = 512, repeats: int = 5,
                   call_s: float = 0.0) -> HostKernel:
    """The runtime's own host kernel for `fmt` (`HostExperts` on one synthetic expert, 1.6M weights), timed at
    1 and 8 tokens: the FLOP/s from the difference, the weight rate from the rest of the 1-token time."""
    from .calibrate import host_expert_timer

    weights = 3 * hidden * inter
    t1 = _median_time(host_expert_timer(fmt, hidden, inter, 1), repeats, best=True)
    t8 = _median_time(host_expert_timer(fmt, hidden, inter, 8), repeats, best=True)
    per_token = (t8 - t1) / 7
    base = t1 - call_s - max(per_token, 0.0)
    ceiling = 1e15  # no measurable cost: the other terms bound the time
    return HostKernel(weights_per_s=weights / base if base > 0 else ceiling,
                      flops=2 * weights / per_token if per_token > 0 else ceiling)


_MEASURED: HostProfile | None = None


def measure_host_profile(refresh: bool = False) -> HostProfile:
    """Measure this machine (a few seconds, once per process): RAM read bandwidth and the runtime's host
    kernels at a cache-resident expert size (their rates, apart from bandwidth)."""
    global _MEASURED
    if _MEASURED is not None and not refresh:
        return _MEASURED
    import os
    import platform

    from .calibrate import host_expert_timer

    bandwidth = measure_memory_bandwidth()
    call = _median_time(host_expert_timer("bf16", 16, 16), 7, best=True)
    kernels = tuple((fmt, measure_kernel(fmt, call_s=call)) for fmt in KERNEL_FORMATS)
    a = torch.randn(512, 512)
    flops = 2 * 512**3 / _median_time(lambda: a @ a, 5)
    _MEASURED = HostProfile(
        "this-machine", bandwidth, os.cpu_count() or 1, flops, kernels, expert_call_s=min(call, 0.099),
        description=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                    f"{torch.__version__} with {torch.get_num_threads()} threads",
        source="measured here: RAM read bandwidth from a 256 MiB reduction; kernels from the runtime's host "
               "experts (HostExperts) at a 1024x512 expert (1.6M weights), 1 and 8 tokens, minimum of 5; fp32 "
               "FLOP/s from a 512x512 matmul",
    )
    logger.info("host profile measured: %.1f GB/s, kernels %s", bandwidth / GB,
                {fmt: f"{k.weights_per_s / 1e9:.2f} Gw/s, {k.flops / 1e9:.1f} GFLOP/s" for fmt, k in kernels})
    return _MEASURED

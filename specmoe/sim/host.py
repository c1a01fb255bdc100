"""Host profiles: what the CPU side of a machine can compute from its own RAM, for experts computed on the host.

A routed expert computed on the host (``misses="host"``/``"auto"``) costs, per MoE layer call,

    expert_call_s + max(bytes / min(memory bandwidth, kernel byte rate),  2 * weights * tokens / kernel FLOP/s)

its bytes streamed once, at the RAM's bandwidth or the rate its kernel reads and decodes them at one token
(on all its threads) where that is slower; or its multiply-adds where more tokens make those the longer part
(the kernel's FLOP/s at 8 tokens). Every kernel rate is one this
project's host kernel (`specmoe.kernels.host`, the one `HostExperts` runs) was measured at, never an assumed
one: "this-machine" measures the runtime's own host path here, at real expert sizes read from RAM
(`measure_host_profile`); the desktop presets take the per-thread rates of the kernel's AVX2 build measured by
`benchmarks/host_kernels.py --calibrate` (`calibration/host_kernels.json`) times the threads the runtime
would use there (`kernels.host.default_threads`), beside their RAM bandwidth; the source says which. Each
format runs its own kernel (`expert_format`): experts as published (MXFP4, FP8, GPTQ) are charged the rate of the
kernel that reads those bytes, which `--calibrate --kernel-formats` measures beside the int4 / int8 kernel in
one run; a profile without such a measurement charges the int4 / int8 rate and logs that it assumes so.
With ``host_activations="int8"`` (opt-in, it changes the numerics) MXFP4 experts run the int8-activation kernel
("mxfp4-int8act", `INT8_ACT`), measured beside the exact one; a profile without it is charged the exact kernel's.
`benchmarks/host_compute.py` checks the model against the runtime's measured host time at real shapes.
"""

# Shape legend: T tokens routed to one expert, W weights of one expert, B bytes of one expert

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..io import read_json

logger = logging.getLogger(__name__)

GB = 10**9
KERNEL_FORMATS = ("bf16", "int8", "int4")  # every profile has these
PUBLISHED_FORMATS = ("mxfp4", "fp8", "gptq")  # the publishers' formats' kernels (MXFP4, FP8 b128, GPTQ int4 g128)
REQUIRED_FORMATS = KERNEL_FORMATS
INT8_ACT = {"mxfp4": "mxfp4-int8act"}  # kernels with int8 activations (host_activations="int8")
INT8_ACT_FORMATS = tuple(INT8_ACT.values())
STAND_IN = {"mxfp4": "int4", "fp8": "int8", "gptq": "int4",  # for a profile measured before these kernels existed
            "mxfp4-int8act": "mxfp4"}


def expert_format(expert_dtype: str, compression: str, activations: str = "fp32") -> str:
    """The host kernel an expert runs: its compression scheme, or its dtype when uncompressed; experts as
    published run their own kernel ("mxfp4", "fp8", "gptq"); with `activations` "int8" (the runtime's
    `host_activations`) the int8-activation kernel where the format has one (`INT8_ACT`), as `HostExperts` does."""
    if compression and compression != "none":
        fmt = "int8" if compression.startswith("int8") else "int4"
    elif expert_dtype in ("bf16", "fp16", "fp32"):
        fmt = "bf16"
    elif expert_dtype.startswith("fp8"):
        fmt = "fp8"
    else:
        fmt = "mxfp4" if expert_dtype == "mxfp4" else "gptq"
    return INT8_ACT.get(fmt, fmt) if activations == "int8" else fmt


@dataclass(frozen=True)
class HostKernel:
    """How fast one expert kernel works on a host, beside memory bandwidth.

    Args:
        bytes_per_s: expert bytes per second the kernel reads, decodes and multiplies at one token, on all the
            profile's host threads, where RAM does not hold it back (the expert's bytes / its 1-token time).
        flops: FLOP/s of its multiply-adds (2 per weight per token) at many tokens, on all its host threads.
        at_bytes: the expert size (bytes) those rates were measured at.
        large: the same two rates measured at a larger expert, (bytes, bytes_per_s, flops), where a host reads
            large experts at another rate ("this-machine": a 352 MB expert streams at about half the rate of a
            17 MB one here, ggml's kernels alike); between the two sizes the rates follow log(bytes), beyond
            them the nearer measurement holds. None: one rate for every size.
    """

    bytes_per_s: float
    flops: float
    at_bytes: int = 0
    large: tuple[int, float, float] | None = None

    def __post_init__(self):
        if self.large is not None:
            object.__setattr__(self, "large", tuple(self.large))
            if len(self.large) != 3 or not all(v > 0 for v in self.large) or self.large[0] <= self.at_bytes:
                raise ValueError(f"HostKernel.large must be (bytes > at_bytes, bytes_per_s > 0, flops > 0), "
                                 f"got {self.large!r}")
        for name in ("bytes_per_s", "flops"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"HostKernel.{name} must be a positive number, got {value!r}")

    def rates(self, nbytes: int) -> tuple[float, float]:
        """(bytes/s, FLOP/s) for an expert of `nbytes`."""
        if self.large is None or nbytes <= self.at_bytes:
            return self.bytes_per_s, self.flops
        big, rate, flops = self.large
        if nbytes >= big:
            return rate, flops
        f = math.log(nbytes / self.at_bytes) / math.log(big / self.at_bytes)
        return (math.exp((1 - f) * math.log(self.bytes_per_s) + f * math.log(rate)),
                math.exp((1 - f) * math.log(self.flops) + f * math.log(flops)))


@dataclass(frozen=True)
class HostProfile:
    """One host: its memory bandwidth, cores and expert kernels.

    Args:
        name: preset name, e.g. "3090-box".
        memory_bytes_per_s: sustained read bandwidth of host RAM (what a streaming kernel reaches).
        cores: physical cores.
        flops: peak fp32 FLOP/s of all cores (for reference; the kernels' rates are what the model uses).
        kernels: (format, HostKernel) for "bf16", "int8" and "int4", and for the publishers' "mxfp4", "fp8",
            "gptq" and "mxfp4-int8act" where measured (`kernel` charges a profile without them its `STAND_IN`'s
            rate, and says so).
        expert_call_s: fixed cost of computing one expert in one call (dispatch, thread hand-off).
        source: where the numbers come from.
        description: the machine in words.
        threads: host threads the kernel rates are for.
        kernel: which implementation the rates are of (e.g. "specmoe-host-avx2").
    """

    name: str
    memory_bytes_per_s: float
    cores: int
    flops: float
    kernels: tuple[tuple[str, HostKernel], ...]
    expert_call_s: float = 20e-6
    source: str = ""
    description: str = ""
    threads: int = 1
    kernel_name: str = ""

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
        missing = set(REQUIRED_FORMATS) - {fmt for fmt, _ in self.kernels}
        if missing:
            raise ValueError(f"HostProfile {self.name}: kernels for {sorted(missing)} missing; give all of "
                             f"{REQUIRED_FORMATS}")

    def kernel(self, fmt: str) -> HostKernel:
        """The kernel `fmt` runs; a publisher's format this profile has no measurement of is charged its
        `STAND_IN`'s rate (an assumption, logged once)."""
        for name, kernel in self.kernels:
            if name == fmt:
                return kernel
        if fmt in STAND_IN:
            if (self.name, fmt) not in _SAID:
                _SAID.add((self.name, fmt))
                logger.warning("host profile %s has no measured %s kernel; charging the %s kernel's rate (assumed)",
                               self.name, fmt, STAND_IN[fmt])
            return self.kernel(STAND_IN[fmt])
        raise ValueError(f"no host kernel {fmt!r}; choose one of {KERNEL_FORMATS + PUBLISHED_FORMATS + INT8_ACT_FORMATS}")

    def expert_seconds(self, nbytes: int, weights: int, tokens: int, fmt: str) -> float:
        """Host time of one expert of `nbytes` bytes and `weights` weights for `tokens` tokens routed to it."""
        k = self.kernel(fmt)
        rate, flops = k.rates(nbytes)
        stream = nbytes / min(self.memory_bytes_per_s, rate)
        return self.expert_call_s + max(stream, 2 * weights * tokens / flops)

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
    def from_name(cls, name: str, threads: int | None = None) -> "HostProfile":
        """A preset by name (see `HOST_PROFILES`), or "this-machine" (measured once per process on `threads`
        host threads; default the runtime's).

        Raises:
            ValueError: an unknown name; the message lists the known ones.
        """
        key = name.lower().replace("_", "-")
        if key in ("this-machine", "here", "local"):
            return measure_host_profile(threads=threads)
        if key in HOST_PROFILES:
            return HOST_PROFILES[key]
        raise ValueError(f"unknown host profile {name!r}; choose one of {sorted(HOST_PROFILES) + ['this-machine']}")


_SAID: set[tuple[str, str]] = set()
CALIBRATION = Path(__file__).parent / "calibration" / "host_kernels.json"
_DESKTOP_THREADS = 8  # kernels.host.default_threads() on a 16- or 24-core desktop: min(physical cores - 1, 8)


def calibrated_kernels(isa: str, threads: int) -> tuple[tuple[tuple[str, HostKernel], ...], str, float]:
    """(kernels, source, call seconds) of this project's host kernel build `isa` on `threads` threads: the
    per-thread rates `benchmarks/host_kernels.py --calibrate` measured, times `threads`.

    Raises:
        ValueError: no calibration for `isa` (run that command).
    """
    data = read_json(CALIBRATION, what="host kernel calibration")
    builds = data.get("builds", {})
    if isa not in builds:
        raise ValueError(f"{CALIBRATION} has no host kernel build {isa!r} (has {sorted(builds)}); run "
                         f"python benchmarks/host_kernels.py --calibrate")
    build = builds[isa]
    kernels = tuple((fmt, HostKernel(k["bytes_per_s_per_thread"] * threads, k["flops_per_thread"] * threads))
                    for fmt, k in build["kernels"].items())
    env = data["environment"]
    source = (f"kernel rates: this project's host kernel ({build['kernel']}) measured by `{data['command']}` on "
              f"{env['device_name']} ({env['date'][:10]}, git {env['git_sha'][:10]}), per thread at "
              f"{build['shape']} read from RAM (1 and {build['tokens'][1]} tokens), times {threads} threads (assumed: "
              f"the same per-core rate there, scaling with cores up to the RAM's bandwidth)"
              + ("; the publishers' formats' kernels (" + ", ".join(
                  f"{f}: {k['ratio']['bytes_per_s']:.2f}x the {k['relative_to']} byte rate"
                  + (f", {k['vs_exact']['bytes_per_s']:.2f}x the exact mxfp4 kernel's" if "vs_exact" in k else "")
                  for f, k in
                  build["kernels"].items() if "relative_to" in k) + ") measured beside the int4 / int8 kernel in "
                 "one run and scaled to its rate" if any("relative_to" in k for k in build["kernels"].values())
                 else ""))
    return kernels, source, build["call_s"]


def _desktop(name: str, bandwidth: float, cores: int, flops: float, description: str, ram: str) -> HostProfile:
    kernels, source, call = calibrated_kernels("avx2", _DESKTOP_THREADS)
    return HostProfile(name, bandwidth, cores, flops, kernels, expert_call_s=call, description=description,
                       source=ram + "; " + source, threads=_DESKTOP_THREADS, kernel_name="specmoe-host-avx2")


HOST_PROFILES: dict[str, HostProfile] = {p.name: p for p in (
    _desktop(
        "3090-box", 0.8 * 51.2 * GB, 16, 16 * 3.4e9 * 32,
        description="AMD Ryzen 9 5950X (16 Zen 3 cores, 3.4 GHz base, AVX2) with dual-channel DDR4-3200: a typical "
                    "RTX 3090 desktop",
        ram="AMD Ryzen 9 5950X product page (16 cores, 3.4 GHz base; Zen 3: two 256-bit FMA pipes = 32 fp32 "
            "FLOP/cycle/core); JEDEC DDR4-3200: 25.6 GB/s per channel, 51.2 GB/s dual channel; sustained read "
            "assumed 80% of that (41 GB/s, typical of STREAM on such desktops)",
    ),
    _desktop(
        "ddr5-desktop", 0.8 * 89.6 * GB, 24, 8 * 3.0e9 * 32 + 16 * 2.2e9 * 16,
        description="Intel Core i9-13900K (8 P-cores 3.0 GHz base + 16 E-cores 2.2 GHz base, AVX2) with "
                    "dual-channel DDR5-5600",
        ram="Intel Core i9-13900K specifications (ark.intel.com: 8 P + 16 E cores, 3.0/2.2 GHz base; P-core two "
            "256-bit FMA = 32 fp32 FLOP/cycle, E-core 16); JEDEC DDR5-5600: 44.8 GB/s per channel, 89.6 GB/s "
            "dual channel; sustained read assumed 80% (72 GB/s)",
    ),
)}


# ---- "this machine": measured -----------------------------------------------------------------------------
def _median_time(fn, repeats: int) -> float:
    """Median seconds of `repeats` timed calls after one warm-up (the machine may be shared: the median, not
    the fastest, is what a run of many calls sees), on the project's one clock (`measure.time_fn`)."""
    from ..measure import time_fn

    return time_fn(fn, "cpu", warmup=1, repeats=repeats)["median_us"] * 1e-6


def measure_memory_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 7, threads: int = 1) -> float:
    """Read bandwidth of host RAM on `threads` threads: a vectorised sum over a buffer far larger than the
    caches (the host kernel library's probe; a torch reduction where the kernel is not available), the fastest
    of `repeats` (what the RAM can give; on a shared machine the median measures the neighbours)."""
    from ..kernels.host import HostExpertsKernel, available

    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    if available():
        kernel = HostExpertsKernel(threads)
        fn = lambda: kernel.read_sum(buf, threads)  # noqa: E731
    else:
        fn = buf.sum
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


# the expert "this-machine" is measured at: DeepSeek-V2-Lite's (17.3 MB in bf16), copies beyond the caches
MEASURE_SHAPE = (2048, 1408)
MEASURE_TOKENS = 8
LARGE_SHAPE = (4096, 14336)  # and Mixtral-8x7B's (352 MB in bf16)


def last_level_cache() -> int:
    """Bytes of the last-level cache (Linux sysfs; 32 MiB if unknown)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
            best = max(best, int(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]])
        except (OSError, ValueError, KeyError):
            continue
    return best or 32 * 2**20


def copies_beyond_cache(nbytes: int) -> int:
    """Copies of an expert of `nbytes` that together exceed the last-level cache 8x (at least 2): cycling over
    them, a call finds next to nothing of its expert in a cache whose replacement is not LRU (AMD's victim L3)."""
    return max(2, math.ceil(8 * last_level_cache() / nbytes))


def measure_kernel(fmt: str, threads: int, hidden: int = MEASURE_SHAPE[0], inter: int = MEASURE_SHAPE[1],
                   repeats: int = 21, call_s: float = 0.0) -> tuple[HostKernel, str]:
    """The runtime's own host path for `fmt` (`HostExperts` on a synthetic expert of (H, I), rotating copies
    read from RAM): its byte rate from the 1-token time, its FLOP/s from the `MEASURE_TOKENS`-token time (each
    less the per-call cost). `fmt` may be an int8-activation kernel (`INT8_ACT_FORMATS`: its format's experts,
    host_activations "int8"). Returns (kernel, which implementation ran)."""
    from .calibrate import SyntheticExpert

    acts = "int8" if fmt in INT8_ACT_FORMATS else "fp32"
    fmt = next((f for f, k in INT8_ACT.items() if k == fmt), fmt)
    probe = SyntheticExpert(fmt, 128, 128)  # the smallest every format holds (GPTQ g128)
    nbytes = probe.store.layout.nbytes * (hidden * inter) // (128 * 128)
    probe.close()
    expert = SyntheticExpert(fmt, hidden, inter, copies=copies_beyond_cache(nbytes), threads=threads,
                             activations=acts)
    try:
        t1 = _median_time(expert.runner(1), repeats)
        tn = _median_time(expert.runner(MEASURE_TOKENS), repeats)
        name, nbytes, weights = expert.kernel, expert.nbytes, expert.weights
    finally:
        expert.close()
    return HostKernel(bytes_per_s=nbytes / max(t1 - call_s, 1e-9),
                      flops=2 * weights * MEASURE_TOKENS / max(tn - call_s, 1e-9), at_bytes=nbytes), name


_MEASURED: dict[int, HostProfile] = {}


def measure_host_profile(refresh: bool = False, threads: int | None = None) -> HostProfile:
    """Measure this machine (a few seconds, once per process and thread count): RAM read bandwidth and the
    runtime's host experts path on `threads` threads (default: the runtime's, `kernels.host.default_threads`)
    at a real expert size read from RAM."""
    import os
    import platform

    from ..kernels.host import check_threads
    from .calibrate import SyntheticExpert

    threads = check_threads(threads)
    if threads in _MEASURED and not refresh:
        return _MEASURED[threads]
    bandwidth = measure_memory_bandwidth(threads=threads)
    tiny = SyntheticExpert("bf16", 64, 64, threads=threads)
    call = _median_time(tiny.runner(1), 31)
    tiny.close()
    measured = {fmt: measure_kernel(fmt, threads, call_s=call)
                for fmt in KERNEL_FORMATS + PUBLISHED_FORMATS + INT8_ACT_FORMATS}
    kernels = []
    for fmt, (k, _) in measured.items():  # and at a Mixtral-8x7B expert (352 MB in bf16)
        big, _ = measure_kernel(fmt, threads, *LARGE_SHAPE, repeats=7, call_s=call)
        kernels.append((fmt, replace(k, large=(big.at_bytes, big.bytes_per_s, big.flops))))
    kernels = tuple(kernels)
    # RAM gave the kernels at least what they read (a probe on a shared machine can catch a worse moment)
    bandwidth = max(bandwidth, *(max(k.bytes_per_s, k.large[1]) for _, k in kernels))
    names = sorted({name for _, name in measured.values()})
    a = torch.randn(512, 512)
    flops = 2 * 512**3 / _median_time(lambda: a @ a, 5)
    h, i = MEASURE_SHAPE
    profile = _MEASURED[threads] = HostProfile(
        "this-machine", bandwidth, os.cpu_count() or 1, flops, kernels, expert_call_s=min(call, 0.099),
        description=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, host kernel "
                    f"{'/'.join(names)} on {threads} thread{'s' if threads > 1 else ''}",
        source=f"measured here: RAM read bandwidth from a 512 MiB vectorised sum on {threads} threads (median of "
               f"7); kernels from the runtime's host experts (HostExperts: {', '.join(names)}) at a {h}x{i} "
               f"and a {LARGE_SHAPE[0]}x{LARGE_SHAPE[1]} expert, rotating over copies beyond the caches, 1 and "
               f"{MEASURE_TOKENS} tokens, median of 21 (7 at the large one); "
               f"per-expert call from a 64x64 expert; fp32 FLOP/s from a 512x512 matmul",
        threads=threads, kernel_name="/".join(names),
    )
    logger.info("host profile measured: %.1f GB/s, kernels %s", bandwidth / GB,
                {fmt: f"{k.bytes_per_s / 1e9:.2f} GB/s, {k.flops / 1e9:.1f} GFLOP/s" for fmt, k in kernels})
    return profile

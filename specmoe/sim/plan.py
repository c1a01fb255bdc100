"""A fit that sets itself: from a model's shape and a machine (GPU, host RAM, disk), the settings to run it with
and what they give, simulated by the runtime's own scheduler.

Three tiers hold the routed experts: cache slots on the GPU, the host store in RAM, and, when the store does
not fit in RAM, the checkpoint's safetensors files mmap'd (`host_store="mmap"`: the OS page cache is the RAM
tier, the disk the third). `make_plan` tries each compression the checkpoint allows (its experts as they are;
int8 / int4-g128 when they are bf16 and lossy compression is allowed), sizes the slots to the GPU
(`bounds.memory_plan`), places the store, simulates decode with misses copied ("fetch") and split by the cost
model ("auto") on routing of the model's geometry, charges disk reads for misses whose expert is not in RAM,
and keeps the fastest. With misses split with the host, it also tries the host kernel's int8 activations
(`host_activations="int8"`, where the experts' format has that kernel: MXFP4) when numerics may change; each
option says which activations it assumes. Every figure is simulated, and `FitPlan.assumptions` says what it
rests on.
"""

# Shape legend: L MoE layers, E experts, S slots

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .bounds import DEVICE_RESERVE_BYTES, memory_plan
from .compute import ComputeModel, load_op_counts
from .engine import simulate
from .hardware import HardwareProfile
from .host import HostProfile, expert_format
from .shapes import ModelShape
from .sweep import synthetic_stream

GiB = 2**30
RAM_RESERVE_BYTES = 4 * GiB  # the OS, the Python process, non-expert weights on their way: an assumption
LOSSY = ("int8", "int4-g128")


@dataclass(frozen=True)
class Machine:
    """Where the model runs.

    Args:
        gpu: the GPU's profile (its memory_bytes is the budget).
        host: the host's profile (memory bandwidth and kernels, for misses computed on the host).
        ram_bytes: host RAM.
        disk_bytes_per_s: sequential read rate of the disk holding the checkpoint (the mmap tier).
    """

    gpu: HardwareProfile
    host: HostProfile
    ram_bytes: int
    disk_bytes_per_s: float = 3e9

    def __post_init__(self):
        if not isinstance(self.ram_bytes, int) or self.ram_bytes <= RAM_RESERVE_BYTES:
            raise ValueError(f"ram must be more than the {RAM_RESERVE_BYTES // GiB} GiB reserved for the OS and "
                             f"the process, got {self.ram_bytes} bytes")
        if not (isinstance(self.disk_bytes_per_s, (int, float)) and math.isfinite(self.disk_bytes_per_s)
                and self.disk_bytes_per_s > 0):
            raise ValueError(f"disk read rate must be a positive number of bytes/s, got {self.disk_bytes_per_s!r}")


@dataclass
class Option:
    """One setting tried: its tiers and simulated decode."""

    compression: str
    slots: int
    capacity: float
    host_store: str
    ram_fraction: float  # of the expert store resident in RAM (1: all)
    misses: str
    tok_s: float
    hit_rate: float
    misses_per_token: float
    disk_s_per_token: float
    gpu_bytes: int
    ram_bytes: int
    disk_bytes: int
    lossy: bool
    host_activations: str = "fp32"  # the host kernel's activations ("int8": opt-in, changes numerics)


@dataclass
class FitPlan:
    """The chosen option, every option tried, and the assumptions behind the figures."""

    shape: str
    machine: dict
    chosen: Option
    options: list[Option]
    host_threads: int
    routing: str
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "machine": self.machine, "chosen": asdict(self.chosen),
                "options": [asdict(o) for o in self.options], "host_threads": self.host_threads,
                "routing": self.routing, "assumptions": self.assumptions}

    @property
    def load_kwargs(self) -> dict:
        """The `load_offloaded` keyword arguments of the chosen option."""
        c = self.chosen
        out = {"cache_capacity": c.slots, "host_store": c.host_store, "misses": c.misses}
        if c.misses != "fetch":  # the threads the host kernel's rates were charged for
            out["host_threads"] = self.host_threads
        if c.lossy:
            out["compression"] = c.compression
        if c.host_activations != "fp32":
            out["host_activations"] = c.host_activations
        return out

    def summary(self) -> str:
        c = self.chosen
        lines = [f"plan for {self.shape} on {self.machine['gpu']} + {self.machine['host']} "
                 f"({self.machine['ram_bytes'] / GiB:.0f} GiB RAM, disk {self.machine['disk_bytes_per_s'] / 1e9:.1f} "
                 "GB/s):",
                 f"  experts: {c.compression}{' (lossy: changes numerics)' if c.lossy else ' (as published)'}",
                 f"  GPU:  {c.gpu_bytes / GiB:6.2f} GiB  non-expert weights + {c.slots} expert slots "
                 f"(capacity {c.capacity:.3f}) + KV cache + reserve",
                 f"  RAM:  {c.ram_bytes / GiB:6.2f} GiB  host store ({c.host_store}"
                 + (f", {c.ram_fraction:.0%} of the experts in the page cache" if c.host_store == "mmap" else "") + ")",
                 f"  disk: {c.disk_bytes / GiB:6.2f} GiB  experts read from the mmap'd checkpoint files"
                 + (f" ({c.disk_s_per_token * 1e3:.1f} ms/token charged)" if c.disk_bytes else ""),
                 f"  misses: {c.misses}; host threads: {self.host_threads}; host activations: {c.host_activations}"
                 + (" (int8 per 32 columns: changes numerics)" if c.host_activations == "int8" else ""),
                 f"  simulated decode: {c.tok_s:.1f} tok/s (hit rate {c.hit_rate:.2f}, "
                 f"{c.misses_per_token:.1f} misses/token; routing: {self.routing})",
                 "  load_offloaded(path, " + ", ".join(f"{k}={v!r}" for k, v in self.load_kwargs.items()) + ")",
                 "  assumptions:"]
        lines += [f"    - {a}" for a in self.assumptions]
        return "\n".join(lines)


def _compressions(shape: ModelShape, lossy: bool) -> list[str]:
    """Expert formats to try: as the checkpoint holds them; int8 / int4 re-encodings of bf16 experts."""
    out = ["none"]
    if lossy and shape.expert_dtype in ("bf16", "fp16", "fp32"):
        out += list(LOSSY)
    return out


def make_plan(shape: ModelShape, machine: Machine, *, lossy: bool = True, stream=None, context: int = 2048,
              passes: int = 48, compute: str = "hf-eager", activations: tuple[str, ...] | None = None) -> FitPlan:
    """The fastest setting of `shape` on `machine` (see the module docstring).

    Args:
        shape: the model (`ModelShape.from_name` / `from_file`).
        machine: GPU, host, RAM and disk.
        lossy: also try int8 / int4-g128 re-encodings of bf16 experts (they change numerics).
        stream: routing of the model's geometry to simulate on (None: synthetic uniform routing).
        context: KV tokens per sequence (device memory and attention time).
        passes: decode passes of the synthetic routing.
        activations: the host kernel's activations to try with misses on the host (`OffloadConfig.host_activations`;
            "int8" only where the format has that kernel). None: ("fp32", "int8") if `lossy`, else ("fp32",).

    Raises:
        ValueError: the model does not fit (non-expert weights larger than the GPU, experts larger than RAM
            plus a format the files can serve), or a stream of another geometry.
    """
    routing = "recorded routing of this geometry"
    if stream is None:
        stream = synthetic_stream(shape, passes=passes)
        routing = (f"synthetic: {passes} decode steps, uniform random top-{shape.top_k} of {shape.num_experts} "
                   "per layer (no locality: pessimistic for the cache)")
    stream.check_geometry(shape.moe_layers, shape.top_k, shape.num_experts)
    ops, model = load_op_counts(shape.model_type), ComputeModel.from_name(compute)
    activations = activations or (("fp32", "int8") if lossy else ("fp32",))
    ram_for_experts = machine.ram_bytes - RAM_RESERVE_BYTES
    options, why_not = [], []
    for scheme in _compressions(shape, lossy):
        s = shape.compressed(scheme)
        mem = memory_plan(s, machine.gpu, (1.0,), context=context)
        slots = mem["max_slots"]
        if slots < 1:
            why_not.append(f"{scheme}: the non-expert weights, KV cache and reserve leave no room for a slot on "
                           f"{machine.gpu.name}")
            continue
        store = s.moe_layers * s.num_experts * s.slot_bytes
        if store <= ram_for_experts:
            host_store, ram_fraction = "ram", 1.0
        elif scheme != "none" or s.expert_dtype.startswith(("gptq", "awq")):
            why_not.append(f"{scheme}: its {store / GiB:.1f} GiB store exceeds RAM and cannot be served from the "
                           "checkpoint files (re-encoded, or GPTQ's concatenated parts)")
            continue
        else:
            host_store, ram_fraction = "mmap", ram_for_experts / store
        exact = expert_format(s.expert_dtype, s.compression)
        modes = [a for a in activations if expert_format(s.expert_dtype, s.compression, a) != exact or a == "fp32"]
        for misses, acts in [("fetch", "fp32")] + [("auto", a) for a in modes or ["fp32"]]:
            run = simulate(stream, s, machine.gpu, slots, ops=ops, compute=model, context=context,
                           warmup_passes=stream.num_passes // 4, misses=misses,
                           host=machine.host if misses != "fetch" else None, host_activations=acts)
            tokens = max(run.tokens, 1)
            disk_s = run.misses * (1 - ram_fraction) * s.slot_bytes / machine.disk_bytes_per_s
            tok_s = tokens / (run.time_s + disk_s) if run.time_s + disk_s > 0 else 0.0
            gpu = mem["nonexpert_bytes"] + slots * s.slot_bytes + mem["kv_bytes"] + mem["reserve_bytes"]
            options.append(Option(
                compression=str(s.compression if scheme != "none" else s.expert_dtype), slots=slots,
                capacity=slots / (s.moe_layers * s.num_experts), host_store=host_store, ram_fraction=ram_fraction,
                misses=misses, tok_s=tok_s, hit_rate=run.hit_rate, misses_per_token=run.misses / tokens,
                disk_s_per_token=disk_s / tokens, gpu_bytes=gpu, ram_bytes=min(store, ram_for_experts),
                disk_bytes=max(0, store - ram_for_experts), lossy=scheme != "none", host_activations=acts))
    if not options:
        raise ValueError(f"{shape.name} does not fit this machine: " + "; ".join(why_not))
    chosen = max(options, key=lambda o: o.tok_s)
    assumptions = [
        f"GPU {machine.gpu.name}: {machine.gpu.source}",
        f"host {machine.host.name}: {machine.host.description or machine.host.source}",
        f"{RAM_RESERVE_BYTES // GiB} GiB of RAM reserved for the OS and the process; "
        f"{DEVICE_RESERVE_BYTES // GiB} GiB of GPU memory for the CUDA context, allocator and activations",
        f"KV cache of one {context}-token sequence on the GPU",
        f"routing {routing}",
        f"compute model {compute}: {model.source}" if getattr(model, "source", "") else f"compute model {compute}",
        f"disk {machine.disk_bytes_per_s / 1e9:.1f} GB/s; a miss whose expert is not in the page cache reads it "
        "from disk before it is copied or computed, not overlapped with compute; which experts are in RAM is "
        "uniform (the page cache keeps no hotter ones)",
        "host misses at the host profile's rates of the kernel of the experts' format (" + machine.host.kernel_name
        + "); with host_activations='int8' (opt-in, changes numerics), MXFP4 experts at the int8-activation "
        "kernel's",
    ]
    if why_not:
        assumptions.append("not possible: " + "; ".join(why_not))
    machine_d = {"gpu": machine.gpu.name, "gpu_bytes": machine.gpu.memory_bytes, "host": machine.host.name,
                 "ram_bytes": machine.ram_bytes, "disk_bytes_per_s": machine.disk_bytes_per_s}
    return FitPlan(shape.name, machine_d, chosen, options, host_threads=machine.host.threads, routing=routing,
                   assumptions=assumptions)

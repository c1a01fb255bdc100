"""The bound every result is compared with, and what fits in a device's memory.

No cache of S slots can move fewer expert bytes than Belady's MIN with demand fetching (prefetching moves
the same experts earlier, or more), and no run is faster than its compute alone, so a run of the stream takes
at least max(compute time, MIN miss bytes / host->device bandwidth).

When misses may also be computed on the host, a miss costs either its copy or its host compute, and the two
run side by side: no placement misses fewer accesses than Belady's MIN *with bypass* (a newcomer used last is
not loaded), so a run takes at least max(device compute, copied bytes / bandwidth, host compute) for the best
split of those misses between the link and the host (`host_bound`).
"""

# Shape legend: L MoE layers, E experts, S slots

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..runtime.capacity import resolve_capacity
from .compute import ComputeModel, OpCounts
from .engine import SimResult, simulate
from .hardware import GiB, HardwareProfile
from .shapes import ModelShape
from .stream import RoutingStream

DEVICE_RESERVE_BYTES = 1 * GiB  # CUDA context, allocator slack and activations; an assumption (see memory_plan)


@dataclass
class Bound:
    """max(compute time, MIN miss bytes / bandwidth) over the measured passes."""

    compute_s: float  # the unwrapped model, all experts resident
    min_misses: int  # Belady's MIN with demand fetching
    min_bytes: int
    transfer_s: float  # min_bytes / h2d bandwidth
    tokens: int

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.transfer_s)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.time_s if self.time_s > 0 else 0.0

    def fraction(self, result: SimResult | float) -> float:
        """How close a run comes to the bound: its tok/s over the bound's (<= 1 within the model)."""
        tok_s = result.tok_s if isinstance(result, SimResult) else float(result)
        return tok_s / self.tok_s if self.tok_s else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "time_s": self.time_s, "tok_s": self.tok_s}


def demand_bound(stream: RoutingStream, shape: ModelShape, profile: HardwareProfile, capacity, *, ops: OpCounts,
                 compute: ComputeModel | None = None, context: int = 512, warmup_passes: int = 0,
                 unwrapped: SimResult | None = None, belady: SimResult | None = None) -> Bound:
    """The bound at `capacity` (pass the unwrapped and Belady runs if already simulated)."""
    kw = dict(ops=ops, compute=compute, context=context, warmup_passes=warmup_passes)
    unwrapped = unwrapped or simulate(stream, shape, profile, None, **kw)
    belady = belady or simulate(stream, shape, profile, capacity, policy="belady", **kw)
    return Bound(compute_s=unwrapped.time_s, min_misses=belady.misses, min_bytes=belady.bytes_moved,
                 transfer_s=belady.bytes_moved / profile.h2d_bytes_per_s, tokens=unwrapped.tokens)


def memory_plan(shape: ModelShape, profile: HardwareProfile, capacities=(0.125, 0.25, 0.5, 0.75, 1.0), *,
                context: int = 2048, reserve: int = DEVICE_RESERVE_BYTES) -> dict:
    """Device memory of the model unwrapped and wrapped at each capacity, and the largest capacity that fits.

    Device memory = weights on the device (all, or non-expert + slots) + the KV cache of one `context`-token
    sequence + `reserve` (CUDA context, allocator slack, activations: an assumption, 1 GiB by default; the
    GPU benchmark records NVML's view next to torch's to check it). With compression a slot holds the
    compressed expert (`shape.slot_bytes`); "unwrapped" is the model as it was (experts uncompressed).
    """
    L, E = shape.moe_layers, shape.num_experts
    fixed = shape.kv_bytes(context) + reserve
    rows = []
    for cap in capacities:
        slots = resolve_capacity(cap, L, E, shape.slot_bytes)
        need = shape.nonexpert_bytes + slots * shape.slot_bytes + fixed
        rows.append({"capacity": slots / (L * E), "slots": slots, "device_bytes": need,
                     "fits": need <= profile.memory_bytes})
    free_for_slots = profile.memory_bytes - shape.nonexpert_bytes - fixed
    max_slots = max(0, min(L * E, free_for_slots // shape.slot_bytes))
    unwrapped = shape.total_bytes + fixed
    return {
        "shape": shape.name,
        "profile": profile.name,
        "context": context,
        "reserve_bytes": reserve,
        "kv_bytes": shape.kv_bytes(context),
        "nonexpert_bytes": shape.nonexpert_bytes,
        "compression": shape.compression,
        "slot_bytes": shape.slot_bytes,
        "uncompressed_slot_bytes": shape.uncompressed_slot_bytes,
        "unwrapped_bytes": unwrapped,
        "unwrapped_fits": unwrapped <= profile.memory_bytes,
        "wrapped": rows,
        "max_slots": int(max_slots),
        "max_capacity": max_slots / (L * E),
    }


def demand_misses(stream: RoutingStream, num_experts: int, slots: int, policy: str = "belady",
                  warmup_passes: int = 0) -> int:
    """Misses of a demand-fetching cache of `slots` experts over `stream` (after `warmup_passes`).

    Cache decisions without prefetching do not depend on timing, so no model shape or profile is needed.
    """
    proxy = ModelShape.from_config(dict(
        model_type="mixtral", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=stream.num_layers,
        num_attention_heads=1, num_key_value_heads=1, num_local_experts=num_experts,
        num_experts_per_tok=stream.top_k), name="routing-geometry proxy")
    ops = OpCounts(layer=0, experts=0, per_pass=0)
    return simulate(stream, proxy, HardwareProfile("proxy", 2**40, 1e9, 1e12, 1e12), slots, ops=ops, policy=policy,
                    warmup_passes=warmup_passes).misses


def measured_bound(stream: RoutingStream, num_experts: int, slots: int, slot_bytes: int, compute_s_per_token: float,
                   h2d_bytes_per_s: float, warmup_passes: int = 0) -> dict:
    """The bound for a measured run: max(compute time per token, MIN miss bytes per pass / measured bandwidth),
    with the compute time of the unwrapped model as measured."""
    misses = demand_misses(stream, num_experts, slots, "belady", warmup_passes)
    passes = stream.num_passes - warmup_passes
    transfer = misses * slot_bytes / passes / h2d_bytes_per_s
    per_token = max(compute_s_per_token, transfer)
    return {"min_misses": misses, "passes": passes, "compute_s_per_token": compute_s_per_token,
            "transfer_s_per_token": transfer, "h2d_bytes_per_s": h2d_bytes_per_s, "tok_s": 1 / per_token}


def bypass_misses(stream: RoutingStream, slots: int, warmup_passes: int = 0) -> list[int]:
    """Belady's MIN with bypass over `stream` with `slots` slots: an access to an expert that is not resident
    either loads it (evicting the resident expert used furthest in the future) or, when it is itself used
    furthest in the future, leaves the cache as it is (computed elsewhere: on the host). No placement, static
    or dynamic, misses fewer accesses. Returns, per miss in the measured passes, the tokens routed to it."""
    import heapq
    from collections import Counter

    calls = []  # (time, key, tokens) per (pass, layer, distinct expert), in order
    for p, ids in enumerate(stream.passes()):
        rows = ids.tolist()  # [T][L][k]
        for layer in range(stream.num_layers):
            counts = Counter(e for row in rows for e in row[layer] if e >= 0)
            calls.extend((p, (layer, e), n) for e, n in sorted(counts.items()))
    never = len(calls)
    next_use = [never] * len(calls)
    seen: dict = {}
    for i in range(len(calls) - 1, -1, -1):
        key = calls[i][1]
        next_use[i] = seen.get(key, never)
        seen[key] = i
    resident: dict = {}  # key -> its next use
    heap: list = []  # (-next use, key), lazily deleted
    out = []
    for i, (p, key, n) in enumerate(calls):
        nxt = next_use[i]
        if key in resident:
            resident[key] = nxt
            heapq.heappush(heap, (-nxt, key))
            continue
        if p >= warmup_passes:
            out.append(n)
        if len(resident) < slots:
            resident[key] = nxt
            heapq.heappush(heap, (-nxt, key))
            continue
        while heap and resident.get(heap[0][1]) != -heap[0][0]:
            heapq.heappop(heap)  # stale entries
        far, victim = -heap[0][0], heap[0][1]
        if nxt >= far:
            continue  # bypass: the newcomer is needed last
        heapq.heappop(heap)
        del resident[victim]
        resident[key] = nxt
        heapq.heappush(heap, (-nxt, key))
    return out


@dataclass
class HostBound:
    """max(device compute, PCIe bytes / bandwidth, host compute) under the best placement (module docstring):
    Belady-with-bypass misses, each either copied (`copy_s`) or computed on the host, split between the two so
    that the slower side is as short as it can be."""

    compute_s: float  # the unwrapped model, all experts resident (an upper estimate of the device's share)
    misses: int  # Belady's MIN with bypass
    fetched: int  # of them, copied in the best split
    transfer_s: float  # fetched * copy time (bytes / bandwidth)
    host_s: float  # the rest computed on the host
    tokens: int

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.transfer_s, self.host_s)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.time_s if self.time_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "time_s": self.time_s, "tok_s": self.tok_s}


def host_bound(stream: RoutingStream, shape: ModelShape, profile: HardwareProfile, host, capacity, *, ops: OpCounts,
               compute: ComputeModel | None = None, context: int = 512, warmup_passes: int = 0,
               unwrapped: SimResult | None = None) -> HostBound:
    """The bound at `capacity` when misses may run on the host (`host`: a `sim.host.HostProfile`)."""
    from .engine import HostMissCosts

    unwrapped = unwrapped or simulate(stream, shape, profile, None, ops=ops, compute=compute, context=context,
                                      warmup_passes=warmup_passes)
    slots = resolve_capacity(capacity, shape.moe_layers, shape.num_experts, shape.slot_bytes)
    misses = bypass_misses(stream, slots, warmup_passes)
    costs = HostMissCosts(profile.copy_seconds(shape.transfer_bytes), host, shape)
    host_times = sorted((costs.host_seconds(n) for n in misses), reverse=True)  # fetch the costliest on the host
    suffix = [0.0] * (len(host_times) + 1)
    for i in range(len(host_times) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + host_times[i]
    best = min(range(len(host_times) + 1), key=lambda f: max(f * costs.copy_s, suffix[f]))
    return HostBound(compute_s=unwrapped.time_s, misses=len(misses), fetched=best, transfer_s=best * costs.copy_s,
                     host_s=suffix[best], tokens=unwrapped.tokens)

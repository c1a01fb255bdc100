"""The event model: replay a routing stream through SpeculativeMoE's logic on a hardware profile.

Two clocks, host `h` and device `g`, and one copy engine. Per MoE layer of a pass, as the runtime does it:

1. the host launches the layer's attention/router part; the device runs it (g >= h: it cannot finish
   before its last kernel was launched);
2. wrapped: the runtime syncs (h = g), does its bookkeeping, fetches the routed experts that are missing
   (demand copies, queued behind copies already issued: one FIFO copy engine) and issues prefetches for the
   predictor's candidates (bounded in flight; never evicting a slot in use, in flight, or predicted);
3. the experts call runs on the device once its experts' copies have landed; the wait is *stall*.

Unwrapped (capacity None) every expert is resident: steps 2-3 cost nothing but the experts call.
Cache slots, eviction and prefetch bookkeeping reuse the runtime's `ExpertCache` and policies.
"""

# Shape legend: T tokens, E experts, L MoE layers, k top-k, S slots, P passes

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..runtime.cache import ExpertCache
from ..runtime.capacity import resolve_capacity
from .compute import ComputeModel, OpCounts, expert_device_seconds, pass_costs
from .hardware import HardwareProfile
from .policies import make_sim_policy
from .predictions import Candidates
from .shapes import ModelShape
from .stream import RoutingStream

Key = tuple[int, int]


@dataclass
class SimResult:
    """What one simulated run did over its measured passes (warm-up passes excluded)."""

    passes: int = 0
    tokens: int = 0
    time_s: float = 0.0
    stall_s: float = 0.0
    hits: int = 0
    hits_in_flight: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    copies: int = 0
    bytes_moved: int = 0
    num_slots: int | None = None  # None: unwrapped, all experts resident
    device_bytes: int = 0  # weights + cache on the device (no KV cache, no workspace)
    pass_times: list[float] = field(default_factory=list, repr=False)  # every pass, warm-up included

    @property
    def tok_s(self) -> float:
        return self.tokens / self.time_s if self.time_s > 0 else 0.0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0

    @property
    def prefetch_precision(self) -> float:
        settled = self.prefetch_used + self.prefetch_wasted
        return self.prefetch_used / settled if settled else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Share of the routed experts not kept by the cache itself that a prefetch brought in time or late."""
        n = self.prefetch_used + self.misses
        return self.prefetch_used / n if n else 0.0

    def to_dict(self, pass_times: bool = False) -> dict:
        out = asdict(self)
        if not pass_times:
            out.pop("pass_times")
        out.update(tok_s=self.tok_s, hit_rate=self.hit_rate, prefetch_precision=self.prefetch_precision,
                   prefetch_recall=self.prefetch_recall)
        return out


def device_weight_bytes(shape: ModelShape, num_slots: int | None) -> int:
    """Weights on the device: everything (unwrapped) or non-expert weights + the slot pool."""
    if num_slots is None:
        return shape.total_bytes
    return shape.nonexpert_bytes + num_slots * shape.slot_bytes


def simulate(
    stream: RoutingStream,
    shape: ModelShape,
    profile: HardwareProfile,
    capacity: float | int | str | None,
    *,
    ops: OpCounts,
    compute: ComputeModel | None = None,
    policy: str = "lru",
    candidates: Candidates | None = None,
    max_prefetch_inflight: int | None = None,
    lookahead: int = 1,
    context: int = 512,
    warmup_passes: int = 0,
) -> SimResult:
    """Replay `stream` on `profile` with `shape`'s sizes.

    Args:
        stream: the routing (its L, E and k must be the shape's).
        capacity: as `SpeculativeMoE`'s cache_capacity (fraction, slots or "24GiB"-style budget); None
            simulates the unwrapped model with every expert on the device.
        ops: the family's op counts (`count_ops(shape.model_type)`).
        compute: software constants (default: the "hf-eager" preset).
        policy: "lru", "lfu", "prediction-aware" or "belady" (Belady's MIN: demand fetching only).
        candidates: per pass and layer, the ranked keys a predictor would prefetch (`predictions.py`, where
            the prefetch width is applied); None: no predictor (demand fetching only).
        max_prefetch_inflight / lookahead: as `SpeculativeMoE` (the bound defaults to 2 * k * lookahead).
        context: tokens already in the KV cache when a pass starts (attention reads them).
        warmup_passes: passes replayed before measuring (the cache warms up; their time is not counted).

    Returns:
        A SimResult over the measured passes (`pass_times` holds every pass).

    Raises:
        ValueError: the stream's geometry differs from the shape's, or the inputs do not fit together.
    """
    stream.check_geometry(shape.moe_layers, shape.top_k, shape.num_experts)
    if candidates is not None and len(candidates) != stream.num_passes:
        raise ValueError(f"candidates cover {len(candidates)} passes, the stream has {stream.num_passes}")
    if not 0 <= warmup_passes < stream.num_passes:
        raise ValueError(f"warmup_passes must be in [0, {stream.num_passes}), got {warmup_passes}")
    if policy == "belady" and candidates is not None:
        raise ValueError("Belady's MIN is the optimal *demand* cache: simulate it without candidates")
    replay = _Replay(stream, shape, profile, capacity, ops, compute or ComputeModel.from_name("hf-eager"), policy,
                     candidates, max_prefetch_inflight or 2 * shape.top_k * lookahead, context)
    return replay.run(warmup_passes)


_COUNTERS = ("hits", "hits_in_flight", "misses", "prefetch_issued", "prefetch_used", "prefetch_wasted", "copies",
             "bytes_moved", "stall_s")


class _Replay:
    """State of one simulated run (see the module docstring for the order of events)."""

    def __init__(self, stream, shape, profile, capacity, ops, compute, policy, candidates, max_inflight, context):
        L, E = shape.moe_layers, shape.num_experts
        self.stream, self.shape, self.profile, self.ops, self.compute = stream, shape, profile, ops, compute
        self.passes = stream.passes()
        self.candidates = candidates
        self.max_inflight = max_inflight
        self.context = context
        self.wrapped = capacity is not None
        self.num_slots = resolve_capacity(capacity, L, E, shape.slot_bytes) if self.wrapped else None
        self.transfer_bytes = shape.transfer_bytes
        self.copy_s = profile.copy_seconds(self.transfer_bytes)
        self.res = SimResult(num_slots=self.num_slots, device_bytes=device_weight_bytes(shape, self.num_slots))
        self.h = self.g = 0.0  # host and device clocks
        self.engine_free = 0.0  # when the copy engine finishes the last copy issued
        self.ready = [0.0] * (self.num_slots or 0)  # when the copy into each slot lands
        self.prefetched: dict[int, Key] = {}  # slot -> key, prefetched and not used yet
        self.inflight: set[int] = set()
        self.in_use: set[int] = set()
        self.predicted: set[Key] = set()
        self.measuring = False
        self.cache = None
        if self.wrapped:
            pol = make_sim_policy(policy, self.passes, L)
            self.cache = ExpertCache(self.num_slots, L, E, "cpu", pol)
            if hasattr(pol, "bind"):
                pol.bind(self.cache, L)
        self._observe = getattr(self.cache.policy, "observe", None) if self.wrapped else None
        self._observe_time = getattr(self.cache.policy, "observe_time", None) if self.wrapped else None

    def run(self, warmup_passes: int) -> SimResult:
        res, L, k = self.res, self.shape.moe_layers, self.shape.top_k
        costs_by_tokens: dict[int, object] = {}
        before = {name: 0 for name in _COUNTERS}
        for p, ids in enumerate(self.passes):
            if p == warmup_passes:
                self.measuring = True
                before = {name: getattr(res, name) for name in _COUNTERS}
            T = ids.shape[0]
            c = costs_by_tokens.get(T)
            if c is None:
                c = costs_by_tokens[T] = pass_costs(self.shape, self.profile, self.compute, self.ops, T, self.context)
            start = self.h = self.g = max(self.h, self.g)
            routed = ids.tolist()  # [T][L][k]
            for layer in range(L):
                self.h += c.host_layer
                self.g = max(self.g + c.dev_layer, self.h)
                chosen = [row[layer][j] for row in routed for j in range(k) if row[layer][j] >= 0]
                needed = sorted(set(chosen))
                if self.wrapped:
                    self._wrapped_layer(p, layer, needed, len(chosen), c)
                else:
                    self.h += c.host_experts
                    self.g = max(self.g + expert_device_seconds(c, len(needed), len(chosen)), self.h)
            self.h += c.host_pass
            self.g = max(self.g + c.dev_pass, self.h)
            end = self.h = self.g = max(self.h, self.g)
            res.pass_times.append(end - start)
            if self.measuring:
                res.passes += 1
                res.tokens += T
                res.time_s += end - start
        for name in _COUNTERS:  # the warm-up's counters are not part of the result
            setattr(res, name, getattr(res, name) - before[name])
        return res

    # ---- the runtime's experts call: sync, route, acquire, pump, compute ---------------------------------
    def _wrapped_layer(self, p: int, layer: int, needed: list[int], pairs: int, c) -> None:
        cache, L = self.cache, self.shape.moe_layers
        self.h = max(self.h, self.g) + c.host_wrapper + (c.host_predictor if self.candidates is not None else 0.0)
        queue = list(self.candidates[p][layer]) if self.candidates is not None else []
        self.predicted = set(queue)
        self.queue = [key for key in queue if key not in cache.slot_of]
        if self._observe is not None:
            self._observe(layer, self.predicted, needed)
        if self._observe_time is not None:
            self._observe_time(p * L + layer)
        if len(needed) <= self.num_slots:
            slots = self._acquire(layer, needed, c)
            self._pump(c)
            self._run_experts(slots, len(needed), pairs, c)
            self.in_use.clear()
            return
        # more distinct experts than slots: prefetches land first, then chunks of at most S experts
        self.h = max([self.h] + [self.ready[s] for s in self.inflight])
        self.inflight.clear()
        for i in range(0, len(needed), self.num_slots):
            chunk = needed[i : i + self.num_slots]
            slots = self._acquire(layer, chunk, c)
            self._run_experts(slots, len(chunk), pairs * len(chunk) // len(needed), c)
            self.in_use.clear()
        self._pump(c)

    def _evictable(self, slot: int) -> bool:
        return slot not in self.in_use and self.ready[slot] <= self.h

    def _take_slot(self, key: Key, demand: bool, c) -> int | None:
        cache = self.cache
        if demand:
            got = cache.assign(key, self._evictable)
            if got is None:  # every other slot is in use or in flight: let those copies land
                self.h = max([self.h] + [self.ready[s] for s in range(self.num_slots) if s not in self.in_use])
                got = cache.assign(key, self._evictable)
                if got is None:
                    raise RuntimeError(f"no cache slot for expert {key}: all {self.num_slots} slots are in use")
        else:
            got = cache.assign(key, lambda s: self._evictable(s) and cache.key_of[s] not in self.predicted)
            if got is None:
                return None
        slot, _ = got
        if self.prefetched.pop(slot, None) is not None:
            self.res.prefetch_wasted += 1
        self.h += c.copy_issue
        self.engine_free = max(self.engine_free, self.h) + self.copy_s
        self.ready[slot] = self.engine_free
        self.res.copies += 1
        self.res.bytes_moved += self.transfer_bytes
        return slot

    def _acquire(self, layer: int, experts: list[int], c) -> list[int]:
        res, slots = self.res, []
        for e in experts:
            key = (layer, e)
            slot = self.cache.lookup(key)
            if slot is not None:
                res.hits += 1
                if self.ready[slot] > self.h:
                    res.hits_in_flight += 1
                if self.prefetched.pop(slot, None) is not None:
                    res.prefetch_used += 1
                self.cache.touch(slot)
            else:
                res.misses += 1
                slot = self._take_slot(key, True, c)
            self.in_use.add(slot)
            slots.append(slot)
        return slots

    def _pump(self, c) -> None:
        while self.queue:
            if len(self.inflight) >= self.max_inflight:
                self.inflight = {s for s in self.inflight if self.ready[s] > self.h}
                if len(self.inflight) >= self.max_inflight:
                    break
            key = self.queue.pop(0)
            if key in self.cache.slot_of:
                continue
            slot = self._take_slot(key, False, c)
            if slot is None:  # nothing may be evicted for a guess
                self.queue.clear()
                break
            self.inflight.add(slot)
            self.prefetched[slot] = key
            self.res.prefetch_issued += 1

    def _run_experts(self, slots: list[int], distinct: int, pairs: int, c) -> None:
        landed = max((self.ready[s] for s in slots), default=0.0)
        free_at = max(self.g, self.h)
        self.res.stall_s += max(0.0, landed - free_at)
        self.h += c.host_experts
        self.g = max(max(free_at, landed) + expert_device_seconds(c, distinct, pairs), self.h)

"""The event model: replay a routing stream through SpeculativeMoE's logic on a hardware profile.

Two clocks, host `h` and device `g`, and one copy engine. Per MoE layer of a pass, as the runtime does it:

1. the host launches the layer's attention/router part; the device runs it (g >= h: it cannot finish
   before its last kernel was launched);
2. wrapped: the runtime syncs (h = g), does its bookkeeping, fetches the routed experts that are missing
   (demand copies, queued behind copies already issued: one FIFO copy engine) and issues prefetches for the
   predictor's candidates (bounded in flight; never evicting a slot in use, in flight, or predicted);
3. the experts call runs on the device once its experts' copies have landed; the wait is *stall*.

With misses="host"/"auto" (a `HostProfile` given), the scheduler's `split` sends some missed experts to the
host: the layer's hidden state crosses PCIe, a host worker (its own clock `w`) computes them from RAM while the
device computes the resident ones, and the layer ends when both have (the host's output crossing back).

Unwrapped (capacity None) every expert is resident: steps 2-3 cost nothing but the experts call.
Every decision of step 2 (acquire, evict, prefetch, chunk, admission; the counters) is the runtime's own
scheduler (`specmoe.runtime.scheduler`): the replay asks it for each layer call's plan (`Scheduler.plan`) and
carries the plan out with `Scheduler.step`, in the runtime's order, on `ClockEngine`, a copy engine on a clock;
it holds no sequence of scheduler calls of its own. The result is the runtime's `Stats` (the same counters,
per MoE layer) with the clock's figures (`SimResult`). The scheduler's costs (`clock.replay_costs`: one copy,
the host's compute, the layer period, the predictor's host time) are the profiles' and the compute model's; the
runtime's own bookkeeping is charged as measured (`compute.Bookkeeping`, `sim/calibration/bookkeeping.json`): the
policy's per layer call, the predictor's per predicted call, and per copy on top of issuing it.
"""

# Shape legend: T tokens, E experts, L MoE layers, k top-k, S slots, P passes

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..runtime.cache import ExpertCache
from ..runtime.capacity import resolve_capacity
from ..runtime.config import OffloadConfig
from ..runtime.misses import hottest
from ..runtime.scheduler import Scheduler
from ..runtime.stats import LayerStats, Stats
from .clock import ClockEngine, HostMissCosts, replay_costs
from .compute import ComputeModel, OpCounts, bookkeeping_charges, expert_device_seconds, pass_costs
from .hardware import HardwareProfile
from .host import HostProfile
from .policies import make_sim_policy
from .predictions import Candidates
from .shapes import ModelShape
from .stream import RoutingStream

__all__ = ["ClockEngine", "HostMissCosts", "SimResult", "device_weight_bytes", "gc_paused", "simulate",
           "stream_frequencies"]
_FROM_CONFIG = object()  # capacity not given: the config's


@dataclass
class SimResult(Stats):
    """What one simulated run did over its measured passes (warm-up passes excluded): the runtime's `Stats`
    (the same counters, per MoE layer, from the same scheduler) and the clock's figures."""

    passes: int = 0
    tokens: int = 0
    time_s: float = 0.0
    host_s: float = 0.0  # seconds the host worker spent on experts (and their hidden states crossing)
    num_slots: int | None = None  # None: unwrapped, all experts resident
    device_bytes: int = 0  # weights + cache on the device (no KV cache, no workspace)
    pass_times: list[float] = field(default_factory=list, repr=False)  # every pass, warm-up included

    @property
    def tok_s(self) -> float:
        return self.tokens / self.time_s if self.time_s > 0 else 0.0

    def to_dict(self, pass_times: bool = False, per_layer: bool = False) -> dict:
        out = super().to_dict()
        if not per_layer:
            out.pop("per_layer")
        out.update(passes=self.passes, tokens=self.tokens, time_s=self.time_s, host_s=self.host_s,
                   num_slots=self.num_slots, device_bytes=self.device_bytes, tok_s=self.tok_s)
        if pass_times:
            out["pass_times"] = list(self.pass_times)
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
    capacity: float | int | str | None = _FROM_CONFIG,
    *,
    ops: OpCounts,
    config: OffloadConfig | None = None,
    compute: ComputeModel | None = None,
    candidates: Candidates | None = None,
    lookahead: int = 1,
    context: int = 512,
    warmup_passes: int = 0,
    host: HostProfile | None = None,
    placement=None,
    predictor: str | None = None,
    **settings,
) -> SimResult:
    """Replay `stream` on `profile` with `shape`'s sizes, under the offloading settings `config` (the runtime's
    `OffloadConfig`; the same names as keyword arguments override it, as for `SpeculativeMoE`).

    Args:
        stream: the routing (its L, E and k must be the shape's).
        capacity: as `SpeculativeMoE`'s cache_capacity (fraction, slots or "24GiB"-style budget; default: the
            config's); None simulates the unwrapped model with every expert on the device.
        ops: the family's op counts (`count_ops(shape.model_type)`).
        config / settings: `policy` (the runtime's, or "belady": Belady's MIN, demand fetching only),
            `max_prefetch_inflight` (default 2 * k * lookahead, `OffloadConfig.inflight`), `misses` ("fetch",
            "host" or "auto"; the last two need `host`), `transfer` ("sync": the host copies and waits, as the
            runtime's synchronous CPU engine, no copy ever in flight; any other engine, or "stream", copies on a
            copy engine overlapping compute). The experts' compression is the shape's.
        compute: software constants (default: the "hf-eager" preset).
        candidates: per pass and layer, the ranked keys a predictor would prefetch (`predictions.py`, where
            the prefetch width is applied); None: no predictor (demand fetching only).
        lookahead: the predictor's (for the in-flight bound's default).
        context: tokens already in the KV cache when a pass starts (attention reads them).
        warmup_passes: passes replayed before measuring (the cache warms up; their time is not counted).
        host: the host's profile (`specmoe.sim.host.HostProfile`), for misses computed on the host.
        placement: a static placement: routing frequencies [L][E], or "trace" (counted over this stream): the
            hottest experts fill the slots before the first pass (llama.cpp-style; with misses="host" and no
            candidates nothing is ever copied).
        predictor: the name of the predictor the candidates are of, for its measured bookkeeping
            (`compute.Bookkeeping`; None: the mean over the predictors measured).

    Returns:
        A SimResult over the measured passes (`pass_times` holds every pass).

    Raises:
        ValueError: the stream's geometry differs from the shape's, or the inputs do not fit together.
    """
    if settings.get("transfer") == "stream":  # the simulator's old name of an asynchronous copy engine
        settings["transfer"] = None
    wrapped = capacity is not None
    if wrapped and capacity is not _FROM_CONFIG:
        settings["capacity"] = capacity
    cfg = OffloadConfig.build(config, **settings)
    stream.check_geometry(shape.moe_layers, shape.top_k, shape.num_experts)
    if candidates is not None and len(candidates) != stream.num_passes:
        raise ValueError(f"candidates cover {len(candidates)} passes, the stream has {stream.num_passes}")
    if not 0 <= warmup_passes < stream.num_passes:
        raise ValueError(f"warmup_passes must be in [0, {stream.num_passes}), got {warmup_passes}")
    if cfg.policy == "belady" and candidates is not None:
        raise ValueError("Belady's MIN is the optimal *demand* cache: simulate it without candidates")
    if cfg.misses != "fetch" and host is None:
        raise ValueError(f"misses={cfg.misses!r} needs a host profile (host=HostProfile.from_name('3090-box'))")
    replay = _Replay(stream, shape, profile, cfg.capacity if wrapped else None, ops,
                     compute or ComputeModel.from_name("hf-eager"), cfg.policy, candidates,
                     cfg.inflight(shape.top_k, lookahead), context, not cfg.asynchronous, cfg.misses, host,
                     predictor, cfg.host_activations)
    if placement is not None and replay.sched is not None:
        trace = isinstance(placement, str) and placement == "trace"
        replay.place(stream_frequencies(stream, shape.num_experts) if trace else placement)
    return replay.run(warmup_passes)


def stream_frequencies(stream: RoutingStream, num_experts: int) -> list[list[int]]:
    """[L][E] how often each expert was routed to over the whole stream."""
    L, E = stream.num_layers, num_experts
    counts = [[0] * E for _ in range(L)]
    for ids in stream.passes():
        for row in ids.tolist():  # [L][k]
            for layer, experts in enumerate(row):
                for e in experts:
                    if e >= 0:
                        counts[layer][e] += 1
    return counts


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while plain lists of a stream's routing are built: they hold no cycles, and a
    collection triggered every few hundred new lists walks every object alive (building those of 300k layer
    steps took 4x as long with it)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _routing_lists(stream: RoutingStream) -> tuple[list, list]:
    """Per pass, per MoE layer: the distinct routed experts (ascending) and the token-expert pairs, as plain lists
    made once (a decode pass's rows are the sorted ids themselves: no copy per layer)."""
    ids = stream.ids.sort(dim=-1).values  # [N, L, k]
    N, L, k = ids.shape
    plain = ((ids[..., 0] >= 0) & (ids[..., 1:] != ids[..., :-1]).all(-1)).all(-1).tolist()  # [N]: no -1, no repeats
    rows = ids.tolist()  # [N][L][k]
    off = stream.pass_offsets.tolist()
    full = [k] * L
    needed, pairs = [], []
    for a, b in zip(off[:-1], off[1:]):
        if b - a == 1 and plain[a]:
            needed.append(rows[a])
            pairs.append(full)
            continue
        chosen = [[e for t in range(a, b) for e in rows[t][layer] if e >= 0] for layer in range(L)]
        needed.append([sorted(set(c)) for c in chosen])
        pairs.append([len(c) for c in chosen])
    return needed, pairs


def _expert_tokens(stream: RoutingStream) -> list[list[Counter]]:
    """Per pass, per MoE layer: expert -> tokens routed to it (for misses computed on the host)."""
    rows = stream.ids.tolist()  # [N][L][k]
    off = stream.pass_offsets.tolist()
    return [[Counter(e for t in range(a, b) for e in rows[t][layer] if e >= 0) for layer in range(stream.num_layers)]
            for a, b in zip(off[:-1], off[1:])]


class _Replay:
    """State of one simulated run (see the module docstring for the order of events)."""

    def __init__(self, stream, shape, profile, capacity, ops, compute, policy, candidates, max_inflight, context,
                 sync_copies=False, misses="fetch", host=None, predictor=None, host_activations="fp32"):
        L, E = shape.moe_layers, shape.num_experts
        self.stream, self.shape, self.profile, self.ops, self.compute = stream, shape, profile, ops, compute
        self.passes = stream.passes()
        self.candidates = candidates
        self.context = context
        self.wrapped = capacity is not None
        self.num_slots = resolve_capacity(capacity, L, E, shape.slot_bytes) if self.wrapped else None
        copy_s = profile.copy_seconds(shape.transfer_bytes)  # compressed slots: the compressed bytes, no dequantize
        self.res = SimResult(per_layer=[], num_slots=self.num_slots,
                             device_bytes=device_weight_bytes(shape, self.num_slots))
        # The runtime's bookkeeping, as measured (`compute.Bookkeeping`): this policy's per layer call in place of
        # the default's (`wrapper_s`, in pass_costs' host_wrapper), its per copy on top of issuing the copy, and
        # the predictor's per predicted call.
        call_s, book_copy_s, self.predict_s = bookkeeping_charges(compute, str(policy), predictor)
        issue_s = compute.copy_issue_s + (book_copy_s if self.wrapped else 0.0)
        self.engine = ClockEngine(self.num_slots or 0, copy_s, issue_s, sync_copies)
        self.sched = costs = None
        self.policy_s = 0.0
        if self.wrapped:
            with gc_paused():  # Belady's MIN: every expert's future uses, as lists
                cache = ExpertCache(self.num_slots, L, E, None, make_sim_policy(policy, self.passes, L))
            # a learned policy's measured cost beyond the default's
            self.policy_s = call_s - compute.wrapper_s + getattr(cache.policy, "host_s_per_call", 0.0)
            costs = replay_costs(shape, profile, compute, ops, host, context, self.predict_s, host_activations)
            self.sched = Scheduler(cache, self.engine, L, max_inflight, shape.transfer_bytes, misses, costs)
            self.sched.predicting = candidates is not None  # as the runtime's HotPath.predictor tells it
        self.host_costs = costs
        self.on_host = self.wrapped and misses != "fetch"
        T_bytes = shape.hidden_size * shape.dtype_bytes  # one token's hidden state
        self.hidden_s = (lambda T: profile.copy_seconds(T * T_bytes)) if self.on_host else None

    def place(self, frequencies) -> None:
        """Fill the slots with the hottest experts of frequencies [L][E] before the first pass."""
        cache = self.sched.cache
        for key in hottest(frequencies, self.num_slots):
            slot, _ = cache.assign(key, lambda s: True)
            self.engine.ready_at[slot] = 0.0

    def run(self, warmup_passes: int) -> SimResult:
        """Replay every pass; the scheduler's plan of each MoE layer call (`Scheduler.plan` / `step`) is carried
        out on the clocks, in the runtime's order: plan, host experts submitted, acquire, compute issued,
        prefetches pumped while it runs, release."""
        res, eng, sched, candidates = self.res, self.engine, self.sched, self.candidates
        ready_at = eng.ready_at
        plan_call = sched.plan if sched is not None else None
        step = sched.step if sched is not None else None
        S = self.num_slots or 0
        costs_by_tokens: dict[int, object] = {}
        with gc_paused():
            routing, routed_pairs = _routing_lists(self.stream)
            counts = _expert_tokens(self.stream) if self.on_host else None
        tokens = self.stream.pass_tokens()
        before, stall, stall_before, calls_before, chunked_before = None, 0.0, 0.0, 0, 0
        g = 0.0  # the device clock (the host's is the engine's: the scheduler's copies move it)
        w = 0.0  # the host worker's clock (misses computed on the host)
        host_busy = host_before = 0.0
        cross = 0.0
        for p, per_layer in enumerate(routing):
            if p == warmup_passes:
                before, stall_before = ([LayerStats(**vars(x)) for x in sched.stats] if sched is not None else None), \
                    stall
                calls_before = sched.layer_calls if sched is not None else 0
                chunked_before = sched.chunked_calls if sched is not None else 0
                host_before = host_busy
            T = tokens[p]
            c = costs_by_tokens.get(T)
            if c is None:
                c = costs_by_tokens[T] = pass_costs(self.shape, self.profile, self.compute, self.ops, T, self.context)
            host_layer, dev_layer, host_experts = c.host_layer, c.dev_layer, c.host_experts
            dev_expert, dev_pair = c.dev_expert, c.dev_expert_tokens
            host_wrapper = c.host_wrapper + self.policy_s  # this policy's bookkeeping: every layer call
            host_call = host_wrapper + c.host_predictor + self.predict_s
            cands = candidates[p] if candidates is not None else None
            pairs_of = routed_pairs[p]
            h = eng.h
            start = h = g = h if h > g else g
            for layer, needed in enumerate(per_layer):
                pairs = pairs_of[layer]
                h += host_layer
                g += dev_layer
                if h > g:
                    g = h
                if sched is None or not pairs:  # unwrapped (every expert resident), or the layer did not run
                    h += host_experts
                    g += expert_device_seconds(c, len(needed), pairs)
                    if h > g:
                        g = h
                    continue
                # the runtime's experts call: sync, (predict,) route, plan, host experts, acquire, compute, pump,
                # release
                guess = cands is not None and sched.wants_prediction()
                eng.h = (h if h > g else g) + (host_call if guess else host_wrapper)
                per_expert = counts[p][layer] if counts is not None else None
                plan = plan_call(p, layer, needed, cands[layer] if guess else (), per_expert)
                on_host = plan.host
                if on_host:  # the hidden state crosses, the worker computes beside the device
                    cross = self.hidden_s(T)
                    start_w = w if w > eng.h else eng.h
                    w = start_w + cross + sum(self.host_costs.host_seconds(per_expert[e]) for e in on_host)
                    host_busy += w - start_w
                    pairs -= sum(per_expert[e] for e in on_host)
                device = plan.device
                if len(device) <= S:
                    step(plan)  # acquire
                    if device:
                        h = eng.h
                        free_at = g if g > h else h
                        for s in plan.slots:  # compute waits for the last copy to land
                            if ready_at[s] > free_at:
                                stall += ready_at[s] - free_at
                                free_at = ready_at[s]
                        h += host_experts
                        work = len(device) * dev_expert
                        if pairs * dev_pair > work:
                            work = pairs * dev_pair  # expert_device_seconds
                        g = free_at + work
                        if h > g:
                            g = h
                        eng.h = h
                    step(plan)  # the compute is issued: prefetch while it runs, release
                else:
                    n = len(device)
                    while step(plan):
                        free_at = max(g, eng.h)
                        landed = max([ready_at[s] for s in plan.slots] + [free_at])
                        stall += landed - free_at
                        eng.h += host_experts
                        g = max(landed + expert_device_seconds(c, len(plan.chunk), pairs * len(plan.chunk) // n), eng.h)
                if on_host:  # the runtime waits for the host's output, then adds it on the device
                    eng.h = w if w > eng.h else eng.h
                    g = max(g, w + cross, eng.h)
                h = eng.h
            h += c.host_pass
            g += c.dev_pass
            end = h = g = h if h > g else g
            eng.h = h
            res.pass_times.append(end - start)
            if p >= warmup_passes:
                res.passes += 1
                res.tokens += T
                res.time_s += end - start
        L = self.shape.moe_layers
        if sched is None:
            per_layer = [LayerStats() for _ in range(L)]
        else:  # the warm-up's counters are not part of the result
            per_layer = []
            for now, then in zip(sched.stats, before):
                diff = LayerStats(**vars(now))
                for name, value in vars(then).items():
                    setattr(diff, name, getattr(diff, name) - value)
                per_layer.append(diff)
        out = SimResult(per_layer=per_layer, passes=res.passes, tokens=res.tokens, time_s=res.time_s,
                        num_slots=res.num_slots, device_bytes=res.device_bytes, pass_times=res.pass_times)
        if sched is not None:
            out.stall_s = stall - stall_before
            out.stall_waits = 0
            out.layer_calls = out.host_syncs = sched.layer_calls - calls_before
            out.chunked_calls = sched.chunked_calls - chunked_before
            out.host_s = host_busy - host_before
        return out

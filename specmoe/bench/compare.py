"""Side by side, in one run on one machine: the unwrapped model, accelerate's offload, and SpeculativeMoE with
no predictor (demand fetching only), the pre-gate, trained predictors and the oracle, over a sweep of capacities.

Every variant runs the same schedule of generate calls: `warmup` untimed calls, then for each prompt one call
of 1 new token (time to first token) and one of N, whose decode phase is timed directly, from its first new token
(a streamer marks it) to its end: decode tok/s = (N-1) / that time; medians over prompts.
The routing of every call is recorded once, untimed (on the unwrapped model, else on the largest cache): the
oracle replays it exactly, each row's bound is computed on it, and the simulator can replay it.
"""

# Shape legend: T tokens, L MoE layers, k top-k

from __future__ import annotations

import copy
import gc
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..measure import DeviceMemoryMonitor, environment, measure_h2d, sync_device, timed_call
from ..predictors import make_predictor
from ..runtime.adapters import find_moe_layers
from ..runtime.config import OffloadConfig
from ..runtime.wrapper import SpeculativeMoE
from ..traces.capture import capture_routing
from .offload import accelerate_offload

logger = logging.getLogger(__name__)

BUILTIN_PREDICTORS = ("none", "pregate", "oracle")


@dataclass(frozen=True)
class BenchSettings:
    """What `run_benchmark` measures.

    Args:
        capacities: cache capacities (fractions of all experts) for SpeculativeMoE.
        predictors: "none" (demand fetching only), "pregate", "oracle", or paths of saved predictors.
        new_tokens: N, tokens per timed generate call.
        warmup: untimed generate calls before the timed ones (each variant).
        lookahead: lookahead of the pre-gate and the oracle.
        unwrapped: also run the model with every weight on the device.
        accelerate: also run accelerate's offload with the device budget of the cache at `accelerate_capacity`.
        accelerate_new_tokens: N for the accelerate row (it is slow; fewer tokens keep the run short).
        offload: the offloading settings of every SpeculativeMoE row (`OffloadConfig`: policy, misses, transfer,
            ...); each row's capacity is one of `capacities`.
    """

    capacities: tuple[float, ...] = (0.25, 0.5, 1.0)
    predictors: tuple[str, ...] = BUILTIN_PREDICTORS
    new_tokens: int = 32
    warmup: int = 1
    lookahead: int = 1
    unwrapped: bool = True
    accelerate: bool = True
    accelerate_capacity: float = 0.5
    accelerate_new_tokens: int = 8
    offload: OffloadConfig = field(default_factory=OffloadConfig)

    def __post_init__(self):
        if not self.capacities or any(not (0 < c <= 1) for c in self.capacities):
            raise ValueError(f"capacities must be fractions in (0, 1], got {self.capacities}")
        if not self.predictors:
            raise ValueError("give at least one predictor ('none' fetches on demand only)")
        if self.new_tokens < 2 or self.accelerate_new_tokens < 2:
            raise ValueError("new_tokens and accelerate_new_tokens must be >= 2 to separate decode from prefill")
        if self.warmup < 0 or self.lookahead < 1:
            raise ValueError("warmup must be >= 0 and lookahead >= 1")
        if not 0 < self.accelerate_capacity <= 1:
            raise ValueError(f"accelerate_capacity must be in (0, 1], got {self.accelerate_capacity}")
        if not isinstance(self.offload, OffloadConfig):
            raise TypeError(f"offload must be an OffloadConfig, got {type(self.offload).__name__}")

    @property
    def policy(self):
        return self.offload.policy

    @property
    def misses(self) -> str:
        return self.offload.misses

    def to_dict(self) -> dict:
        out = asdict(self)
        out["offload"] = self.offload.to_dict()
        out.update(policy=str(out["offload"]["policy"]), misses=self.offload.misses)  # the keys older results have
        return out


@dataclass
class Schedule:
    """Generate calls: (prompt index, new tokens, timed)."""

    calls: list[tuple[int, int, bool]] = field(default_factory=list)

    @classmethod
    def build(cls, num_prompts: int, new_tokens: int, warmup: int) -> "Schedule":
        calls = [(0, new_tokens, False)] * warmup
        for i in range(num_prompts):
            calls += [(i, 1, True), (i, new_tokens, True)]
        return cls(calls)


class FirstTokenClock:
    """A generate streamer that marks the first new token (after a device sync): the decode phase is timed
    from there to the end of the call, not inferred from two calls."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.puts, self.first = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt; the second, the prefill's token
            sync_device(self.device)
            self.first = time.perf_counter()

    def end(self):
        pass

    def decode_seconds(self) -> float:
        """Seconds from the first new token until now (call it after the generate call, device synced)."""
        if self.first is None:
            raise RuntimeError("generate produced no new token: nothing to time")
        sync_device(self.device)
        return time.perf_counter() - self.first


def run_schedule(generate: Callable, prompts: Sequence[dict], schedule: Schedule, device,
                 before_call: Callable[[int], None] | None = None,
                 after_warmup: Callable[[], None] | None = None) -> dict:
    """Time every call of `schedule`; returns medians, per-prompt figures and the N-token outputs."""
    durations, outputs, decode_s = [], {}, {}
    warm_done = False
    for ci, (i, n, timed) in enumerate(schedule.calls):
        if timed and not warm_done:
            warm_done = True
            if after_warmup:
                after_warmup()
        if before_call:
            before_call(ci)
        clock = FirstTokenClock(device) if timed and n > 1 else None
        extra = {"streamer": clock} if clock else {}
        with torch.no_grad():
            dt, out = timed_call(lambda: generate(**prompts[i], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                  **extra), device)
        durations.append(dt)
        if clock is not None:
            decode_s[i] = (n - 1, clock.decode_seconds())
            outputs[i] = out.detach().cpu()
    ttft = {i: dt for (i, n, timed), dt in zip(schedule.calls, durations) if timed and n == 1}
    decode = [tokens / seconds for tokens, seconds in (decode_s[i] for i in sorted(decode_s))]
    return {"decode_tok_s": statistics.median(decode), "ttft_s": statistics.median(ttft.values()),
            "decode_tok_s_runs": decode, "ttft_s_runs": [ttft[i] for i in sorted(ttft)], "call_s": durations,
            "outputs": outputs}


def record_routing(model: nn.Module, generate: Callable, prompts: Sequence[dict], schedule: Schedule) -> list[list]:
    """The routing of every call of `schedule` (untimed): per call, its passes' ids [T, L, k]."""
    per_call = []
    for i, n, _ in tqdm(schedule.calls, desc="record routing", unit="call", leave=False):
        with torch.no_grad(), capture_routing(model) as cap:
            generate(**prompts[i], max_new_tokens=n, min_new_tokens=n, do_sample=False)
        per_call.append([p.ids for p in cap.passes])
    return per_call


def _same(outputs: dict, reference: dict | None) -> bool | None:
    if not reference:
        return None
    return all(torch.equal(outputs[i], reference[i]) for i in reference if i in outputs)


def _stats(smoe: SpeculativeMoE) -> dict:
    s = smoe.stats
    out = {k: v for k, v in s.to_dict().items() if k != "per_layer"}
    n = s.total.prefetch_used + s.total.misses
    out["prefetch_recall"] = s.total.prefetch_used / n if n else 0.0  # of routed experts the cache lacked
    return out


def run_benchmark(model: nn.Module, prompts: Sequence[dict], settings: BenchSettings, device=None, *,
                  model_name: str = "", make_offload_copy: Callable[[], nn.Module] | None = None,
                  on_variant: Callable[[dict], None] | None = None, progress: bool = True) -> dict:
    """Run every variant of `settings` on `model` (on the CPU; it is moved and wrapped in turn, and left on
    the CPU unwrapped).

    Args:
        model: a transformers MoE model on the CPU.
        prompts: generate inputs ({"input_ids": [1, T], "attention_mask": [1, T]}) on the CPU.
        settings: what to run.
        device: the device (default: CUDA when present).
        model_name: how results name the model.
        make_offload_copy: builds the throwaway model accelerate modifies (default: a deep copy).
        on_variant: called with the result so far after each variant (e.g. to write it to disk); its
            "routing" is there from the first variant on.

    Returns:
        {"environment", "settings", "model", "geometry", "variants": [...], "routing": per-call routing}
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    geometry = find_moe_layers(model).geometry
    schedule = Schedule.build(len(prompts), settings.new_tokens, settings.warmup)
    on_device = [{k: v.to(device) for k, v in p.items()} for p in prompts]
    result = {"benchmark": "specmoe-bench", "model": model_name, "environment": environment(device),
              "settings": settings.to_dict(), "geometry": geometry.to_dict(),
              "schedule": [list(c) for c in schedule.calls], "variants": []}
    names = [("unwrapped", None, None)] if settings.unwrapped else []
    names += [("accelerate", settings.accelerate_capacity, None)] if settings.accelerate else []
    names += [("specmoe", c, p) for c in settings.capacities for p in settings.predictors]
    reference, routing = None, None
    wrapped: list = [None, None]  # (capacity, SpeculativeMoE): one wrap per capacity, predictors swapped in it
    bar = tqdm(names, desc="bench", unit="variant", disable=not progress)
    try:
        for kind, capacity, predictor in bar:
            bar.set_postfix_str(f"{kind} {capacity or ''} {predictor or ''}".strip())
            if kind == "unwrapped":
                row, reference = _run_unwrapped(model, on_device, schedule, device)
                routing = result["routing"] = record_routing(model, model.generate, on_device, schedule)
                model.to("cpu")
            elif kind == "accelerate":
                row = _run_accelerate(model, on_device, settings, device, make_offload_copy)
            else:
                if routing is None:  # no unwrapped run (it may not fit): record on the largest cache
                    routing = result["routing"] = _routing_from_wrapped(model, on_device, schedule, device,
                                                                        max(settings.capacities))
                row = _run_wrapped(model, on_device, schedule, device, capacity, predictor, settings, geometry,
                                   routing, reference, wrapped)
            result["variants"].append(row)
            if on_variant:
                on_variant(result)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:  # the model is left on the CPU, unwrapped, whatever happened
        if wrapped[1] is not None:
            wrapped[1].unwrap()
            model.to("cpu")
    result["routing"] = routing
    if routing is not None:
        _add_bounds(result, routing, schedule, geometry.num_experts, device)
    return result


def _add_bounds(result: dict, routing, schedule: Schedule, num_experts: int, device) -> None:
    """Each SpeculativeMoE row's bound: max(compute time per token, MIN miss bytes per token / measured
    host->device bandwidth), from the recorded routing of the timed calls. Compute time is the fastest
    measured run with every expert resident (unwrapped, or capacity 1.0)."""
    from ..sim.bounds import measured_bound
    from ..sim.stream import RoutingStream

    wrapped = [v for v in result["variants"] if v["kind"] == "specmoe"]
    if not wrapped:
        return
    stream = RoutingStream.from_passes([ids for call in routing for ids in call], num_experts=num_experts)
    warmup = sum(len(r) for r, (_, _, timed) in zip(routing, schedule.calls) if not timed)
    mem = wrapped[0]["runtime_memory"]
    slot_bytes = mem.get("host_expert_bytes", mem["slot_bytes"])  # what one copy moves (compressed if so)
    copy = measure_h2d(slot_bytes, device)
    bw = copy.get("pinned_h2d_bytes_per_s") or copy["pageable_h2d_bytes_per_s"]
    result["copy_rate"] = copy
    # compute time per token: the fastest run with every expert resident (the unwrapped model, or the cache at
    # capacity 1.0, whose expert path can be faster, e.g. the CPU gather path)
    resident = [v for v in result["variants"] if v["kind"] == "unwrapped" or (v["kind"] == "specmoe" and
                                                                                v["capacity"] >= 1.0)]
    compute = min((1 / v["decode_tok_s"] for v in resident), default=0.0)
    for v in wrapped:
        v["bound"] = measured_bound(stream, num_experts, v["runtime_memory"]["num_slots"], slot_bytes, compute, bw,
                                    warmup)
        v["fraction_of_bound"] = v["decode_tok_s"] / v["bound"]["tok_s"]


def _run_unwrapped(model, prompts, schedule, device):
    model.to(device)
    with DeviceMemoryMonitor(device) as mem:
        timing = run_schedule(model.generate, prompts, schedule, device)
    outputs = timing.pop("outputs")
    return {"name": "unwrapped (all on device)", "kind": "unwrapped", "capacity": None, "predictor": None,
            **timing, "memory": mem.result(), "same_tokens": True}, outputs


def _run_accelerate(model, prompts, settings, device, make_copy):
    moe = find_moe_layers(model)
    expert_bytes = sum(p.numel() * p.element_size() for layer in moe.layers for p in layer.experts.parameters())
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    budget = int(total - expert_bytes * (1 - settings.accelerate_capacity))  # the cache's footprint at that capacity
    throwaway = make_copy() if make_copy else copy.deepcopy(model)
    placement = accelerate_offload(throwaway, device, budget)
    schedule = Schedule.build(len(prompts), settings.accelerate_new_tokens, min(settings.warmup, 1))
    with DeviceMemoryMonitor(device) as mem:
        timing = run_schedule(throwaway.generate, prompts, schedule, device)
    timing.pop("outputs")
    del throwaway
    return {"name": f"accelerate offload (budget of capacity {settings.accelerate_capacity})", "kind": "accelerate",
            "capacity": settings.accelerate_capacity, "predictor": None, "new_tokens": settings.accelerate_new_tokens,
            **timing, "memory": mem.result(), "placement": placement, "same_tokens": None}


def _routing_from_wrapped(model, prompts, schedule, device, capacity):
    smoe = SpeculativeMoE(model, None, cache_capacity=capacity, device=device)
    try:
        return record_routing(model, smoe.generate, prompts, schedule)
    finally:
        smoe.unwrap()
        model.to("cpu")


def _make_predictor(name: str, settings: BenchSettings, geometry, routing):
    return make_predictor(name, lookahead=settings.lookahead, geometry=geometry,
                          routing=routing[0] if name == "oracle" else None)


def _run_wrapped(model, prompts, schedule, device, capacity, predictor_name, settings, geometry, routing, reference,
                 wrapped: list):
    """One predictor at one capacity. `wrapped` holds [capacity, SpeculativeMoE] across calls: the model is
    wrapped once per capacity and predictors are swapped with `set_predictor` (the cache stays warm; each
    variant's warm-up calls run before its timed ones)."""
    predictor = _make_predictor(predictor_name, settings, geometry, routing)
    before_call = None
    if predictor_name == "oracle":
        def before_call(ci):  # the oracle replays the routing of the call about to run
            predictor.routing = [r.long() for r in routing[ci]]
    with DeviceMemoryMonitor(device) as mem:
        if wrapped[0] != capacity:
            if wrapped[1] is not None:
                wrapped[1].unwrap()
                model.to("cpu")
                wrapped[:] = [None, None]
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            smoe = SpeculativeMoE(model, predictor, capacity, device=device, config=settings.offload)
            wrapped[:] = [capacity, smoe]
        else:
            smoe = wrapped[1]
            smoe.set_predictor(predictor)
        timing = run_schedule(smoe.generate, prompts, schedule, device, before_call=before_call,
                              after_warmup=smoe.reset_stats)
        stats, memory = _stats(smoe), smoe.memory()
    outputs = timing.pop("outputs")
    label = {"none": f"{settings.policy} on demand", "pregate": "pre-gate", "oracle": "oracle"}.get(
        predictor_name, f"{getattr(predictor, 'kind', predictor_name)} (trained)")
    return {"name": f"specmoe {label} @ {capacity:g}", "label": label, "kind": "specmoe", "capacity": capacity,
            "predictor": predictor_name, **timing, "stats": stats, "runtime_memory": memory,
            "memory": mem.result(), "same_tokens": _same(outputs, reference)}

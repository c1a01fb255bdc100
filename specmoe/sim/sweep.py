"""Sweeps of the simulator: profiles x shapes x capacities x (policy, predictor), each run next to its bound,
and the device-memory plan of every shape (what `specmoe simulate` and the benchmark scripts write).
"""

# Shape legend: N tokens, L MoE layers, k top-k, E experts

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..runtime.misses import check_misses
from .bounds import DEVICE_RESERVE_BYTES, demand_bound, host_bound, memory_plan
from .compute import ComputeModel, load_op_counts
from .engine import simulate
from .hardware import HardwareProfile
from .host import HostProfile
from .policies import DEFAULT_POLICY, POLICY_NAMES, is_known_policy
from .predictions import PredictorReplay
from .shapes import ModelShape
from .stream import RoutingStream


@dataclass(frozen=True)
class SweepSettings:
    """What to simulate.

    Args:
        capacities: cache capacities (fractions of all experts); the largest that fits each profile is added
            when `add_max_fit` is set.
        policies: eviction policies run without a predictor (demand fetching).
        prefetch_policies: eviction policies run with each predictor.
        context: KV tokens read per decode step.
        warmup_passes: passes replayed before measuring.
        compute: the compute model preset.
        add_max_fit: also run at the largest capacity that fits each profile's memory.
        memory_context: context length of the KV cache in the memory plan.
        misses: where misses run ("fetch", "host", "auto"; `SpeculativeMoE`'s misses), each run once per mode.
        host: the host profile (`sim.host.HostProfile` preset or "this-machine") for misses run on the host.
        placement: also run the static placement (hottest experts of the stream resident, misses on the host).
        host_threads: host threads "this-machine" is measured on (None: the runtime's default).
    """

    capacities: tuple[float, ...] = (0.25, 0.5, 0.75)
    policies: tuple[str, ...] = ("lru", "lfu", DEFAULT_POLICY, "belady")
    prefetch_policies: tuple[str, ...] = ("lru", DEFAULT_POLICY)
    context: int = 512
    warmup_passes: int = 64
    compute: str = "hf-eager"
    add_max_fit: bool = True
    memory_context: int = 2048
    misses: tuple[str, ...] = ("fetch",)
    host: str | None = None
    placement: bool = False
    host_threads: int | None = None

    def __post_init__(self):
        if any(not (0 < c <= 1) for c in self.capacities):
            raise ValueError(f"capacities must be fractions in (0, 1], got {self.capacities}")
        if not self.policies and not self.prefetch_policies:
            raise ValueError("give at least one policy")
        unknown = [p for p in self.policies + self.prefetch_policies if not is_known_policy(p)]
        if unknown or "belady" in self.prefetch_policies:
            raise ValueError(f"unknown policies {unknown or ['belady (needs demand fetching)']}: choose from "
                             f"{POLICY_NAMES} (belady only without a predictor)")
        if self.warmup_passes < 0 or self.context < 0:
            raise ValueError("warmup_passes and context must be >= 0")
        ComputeModel.from_name(self.compute)
        for mode in self.misses:
            check_misses(mode)
        if (set(self.misses) - {"fetch"} or self.placement) and self.host is None:
            raise ValueError("misses 'host'/'auto' and the static placement need a host profile (host='3090-box')")

    def to_dict(self) -> dict:
        return asdict(self)


def synthetic_stream(shape: ModelShape, passes: int = 8, seed: int = 0) -> RoutingStream:
    """Random routing of `shape`'s geometry: only for figures that do not depend on routing (compute time)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.stack([torch.randperm(shape.num_experts, generator=g)[: shape.top_k]
                                    for _ in range(shape.moe_layers)]) for _ in range(passes)])
    return RoutingStream.from_sequences(ids, num_experts=shape.num_experts)


def compute_ceiling(shape: ModelShape, profile: HardwareProfile, compute: ComputeModel, context: int) -> float:
    """Decode tok/s of the unwrapped model, every expert resident (independent of routing at batch 1)."""
    run = simulate(synthetic_stream(shape), shape, profile, None, ops=load_op_counts(shape.model_type), compute=compute,
                   context=context)
    return run.tok_s


def run_sweep(stream: RoutingStream | None, shapes: Sequence[ModelShape], profiles: Sequence[HardwareProfile],
              settings: SweepSettings, predictors: Sequence[PredictorReplay] = (), progress: bool = True) -> dict:
    """Simulate every combination; shapes whose geometry differs from the stream's get memory rows and the
    compute ceiling only (their routing was never recorded).

    Args:
        stream: the routing (None: memory and ceilings only).
        predictors: predictors replayed on `stream` (`replay_predictor`, `replay_oracle`); each runs with every
            policy of `prefetch_policies`.

    Returns:
        {"settings", "runs": [...], "memory": [...], "ceilings": [...]}
    """
    compute = ComputeModel.from_name(settings.compute)
    host = HostProfile.from_name(settings.host, settings.host_threads) if settings.host else None
    by_name = {p.name: p for p in predictors}
    out = {"settings": settings.to_dict(), "compute": compute.to_dict(), "runs": [], "memory": [], "ceilings": [],
           "reserve_bytes": DEVICE_RESERVE_BYTES,
           "host": host.to_dict() if host else None,
           "predictors": {p.name: {"lookahead": p.lookahead, "predict_ops": p.predict_ops} for p in predictors}}
    jobs = []
    for profile in profiles:
        for shape in shapes:
            plan = memory_plan(shape, profile, settings.capacities, context=settings.memory_context)
            out["memory"].append(plan)
            out["ceilings"].append({"shape": shape.name, "profile": profile.name,
                                    "tok_s": compute_ceiling(shape, profile, compute, settings.context)})
            if stream is None or not stream.matches(shape.moe_layers, shape.top_k, shape.num_experts):
                continue
            caps = list(settings.capacities)
            fits = {c: row["fits"] for c, row in zip(settings.capacities, plan["wrapped"])}  # in the device's memory
            if settings.add_max_fit and plan["max_slots"] > 0 and plan["max_capacity"] not in caps:
                caps.append(plan["max_capacity"])
            for cap in sorted(caps):
                jobs.append((profile, shape, cap, cap == plan["max_capacity"], fits.get(cap, True)))
    combos = [(p, "none", m) for p in settings.policies for m in settings.misses if p != "belady" or m == "fetch"] + \
             [(p, name, m) for name in by_name for p in settings.prefetch_policies for m in settings.misses]
    if settings.placement:
        combos.append(("static", "none", "host"))
    bar = tqdm(total=len(jobs) * (len(combos) + 1), desc="simulate", unit="run", disable=not progress)
    for profile, shape, cap, is_max, fits in jobs:
        ops = load_op_counts(shape.model_type)
        kw = dict(ops=ops, compute=compute, context=settings.context, warmup_passes=settings.warmup_passes)
        unwrapped = simulate(stream, shape, profile, None, **kw)
        belady = simulate(stream, shape, profile, cap, policy="belady", **kw)
        bound = demand_bound(stream, shape, profile, cap, ops=ops, unwrapped=unwrapped, belady=belady)
        hbound = host_bound(stream, shape, profile, host, cap, unwrapped=unwrapped, **kw) if host else None
        bar.update(1)
        for policy, pred, misses in combos:
            where = dict(misses=misses, host=host) if misses != "fetch" else {}
            if (policy, pred, misses) == ("belady", "none", "fetch"):
                run = belady
            elif policy == "static":  # llama.cpp-like: the stream's hottest experts resident, never copied
                run = simulate(stream, shape, profile, cap, placement="trace", **where, **kw)
            elif pred == "none":
                run = simulate(stream, shape, profile, cap, policy=policy, **where, **kw)
            else:
                p = by_name[pred]
                ops_p = ops if p.predict_ops is None else ops.for_predictor(p.predict_ops)
                run = simulate(stream, shape, profile, cap, policy=policy, candidates=p.candidates, **where,
                               **{**kw, "ops": ops_p, "lookahead": p.lookahead})
            if hbound is not None and misses != "fetch":
                bound_used = hbound
            else:
                bound_used = bound
            out["runs"].append({"profile": profile.name, "shape": shape.name, "capacity": cap, "max_fit": is_max,
                                "fits": fits,
                                "policy": policy, "predictor": pred, "misses_mode": misses, **run.to_dict(),
                                "bound_tok_s": bound_used.tok_s,
                                "fraction_of_bound": run.tok_s / bound_used.tok_s if bound_used.tok_s else 0.0,
                                "bound": bound_used.to_dict(), "unwrapped_tok_s": unwrapped.tok_s})
            bar.update(1)
    bar.close()
    return out

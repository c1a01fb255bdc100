"""Check the simulator against a measurement: replay the routing a GPU run recorded, on that GPU's profile,
and compare decode tokens/s variant by variant.

Input: the JSON `benchmarks/shape_real.py` (or `specmoe bench`) wrote, with its `routing_file` (the routing
of every generate call, in order) and, for shape-real runs, the model shape. Three settings are reported:

* ``spec``: the stock hardware profile and the "hf-eager" compute model, nothing taken from the measurement;
* ``calibrated``: the host-side constants fitted to two measured rows (the unwrapped model sets the per-op
  cost; SpeculativeMoE with no predictor at the largest capacity sets the runtime's per-layer cost), so the
  other rows test the copy and overlap model alone;
* ``calibrated+bw``: as ``calibrated`` with the host->device bandwidth the run measured instead of the
  profile's assumption.

A compiled run (`specmoe bench --compile`: its SpeculativeMoE rows decode with ``compile=True``) is checked
with the "compiled" compute model (`sim.compute`: the dense parts as compiled regions, experts-op calls and
CUDA-graph replays) on its SpeculativeMoE rows and hf-eager's on its (eager) unwrapped row: the calibrated
settings fit the host scale on that eager row and the runtime's cost on the largest cache, so the other
capacities test the compiled model. `this_machine_profile` makes this CPU the "device" for a CPU run.
"""

# Shape legend: P passes, L MoE layers, E experts

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from ..io import read_json
from .compute import ComputeModel, OpCounts, load_op_counts
from .engine import simulate
from .hardware import HardwareProfile
from .predictions import oracle_candidates
from .shapes import ModelShape
from .stream import RoutingStream

GOAL = 0.15  # |simulated / measured - 1|


def _calls_timing(stream: RoutingStream, pass_times: list[float]) -> dict:
    """Decode tok/s and TTFT the way the benchmark computes them, from simulated pass times."""
    call_s, i = [], 0
    for call in stream.calls:
        n = int(call["passes"])
        call_s.append(sum(pass_times[i : i + n]))
        i += n
    ttft, total = {}, {}
    for call, t in zip(stream.calls, call_s):
        if call["timed"]:
            (ttft if call["new_tokens"] == 1 else total)[call["prompt"]] = t
    n_new = max(int(c["new_tokens"]) for c in stream.calls)
    decode = [(n_new - 1) / max(total[p] - ttft[p], 1e-12) for p in sorted(total)]
    return {"decode_tok_s": statistics.median(decode), "ttft_s": statistics.median(ttft.values())}


def _per_call_oracle(stream: RoutingStream, num_experts: int, lookahead: int):
    """Oracle candidates call by call: the runtime's oracle replays one call's routing and stops at its end."""
    out, start = [], 0
    for call in stream.calls:
        n = int(call["passes"])
        out += oracle_candidates(stream.select_passes(start, start + n), num_experts, lookahead)
        start += n
    return out


def eager_part(compute: ComputeModel) -> ComputeModel:
    """The model of what runs eagerly in a compiled run (its unwrapped row): no compiled regions or replays."""
    return dataclasses.replace(compute, segments_per_layer=0.0, segments_per_pass=0.0, replays_per_layer=0.0,
                               replays_per_pass=0.0, experts_op_s=0.0)


def this_machine_profile(threads: int | None = None) -> HardwareProfile:
    """This CPU as the simulator's "device" (a CPU run: the model, its slots and its host store all in RAM):
    memory bandwidth and FLOP/s measured by the host profile "this-machine" (`sim.host`), a slot copy at half
    the read bandwidth (a memcpy reads and writes)."""
    import psutil

    from .host import measure_host_profile

    host = measure_host_profile(threads=threads)
    return HardwareProfile("this-machine", int(psutil.virtual_memory().total), host.memory_bytes_per_s / 2,
                           host.memory_bytes_per_s, host.flops, copy_latency_s=1e-6,
                           source=f"measured here ({host.source})", description=host.description)


def _sim_variant(variant: dict, stream, shape, profile, compute, ops, lookahead, context, policy) -> dict | None:
    if variant["kind"] == "unwrapped":
        capacity, candidates = None, None
        compute = eager_part(compute)  # compiled runs compile their SpeculativeMoE rows only
    elif variant["kind"] == "specmoe" and variant["predictor"] in ("none", "oracle"):
        capacity = variant["capacity"]
        candidates = _per_call_oracle(stream, shape.num_experts, lookahead) if variant["predictor"] == "oracle" else None
    else:
        return None  # accelerate runs another schedule; learned predictors need hidden states and weights
    warmup = 0
    for call in stream.calls:  # counters start with the first timed call, as the benchmark's stats do
        if call["timed"]:
            break
        warmup += int(call["passes"])
    if candidates is not None:  # the oracle's own predict cost instead of the pre-gate's
        from ..predictors import OraclePredictor
        from .compute import count_predictor_ops

        probe = OraclePredictor([stream.ids[:1]] * 2, lookahead=lookahead)
        ops = ops.for_predictor(count_predictor_ops(probe, shape.geometry))
    run = simulate(stream, shape, profile, capacity, ops=ops, compute=compute, candidates=candidates,
                   lookahead=lookahead, context=context, warmup_passes=warmup, policy=policy)
    return {**_calls_timing(stream, run.pass_times), "hit_rate": run.hit_rate if capacity is not None else None,
            "stall_s": run.stall_s}


def _fit(f, target: float, lo: float, hi: float, log: bool, iters: int = 40) -> float:
    """x in [lo, hi] with f(x) = target for f decreasing in x (bisection)."""
    for _ in range(iters):
        mid = (lo * hi) ** 0.5 if log else (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5 if log else (lo + hi) / 2


def validate_measurement(json_path, profile: HardwareProfile | None = None, compute: ComputeModel | None = None,
                         shape: ModelShape | None = None) -> dict:
    """Compare the simulator with a measured run.

    Args:
        json_path: a result JSON with a `routing_file` next to it (shape-real benchmark or `specmoe bench`).
        profile: the hardware profile (default: the preset matching the measured device's name).
        compute: the compute model of the ``spec`` setting (default "hf-eager").
        shape: the model shape (default: the one recorded in the JSON).

    Returns:
        {"rows": [per variant and setting: measured, simulated, error], "fits": ..., "goal": 0.15, ...}

    Raises:
        ValueError: no routing file, no shape, or no profile for the measured device.
    """
    json_path = Path(json_path)
    result = read_json(json_path, what="benchmark result")
    if "routing_file" not in result:
        raise ValueError(f"{json_path} has no routing_file: rerun the benchmark with routing recording on")
    stream = RoutingStream.load(json_path.parent / result["routing_file"])
    if stream.calls is None:
        raise ValueError(f"{result['routing_file']} has no calls file: it cannot be matched with the timings")
    if shape is None:
        if "shape" not in result:
            raise ValueError(f"{json_path} records no model shape; pass shape=ModelShape.from_config(...)")
        s = result["shape"]
        shape = ModelShape.from_config(s["config"], name=s["name"], dtype=s["dtype"], expert_dtype=s["expert_dtype"])
    device_name = result["environment"].get("device_name", "")
    profile = profile or HardwareProfile.for_device_name(device_name)
    compiled_run = bool(result["settings"].get("offload", {}).get("compile"))
    compute = compute or ComputeModel.from_name("compiled" if compiled_run else "hf-eager")
    ops = OpCounts(**result["op_counts"]) if "op_counts" in result else load_op_counts(shape.model_type)
    settings = result["settings"]
    lookahead = int(settings.get("lookahead", 1))
    policy = settings.get("policy", "lru")  # the measured run's eviction policy (older results: LRU)
    context = int(settings.get("prompt_len", 32)) + int(settings["new_tokens"]) // 2
    measured = {v["name"]: v for v in result["variants"]}

    def run(variant, prof, comp):
        return _sim_variant(variant, stream, shape, prof, comp, ops, lookahead, context, policy)

    settings_out = {"spec": (profile, compute)}
    fits: dict = {}
    unwrapped = next((v for v in result["variants"] if v["kind"] == "unwrapped"), None)
    lru = [v for v in result["variants"] if v["kind"] == "specmoe" and v["predictor"] == "none"]
    anchor = max(lru, key=lambda v: v["capacity"]) if lru else None
    calibrated = compute
    if unwrapped is not None:
        scale = _fit(lambda s: run(unwrapped, profile, compute.scale_host(s))["decode_tok_s"],
                     unwrapped["decode_tok_s"], 1e-3, 1e3, log=True)
        calibrated = compute.scale_host(scale)
        fits["host_scale"] = scale
    if anchor is not None:
        wrapper_s = _fit(lambda w: run(anchor, profile, dataclasses.replace(calibrated, wrapper_s=w))["decode_tok_s"],
                         anchor["decode_tok_s"], 0.0, 0.099, log=False)
        calibrated = dataclasses.replace(calibrated, wrapper_s=wrapper_s)
        fits["wrapper_s"] = wrapper_s
    if fits:
        settings_out["calibrated"] = (profile, calibrated)
        copy = result.get("copy_microbenchmark") or {}
        bw = copy.get("pinned_h2d_bytes_per_s") or copy.get("pageable_h2d_bytes_per_s")  # the runtime pins on CUDA
        if bw:
            settings_out["calibrated+bw"] = (profile.with_(h2d_bytes_per_s=min(bw, profile.memory_bytes_per_s)),
                                             calibrated)
    rows = []
    for setting, (prof, comp) in settings_out.items():
        for name, variant in measured.items():
            sim = run(variant, prof, comp)
            if sim is None:
                continue
            used_for_fit = setting != "spec" and variant is unwrapped or (setting != "spec" and variant is anchor)
            rows.append({"setting": setting, "variant": name, "capacity": variant.get("capacity"),
                         "predictor": variant.get("predictor"), "measured_tok_s": variant["decode_tok_s"],
                         "simulated_tok_s": sim["decode_tok_s"], "error": sim["decode_tok_s"] / variant["decode_tok_s"] - 1,
                         "measured_ttft_s": variant["ttft_s"], "simulated_ttft_s": sim["ttft_s"],
                         "measured_hit_rate": (variant.get("stats") or {}).get("hit_rate"),
                         "simulated_hit_rate": sim["hit_rate"], "fitted": used_for_fit})
    held_out = [r for r in rows if not r["fitted"]]
    worst = {s: max((abs(r["error"]) for r in held_out if r["setting"] == s), default=None) for s in settings_out}
    return {"source": str(json_path), "device_name": device_name, "profile": profile.to_dict(),
            "compute": {s: c.to_dict() for s, (_, c) in settings_out.items()}, "op_counts": ops.to_dict(),
            "shape": shape.name, "compiled_run": compiled_run, "fits": fits, "rows": rows, "worst_abs_error": worst, "goal": GOAL,
            "within_goal": {s: (w is not None and w <= GOAL) for s, w in worst.items()}}


def validation_table(report: dict) -> str:
    from ..measure.results import markdown_table

    rows = [[r["setting"], r["variant"] + (" (fitted)" if r["fitted"] else ""), f"{r['measured_tok_s']:.2f}",
             f"{r['simulated_tok_s']:.2f}", f"{100 * r['error']:+.1f}%",
             None if r["measured_hit_rate"] is None else f"{r['measured_hit_rate']:.3f}",
             None if r["simulated_hit_rate"] is None else f"{r['simulated_hit_rate']:.3f}"] for r in report["rows"]]
    table = markdown_table(["setting", "variant", "measured tok/s", "simulated tok/s", "error", "measured hit",
                            "simulated hit"], rows)
    worst = ", ".join(f"{s}: {'—' if w is None else f'{100 * w:.1f}%'}" for s, w in report["worst_abs_error"].items())
    return (f"{table}\n\nSimulator vs {report['device_name']} ({report['source']}), profile {report['profile']['name']}. "
            f"Worst |error| on rows not used for fitting — {worst}; goal ±{100 * report['goal']:.0f}%. "
            f"Fits: {report['fits']}.")

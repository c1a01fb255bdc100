"""The hot path's own cost: the runtime's bookkeeping per MoE layer call, without expert compute.

The experts calls of a greedy decode on a model with Qwen1.5-MoE-A2.7B's routing geometry (24 MoE layers,
60 experts, top-4; random weights) are recorded once (their inputs), then replayed, each call as the installed
hook sees it, through

- a bare hook: read the routing out of the call (the layout's `routing`) and return zeros;
- SpeculativeMoE's hot path (`HotPath.fused_forward`: routing, the predictor and its candidate ranking, the one
  host sync, the scheduler's plan, the eviction policy) with the expert compute replaced by zeros and the copy
  engine's byte copy by nothing (the transfer is not bookkeeping).

The figure is (wrapped - bare) / calls, in µs per MoE layer call: the minimum over --repeats of the mean over
all recorded calls, in process CPU time (the machine may be shared: CPU time and the minimum are the least
disturbed by other processes; torch runs one thread). The predictor's own `predict` is timed apart on
the same calls and reported beside it ("bookkeeping" excludes it). Goal: <= 25 µs per layer call with the
default policy and no predictor on this CPU.

The simulator charges these figures (calibration data, as the op counts; `specmoe.sim.compute.Bookkeeping`):
per policy, the least-squares line through its no-predictor rows, `per_call + per_copy * copies` (copies: experts
copied per layer call, demand and prefetch); per predictor, what its rows (default policy) cost beyond that line
at their own copies, averaged over the capacities. They are written to specmoe/sim/calibration/bookkeeping.json
(--calibration PATH; '' or a run without every policy's no-predictor rows writes none), measured on this CPU.

    python benchmarks/hot_path_cost.py                       # every policy and predictor, capacities 0.05 and 1.0
    python benchmarks/hot_path_cost.py --policies hit-density --predictors none --out /tmp/x.json --calibration ''

Writes benchmarks/results/hot_path_cost.{json,md}.
"""

# Shape legend: T tokens, L MoE layers, E experts, k top-k

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from specmoe import SpeculativeMoE
from specmoe.io import write_json, write_text
from specmoe.measure import environment
from specmoe.predictors import HistoryPredictor, OraclePredictor, PreGatePredictor
from specmoe.runtime.policies import DEFAULT_POLICY
from specmoe.runtime.adapters import find_moe_layers
from specmoe.runtime.hooks import PassMarker
from specmoe.sim.compute import ASSUMED_WRAPPER_S, BOOKKEEPING_FILE, ComputeModel, op_counter
from specmoe.traces import RoutingTrace
from wrapper_overhead import qwen15_geometry_model

RESULTS = Path(__file__).parent / "results"
GOAL_US = 25.0
POLICIES = ("hit-density", "lru", "lfu")
PREDICTORS = ("none", "pregate", "history", "oracle")


def record_calls(model, inputs, new_tokens: int):
    """[(pass index, layer index, args, kwargs)] of every experts call of a greedy decode, and the routing
    [P][T, L, k] of each pass (for the oracle)."""
    moe = find_moe_layers(model)
    geo = moe.geometry
    calls, passes = [], []
    state = {"pass": -1}

    def start(index):
        state["pass"] = index

    def hook(layer):
        def pre(module, args, kwargs):
            hidden, ids, _ = layer.layout.routing(module, args, kwargs, geo.top_k)
            T = hidden.shape[0]
            if len(passes) <= state["pass"]:
                passes.append(torch.full((T, geo.num_layers, geo.top_k), -1))
            passes[state["pass"]][:, layer.index] = ids.reshape(T, -1)
            calls.append((state["pass"], layer.index, tuple(a.clone() if isinstance(a, torch.Tensor) else a
                                                           for a in args), dict(kwargs)))
        return pre

    marker = PassMarker.attach(model, start)
    handles = [layer.experts.register_forward_pre_hook(hook(layer), with_kwargs=True) for layer in moe.layers]
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    for h in handles:
        h.remove()
    marker.detach(model, start)
    return calls, passes


def time_replay(fn, calls, repeats: int, before_pass=None) -> float:
    """Seconds per call: the minimum over repeats of the mean over `calls` of fn(pass, layer, args, kwargs)."""
    best = float("inf")
    for _ in range(repeats):
        current = None
        t0 = time.process_time()
        for p, layer, args, kwargs in calls:
            if p != current and before_pass is not None:
                before_pass(p)
            current = p
            fn(p, layer, args, kwargs)
        best = min(best, (time.process_time() - t0) / len(calls))
    return best


def count_ops(fn, calls, before_pass=None) -> float:
    """Aten ops per call of one replay of fn (counted, not timed: `sim.compute.op_counter`)."""
    counter, current = op_counter(), None
    with counter:
        for p, layer, args, kwargs in calls:
            if p != current and before_pass is not None:
                before_pass(p)
            current = p
            fn(p, layer, args, kwargs)
    return counter.n["all"] / len(calls)


def make_predictor(name: str, geo, passes):
    if name == "none":
        return None
    if name == "pregate":
        return PreGatePredictor(lookahead=1)
    if name == "oracle":
        return OraclePredictor(passes, lookahead=1)
    # fitted on the recorded decode itself (its cost, not its accuracy, is measured here)
    ids = torch.cat(passes)  # [N, L, k]
    trace = RoutingTrace(geo, ids, torch.full(ids.shape, 1.0 / geo.top_k), torch.tensor([0, ids.shape[0]]), {})
    return HistoryPredictor.fit(trace, lookahead=1, progress=False)


def measure(base, calls, passes, policy: str, predictor_name: str, capacity: float, repeats: int) -> dict:
    model = copy.deepcopy(base)
    smoe = SpeculativeMoE(model, None, capacity, policy=policy, transfer="sync")
    geo, layers = smoe.geometry, smoe.moe.layers
    predictor = make_predictor(predictor_name, geo, passes)
    smoe.set_predictor(predictor)
    zeros = {}

    def no_compute(layer, args, kwargs, ids, weights, chosen, partial=False):
        hidden = args[0]
        out = zeros.get(hidden.shape)
        if out is None:
            out = zeros[hidden.shape] = torch.zeros(hidden.shape, dtype=hidden.dtype)
        return out

    smoe.experts_compute.compute = no_compute
    smoe.engine.copy_in = lambda slot, dst, src, demand: None  # bookkeeping only: no bytes move
    hot = smoe.hot
    k = geo.top_k

    def bare(p, layer, args, kwargs):
        lay = layers[layer]
        hidden, ids, weights = lay.layout.routing(lay.experts, args, kwargs, k)
        out = zeros.get(hidden.shape)
        if out is None:
            out = zeros[hidden.shape] = torch.zeros(hidden.shape, dtype=hidden.dtype)
        return out

    def wrapped(p, layer, args, kwargs):
        hot.fused_forward(layers[layer], args, kwargs)

    def new_pass(p):
        smoe._start_pass(p)

    def predict_only(p, layer, args, kwargs):
        lay = layers[layer]
        hidden, ids, _ = lay.layout.routing(lay.experts, args, kwargs, k)
        T = hidden.shape[0]
        history = torch.full((T, layer + 1, k), -1)
        predictor.predict(layer, hidden.reshape(T, -1), history)

    smoe._reset_state()
    with torch.no_grad():
        time_replay(wrapped, calls, 1, new_pass)  # warm-up: the cache fills, the policy learns
        smoe.reset_stats()
        t_bare = time_replay(bare, calls, repeats)
        t_wrapped = time_replay(wrapped, calls, repeats, new_pass)
        t_predict = time_replay(predict_only, calls, repeats, new_pass) - t_bare if predictor is not None else 0.0
        stats = smoe.stats
        ops = count_ops(wrapped, calls, new_pass)  # the hot path's own aten ops, which the op counts charge ...
        if predictor is not None:  # ... less the predictor's own `predict` (and its stand-in history)
            ops = max(0.0, ops - count_ops(predict_only, calls, new_pass))
    smoe.unwrap()
    per_call = (t_wrapped - t_bare) * 1e6
    copies = stats.misses - stats.host_computed + stats.prefetch_issued  # over the timed replays
    return {"policy": policy, "predictor": predictor_name, "capacity": capacity, "calls": len(calls),
            "bare_us": t_bare * 1e6, "wrapped_us": t_wrapped * 1e6, "hot_path_us": per_call,
            "predict_us": max(0.0, t_predict * 1e6), "bookkeeping_us": per_call - max(0.0, t_predict * 1e6),
            "hit_rate": stats.hit_rate, "prefetch_issued": stats.prefetch_issued,
            "copies_per_call": copies / max(1, stats.layer_calls), "hot_path_ops": ops}


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (x, y) points (slope 0 through one x)."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx > 0 else 0.0
    return my - slope * mx, slope


def calibration(rows: list[dict], default: str, command: str, env: dict) -> dict | None:
    """The simulator's bookkeeping calibration from the rows (see the module docstring); None when a policy
    lacks its no-predictor rows."""
    policies = sorted({r["policy"] for r in rows})
    out = {"what": "the runtime's bookkeeping per MoE layer call (hot path + scheduler + policy + candidate "
                   "ranking, no expert compute, no byte copies), measured on this CPU; per policy a line per expert "
                   "copy, per predictor the extra per predicted call (its own predict apart: the op counts). It "
                   "includes this CPU's time in the hot path's own aten ops (hot_path_ops per call in the "
                   "benchmark's rows), which the op counts also charge on the GPU host: an overlap, not removed",
           "command": command, "environment": env, "load_average": list(os.getloadavg()),
           "default_policy": default, "policies": {}, "predictors": {},
           "host": "measured on this CPU; the simulator assumes the GPU host runs the same Python at the speed "
                   "given by specmoe.sim.compute.HOST_PYTHON_SCALE (1.0 for the RTX 3090 box's Ryzen 9 5950X)"}
    for policy in policies:
        pts = [(r["copies_per_call"], r["bookkeeping_us"] * 1e-6) for r in rows
               if r["policy"] == policy and r["predictor"] == "none"]
        if not pts:
            return None
        a, b = _line(pts)
        out["policies"][policy] = {"per_call_s": max(0.0, a), "per_copy_s": max(0.0, b),
                                   "points": [{"copies_per_call": x, "bookkeeping_s": y} for x, y in pts]}
    if default not in out["policies"]:
        return None
    line = out["policies"][default]
    for name in sorted({r["predictor"] for r in rows} - {"none"}):
        extra = [r["bookkeeping_us"] * 1e-6 - line["per_call_s"] - line["per_copy_s"] * r["copies_per_call"]
                 for r in rows if r["policy"] == default and r["predictor"] == name]
        if extra:
            out["predictors"][name] = {"per_call_s": max(0.0, sum(extra) / len(extra)), "capacities": len(extra)}
    return out


def markdown(r: dict) -> str:
    lines = ["| policy | predictor | capacity | hot path µs/call | of which predict | bookkeeping µs/call "
             "| its aten ops/call | copies/call | hit rate |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['policy']} | {row['predictor']} | {row['capacity']} | {row['hot_path_us']:.1f} | "
                     f"{row['predict_us']:.1f} | {row['bookkeeping_us']:.1f} | {row['hot_path_ops']:.1f} | "
                     f"{row['copies_per_call']:.2f} | {row['hit_rate']:.3f} |")
    env, st = r["environment"], r["settings"]
    cal = r.get("calibration")
    if cal:
        d = cal["policies"][cal["default_policy"]]
        charged = (f"the simulator charges {d['per_call_s'] * 1e6:.1f} µs per call + {d['per_copy_s'] * 1e6:.1f} µs "
                   f"per expert copy for {cal['default_policy']} (fitted to these rows; `ComputeModel` hf-eager "
                   f"`wrapper_s`, until now an assumed {r['assumed_wrapper_us']:.0f} µs), " + ", ".join(
                       f"{k} {v['per_call_s'] * 1e6:.1f} + {v['per_copy_s'] * 1e6:.1f}" for k, v in
                       cal["policies"].items() if k != cal["default_policy"]) + "; per predicted call " + ", ".join(
                       f"{k} +{v['per_call_s'] * 1e6:.1f}" for k, v in cal["predictors"].items()) +
                   " µs (`sim/calibration/bookkeeping.json`, measured on this CPU; the RTX 3090 box's host is "
                   "assumed as fast)")
    else:
        charged = (f"the simulator's figure: {r['simulator_wrapper_us']:.1f} µs per call (`ComputeModel` hf-eager "
                   f"`wrapper_s`, from `sim/calibration/bookkeeping.json`; assumed before the bookkeeping was "
                   f"measured: {r['assumed_wrapper_us']:.0f} µs)")
        fit = r.get("fit")
        if fit:
            d = fit["policies"][fit["default_policy"]]
            charged += (f"; this run's fit, not written to the calibration: {fit['default_policy']} "
                        f"{d['per_call_s'] * 1e6:.1f} µs per call + {d['per_copy_s'] * 1e6:.1f} per copy")
    load = r.get("load_average")
    lines += ["", f"Bookkeeping of SpeculativeMoE per MoE layer call, expert compute and byte copies left out, minus a "
              f"bare hook on the same recorded calls ({st['model']}; {st['calls']} calls of a {st['new_tokens']}-token "
              f"greedy decode, min over {st['repeats']} replays). Goal <= {r['goal_us']:.0f} µs (hit-density, no "
              f"predictor); {charged}. {env['device_name']}, torch {env['torch']}, git {env['git_sha']}"
              + (f", load average {load[0]:.1f}" if load else "") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--predictors", nargs="+", default=list(PREDICTORS), choices=PREDICTORS)
    ap.add_argument("--capacities", nargs="+", type=float, default=[0.05, 1.0])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "hot_path_cost.json")
    ap.add_argument("--calibration", default=str(BOOKKEEPING_FILE),
                    help="where the simulator's bookkeeping calibration goes ('': nowhere)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base = qwen15_geometry_model(args.hidden, torch.float32)
    base.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, base.config.vocab_size, (1, 8), generator=g)}
    calls, passes = record_calls(base, inputs, args.new_tokens)
    rows = []
    for capacity in args.capacities:
        for policy in args.policies:
            for name in args.predictors:
                row = measure(base, calls, passes, policy, name, capacity, args.repeats)
                rows.append(row)
                print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}))
    env = environment(torch.device("cpu"))
    command = "python benchmarks/hot_path_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cal = calibration(rows, DEFAULT_POLICY, command.strip(), env)
    written = cal is not None and bool(args.calibration)
    result = {"benchmark": "hot_path_cost", "goal_us": GOAL_US,
              "simulator_wrapper_us": ComputeModel.from_name("hf-eager").wrapper_s * 1e6,
              "assumed_wrapper_us": ASSUMED_WRAPPER_S * 1e6, "load_average": list(os.getloadavg()),
              "calibration": cal if written else None,  # what the simulator now charges (else: `fit`, not adopted)
              "fit": None if written else cal,
              "settings": {"model": "qwen2_moe L=24 E=60 k=4 H=%d (random weights)" % args.hidden,
                           "calls": len(calls), "new_tokens": args.new_tokens, "repeats": args.repeats,
                           "engine": "sync (copies stubbed)", "torch_threads": 1},
              "environment": env, "rows": rows}
    write_json(args.out, result)
    if written:
        write_json(Path(args.calibration), cal)
        print(f"wrote {args.calibration}")
    write_text(args.out.with_suffix(".md"), markdown(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The hot path's own cost: the runtime's bookkeeping per MoE layer call, without expert compute.

The experts calls of a greedy decode on a model with Qwen1.5-MoE-A2.7B's routing geometry (24 MoE layers,
60 experts, top-4; random weights) are recorded once (their inputs), then replayed, each call as the installed
hook sees it, through

- a bare hook: read the routing out of the call (the layout's `routing`) and return zeros;
- SpeculativeMoE's hot path (`HotPath.fused_forward`: routing, the predictor and its candidate ranking, the one
  host sync, the scheduler's plan, the eviction policy) with the expert compute replaced by zeros and the copy
  engine's byte copy by nothing (the transfer is not bookkeeping).

The figure is (wrapped - bare) / calls, in µs per MoE layer call: the minimum over --repeats of the mean over
all recorded calls (perf_counter; the machine may be shared). The predictor's own `predict` is timed apart on
the same calls and reported beside it ("bookkeeping" excludes it). Goal: <= 25 µs per layer call with the
default policy and no predictor on this CPU; the simulator assumes `ComputeModel.wrapper_s` per call.

    python benchmarks/hot_path_cost.py                       # every policy and predictor, capacity 0.25 and 1.0
    python benchmarks/hot_path_cost.py --policies hit-density --predictors none --out /tmp/x.json

Writes benchmarks/results/hot_path_cost.{json,md}.
"""

# Shape legend: T tokens, L MoE layers, E experts, k top-k

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from specmoe import SpeculativeMoE
from specmoe.io import write_json, write_text
from specmoe.measure import environment
from specmoe.predictors import HistoryPredictor, OraclePredictor, PreGatePredictor
from specmoe.runtime.adapters import find_moe_layers
from specmoe.runtime.hooks import PassMarker
from specmoe.sim.compute import ComputeModel
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
        t0 = time.perf_counter()
        for p, layer, args, kwargs in calls:
            if p != current and before_pass is not None:
                before_pass(p)
            current = p
            fn(p, layer, args, kwargs)
        best = min(best, (time.perf_counter() - t0) / len(calls))
    return best


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
    smoe.unwrap()
    per_call = (t_wrapped - t_bare) * 1e6
    return {"policy": policy, "predictor": predictor_name, "capacity": capacity, "calls": len(calls),
            "bare_us": t_bare * 1e6, "wrapped_us": t_wrapped * 1e6, "hot_path_us": per_call,
            "predict_us": max(0.0, t_predict * 1e6), "bookkeeping_us": per_call - max(0.0, t_predict * 1e6),
            "hit_rate": stats.hit_rate, "prefetch_issued": stats.prefetch_issued}


def markdown(r: dict) -> str:
    lines = ["| policy | predictor | capacity | hot path µs/call | of which predict | bookkeeping µs/call | hit rate |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['policy']} | {row['predictor']} | {row['capacity']} | {row['hot_path_us']:.1f} | "
                     f"{row['predict_us']:.1f} | {row['bookkeeping_us']:.1f} | {row['hit_rate']:.3f} |")
    env, st = r["environment"], r["settings"]
    lines += ["", f"Bookkeeping of SpeculativeMoE per MoE layer call, expert compute and byte copies left out, minus a "
              f"bare hook on the same recorded calls ({st['model']}; {st['calls']} calls of a {st['new_tokens']}-token "
              f"greedy decode, min over {st['repeats']} replays). Goal <= {r['goal_us']:.0f} µs (hit-density, no "
              f"predictor); the simulator's assumption: {r['simulator_wrapper_us']:.1f} µs per call "
              f"(`ComputeModel` hf-eager `wrapper_s`). {env['device_name']}, torch {env['torch']}, git "
              f"{env['git_sha']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--predictors", nargs="+", default=list(PREDICTORS), choices=PREDICTORS)
    ap.add_argument("--capacities", nargs="+", type=float, default=[0.25, 1.0])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "hot_path_cost.json")
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
    result = {"benchmark": "hot_path_cost", "goal_us": GOAL_US,
              "simulator_wrapper_us": ComputeModel.from_name("hf-eager").wrapper_s * 1e6,
              "settings": {"model": "qwen2_moe L=24 E=60 k=4 H=%d (random weights)" % args.hidden,
                           "calls": len(calls), "new_tokens": args.new_tokens, "repeats": args.repeats,
                           "engine": "sync (copies stubbed)", "torch_threads": 1},
              "environment": environment(torch.device("cpu")), "rows": rows}
    write_json(args.out, result)
    write_text(args.out.with_suffix(".md"), markdown(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

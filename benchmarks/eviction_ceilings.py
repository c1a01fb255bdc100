"""Ceilings of learned eviction: what information the hit-rate and tok/s goals of learned eviction need, on the same
held-out sequences and the same replay (`specmoe.sim.engine.simulate`, demand fetching, warm-up, RTX 3090 profile)
as `benchmarks/eviction_policies.py`.

Per capacity, demand fetching, each policy's hit rate (`specmoe.sim.rate_policies`):
  * LRU, hit-density (the default), the learned policy given (--learned) and Belady's MIN: the benchmark's rows;
  * rate oracles (they read the future): evict the lowest true routing rate / steps to the layer's next visit,
    the rate over the next W visits of the expert's layer (--windows) or over the rest of its sequence (A0);
  * history rates: the same rule with the rate estimated from decayed counts (decays 0 .. 0.995), the weights
    fitted by least squares on the training routing (--train, never the scored sequences): the best single
    decay per layer, a linear mix per layer, and one mix for all layers; the target rate over the next
    --fit-windows visits. How close a rule on these history features gets.
At --prefetch-capacity, with the oracle predictor's prefetches: each eviction's tok/s, Belady's MIN among them
(the best eviction beside those prefetches), and the demand hit rate an eviction would need for oracle + it to
reach Belady-MIN demand's tok/s (interpolated over the evictions measured, demand hit rate -> oracle + it tok/s).

    python benchmarks/eviction_ceilings.py /work/tmp/traces_imported/ds_test --max-passes 4000 \\
        --train /work/tmp/traces_imported/ds_train --learned /work/tmp/evict3/deepseek --capacities 0.25 0.5 \\
        --goal half-gap --prefetch-capacity 0.25 --name eviction_ceilings_deepseek
    python benchmarks/eviction_ceilings.py /work/tmp/traces_imported/mixtral --sequences 1:2 \\
        --train /work/tmp/traces_imported/mixtral --train-sequences 0:1 --learned /work/tmp/evict3/mixtral \\
        --capacities 0.234 0.25 --goal 0.45 --name eviction_ceilings_mixtral

Writes benchmarks/results/<name>.{json,md}: settings, environment and aggregate counters only (no routing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from eviction_policies import select, shape_for
from specmoe.bench.environment import environment
from specmoe.bench.report import markdown_table
from specmoe.io import write_json, write_text
from specmoe.measure.results import first_crossing
from specmoe.sim.compute import ComputeModel, load_op_counts
from specmoe.sim.engine import simulate
from specmoe.sim.hardware import PROFILES, HardwareProfile
from specmoe.sim.policies import BeladyPolicy, future_uses
from specmoe.sim.predictions import replay_oracle
from specmoe.sim.rate_policies import (
    HISTORY_DECAYS, BlendedRatePolicy, FutureRates, HistoryRatePolicy, RateOraclePolicy, fit_history_rates,
    history_error, routed_array, sequence_ends,
)
from specmoe.sim.stream import load_stream
from specmoe.sim.sweep import SweepSettings

RESULTS = Path(__file__).parent / "results"


def history_fits(train, E: int, windows, max_passes: int | None) -> tuple[dict, int]:
    """({label: weights [L, J + 1]} fitted on the training routing, the passes fitted on)."""
    if max_passes and max_passes < train.num_passes:
        train = train.select_passes(0, max_passes)
    used = routed_array(train, E)
    fits = {}
    for w in windows:
        start = time.perf_counter()
        fits[f"history: best decay per layer, W={w}"] = fit_history_rates(used, w, single=True)
        fits[f"history: linear per layer, W={w}"] = fit_history_rates(used, w)
        fits[f"history: linear, all layers, W={w}"] = fit_history_rates(used, w, per_layer=False)
        print(f"history fits W={w}: {time.perf_counter() - start:.0f} s on {train.num_passes} passes", flush=True)
    return fits, train.num_passes


def blends(out: dict, args, stream, shape, profile, kw: dict, used, fits: dict) -> list[dict]:
    """Per capacity: the oracle window of the best hit rate, blended with that window's best history fit (shares
    of the true rate in --shares): each blend's hit rate, and the error of a rate estimate that reaches the goal
    (interpolated over the shares; the blend's error is (1 - share) times the history fit's)."""
    rows = []
    for cap in args.capacities:
        demand = {r["policy"]: r["hit_rate"] for r in out["demand"] if r["capacity"] == cap}
        w = max((w for w in args.windows if w in args.fit_windows),
                key=lambda w: demand[f"oracle rate: next {w} visits"], default=None)
        if w is None:
            continue
        label = max((k for k in fits if k.endswith(f"W={w}")), key=lambda k: demand[k])
        error = history_error(used, fits[label], w)
        future = FutureRates(used, w)
        points = [(0.0, demand[label])]
        for share in args.shares:
            r = simulate(stream, shape, profile, cap, policy=BlendedRatePolicy(future, fits[label], share), **kw)
            points.append((share, r.hits / max(r.hits + r.misses, 1)))
            print(f"{cap} blend {share} of next {w} visits with {label}: {points[-1][1]:.4f}", flush=True)
        points.append((1.0, demand[f"oracle rate: next {w} visits"]))
        goal = out["goals"]["hit_rate"][str(cap)]
        share = first_crossing(points, goal)
        rows.append({"capacity": cap, "window": w, "history": label, "history_rmse": error["rmse"],
                     "mean_rate_rmse": error["rmse_mean"], "points": points, "goal": goal, "needed_share": share,
                     "needed_rmse": None if share is None else (1 - share) * error["rmse"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path, help="the scored routing (a stream or a trace directory)")
    ap.add_argument("--sequences", default="all", help="START:STOP sequences scored (default all)")
    ap.add_argument("--max-passes", type=int, help="score only the first N passes")
    ap.add_argument("--train", type=Path, required=True, help="training routing (the history fits)")
    ap.add_argument("--train-sequences", default="all")
    ap.add_argument("--train-passes", type=int, default=20000, help="fit on the first N training passes")
    ap.add_argument("--learned", type=Path, help="a learned policy directory (its row, for comparison)")
    ap.add_argument("--shape", help="model shape preset (default: by geometry)")
    ap.add_argument("--profile", default="rtx3090", choices=sorted(PROFILES))
    ap.add_argument("--capacities", type=float, nargs="+", default=[0.25])
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 4, 16, 64], help="rate oracles' windows")
    ap.add_argument("--fit-windows", type=int, nargs="+", default=[1, 4, 16],
                    help="history fits' target windows")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                    help="blends of the best oracle window's true rate with its history estimate")
    ap.add_argument("--goal", default="half-gap", help="hit-rate goal: half-gap (LRU + half the gap to Belady) or "
                    "a hit rate")
    ap.add_argument("--prefetch-capacity", type=float, help="add the oracle-predictor runs at this capacity")
    ap.add_argument("--warmup", type=int, default=64, help="passes replayed before measuring (at most half)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="eviction_ceilings")
    args = ap.parse_args(argv)

    stream, scored = select(load_stream(args.trace), args.sequences)
    if args.max_passes and args.max_passes < stream.num_passes:
        stream = stream.select_passes(0, args.max_passes)
        scored += f", first {args.max_passes} passes"
    train, trained_on = select(load_stream(args.train), args.train_sequences)
    shape = shape_for(stream, args.shape)
    E, L = stream.num_experts, stream.num_layers
    profile = HardwareProfile.from_name(args.profile)
    settings = SweepSettings(capacities=tuple(args.capacities), warmup_passes=min(args.warmup, stream.num_passes // 2))
    kw = dict(ops=load_op_counts(shape.model_type), compute=ComputeModel.from_name(settings.compute),
              context=settings.context, warmup_passes=settings.warmup_passes)
    used, ends = routed_array(stream, E), sequence_ends(stream)
    fits, fit_passes = history_fits(train, E, args.fit_windows, args.train_passes)

    def policies():  # label -> a factory of a fresh policy (one per replay)
        out = {"lru": lambda: "lru", "hit-density": lambda: "hit-density"}
        if args.learned:
            out["learned"] = lambda: str(args.learned)
        out["belady"] = lambda: "belady"
        out["oracle rate: rest of the sequence (A0)"] = lambda: RateOraclePolicy(used, None, ends)
        for w in args.windows:
            out[f"oracle rate: next {w} visits"] = lambda w=w: RateOraclePolicy(used, w)
        for label, weights in fits.items():
            out[label] = lambda weights=weights: HistoryRatePolicy(weights, HISTORY_DECAYS)
        return out

    out = {"environment": environment("cpu"),
           "settings": {"trace": args.trace.name, "scored": scored, "passes": stream.num_passes,
                        "train": args.train.name, "trained_on": trained_on, "fit_passes": fit_passes,
                        "shape": shape.name, "profile": profile.name, "warmup_passes": settings.warmup_passes,
                        "decays": list(HISTORY_DECAYS), "learned": str(args.learned) if args.learned else None},
           "demand": [], "prefetch": None}
    for cap in args.capacities:
        for label, make in policies().items():
            start = time.perf_counter()
            policy = make()
            r = simulate(stream, shape, profile, cap, policy=policy, **kw)
            row = {"capacity": cap, "policy": label, "hit_rate": r.hits / max(r.hits + r.misses, 1),
                   "tok_s": r.tok_s, "seconds": time.perf_counter() - start}
            out["demand"].append(row)
            print(f"{cap} {label}: {row['hit_rate']:.4f} ({row['seconds']:.0f} s)", flush=True)
    goals = {}
    for cap in args.capacities:
        rows = {r["policy"]: r["hit_rate"] for r in out["demand"] if r["capacity"] == cap}
        goals[str(cap)] = (rows["lru"] + 0.5 * (rows["belady"] - rows["lru"]) if args.goal == "half-gap"
                           else float(args.goal))
    out["goals"] = {"rule": args.goal, "hit_rate": goals}
    out["blend"] = blends(out, args, stream, shape, profile, kw, used, fits)
    if args.prefetch_capacity is not None:
        cap = args.prefetch_capacity
        oracle = replay_oracle(stream, E)
        demand = {r["policy"]: r for r in out["demand"] if r["capacity"] == cap}
        if not demand:
            raise SystemExit("--prefetch-capacity must be one of --capacities (the demand hit rates it reads)")
        runs = []
        passes = stream.passes()
        makers = policies()
        makers["belady"] = lambda: BeladyPolicy(future_uses(passes, L))  # as an object it runs beside candidates
        for label, make in makers.items():
            start = time.perf_counter()
            r = simulate(stream, shape, profile, cap, policy=make(), candidates=oracle.candidates,
                         **{**kw, "lookahead": oracle.lookahead})
            runs.append({"policy": label, "demand_hit_rate": demand[label]["hit_rate"], "tok_s": r.tok_s,
                         "bytes_per_token": r.bytes_moved / max(r.tokens, 1), "seconds": time.perf_counter() - start})
            print(f"oracle + {label}: {r.tok_s:.2f} tok/s ({runs[-1]['seconds']:.0f} s)", flush=True)
        goal = demand["belady"]["tok_s"]
        need = first_crossing([(r["demand_hit_rate"], r["tok_s"]) for r in runs], goal)
        out["prefetch"] = {"capacity": cap, "predictor": oracle.name, "goal_tok_s": goal, "runs": runs,
                           "needed_demand_hit_rate": need}
    json_path = args.out / f"{args.name}.json"
    write_json(json_path, out)
    write_text(json_path.with_suffix(".md"), report(out))
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}")
    return 0


def r2(rmse: float, blend: dict) -> float:
    return 1 - (rmse / blend["mean_rate_rmse"]) ** 2


def report(out: dict) -> str:
    s, env = out["settings"], out["environment"]
    md = [f"**Ceilings of learned eviction, simulated decode on {s['profile']}** ({s['trace']}, {s['shape']}, "
          f"{s['scored']}: {s['passes']} passes; warm-up {s['warmup_passes']}; demand fetching). Rate oracles read the "
          f"future (they say what information a goal needs); history fits on {s['trained_on']} of {s['train']} "
          f"(first {s['fit_passes']} passes), never the scored sequences. git {env.get('git_sha', '?')}.\n"]
    caps = sorted({r["capacity"] for r in out["demand"]})
    labels = list(dict.fromkeys(r["policy"] for r in out["demand"]))
    by = {(r["capacity"], r["policy"]): r for r in out["demand"]}
    rows = []
    for label in labels:
        cells = []
        for cap in caps:
            hit, goal = by[(cap, label)]["hit_rate"], out["goals"]["hit_rate"][str(cap)]
            cells.append(f"{hit:.3f}" + (" (>= goal)" if hit >= goal else ""))
        rows.append([label, *cells])
    rows.append(["**goal** (" + out["goals"]["rule"] + ")", *(f"{out['goals']['hit_rate'][str(c)]:.3f}" for c in caps)])
    md.append(markdown_table(["policy", *(f"hit rate at {c}" for c in caps)], rows))
    if out.get("blend"):
        md.append("\n**The error a rate estimate may have** (on the scored routing: root mean square error against "
                  "the true rate over the next W visits, after each visit; blends of the oracle with the history fit "
                  "have (1 - share) of its error)\n")
        md.append(markdown_table(
            ["capacity", "W", "history fit", "its RMSE (R2)", "RMSE of the layer's mean rate",
             "hit rate at shares " + ", ".join(f"{x:g}" for x, _ in out["blend"][0]["points"]), "goal",
             "share needed", "RMSE needed"],
            [[f"{b['capacity']:g}", b["window"], b["history"],
              f"{b['history_rmse']:.4f} ({r2(b['history_rmse'], b):.3f})",
              f"{b['mean_rate_rmse']:.4f}", ", ".join(f"{y:.3f}" for _, y in b["points"]), f"{b['goal']:.3f}",
              "none" if b["needed_share"] is None else f"{b['needed_share']:.2f}",
              "none" if b["needed_rmse"] is None else f"{b['needed_rmse']:.4f} ({r2(b['needed_rmse'], b):.3f})"]
             for b in out["blend"]]))
        md.append("\nR2: the share of the future rate's variance about its layer's mean an estimate explains, "
                  "1 - (RMSE / RMSE of the mean)^2.")
    p = out.get("prefetch")
    if p:
        md.append(f"\n**With the {p['predictor']} predictor's prefetches at capacity {p['capacity']}** (goal: "
                  f"Belady-MIN demand's {p['goal_tok_s']:.2f} tok/s, simulated)\n")
        md.append(markdown_table(["eviction", "its demand hit rate", "oracle + it: tok/s (simulated)", "MiB/token"],
                                 [[r["policy"], f"{r['demand_hit_rate']:.3f}", f"{r['tok_s']:.2f}",
                                   f"{r['bytes_per_token'] / 2**20:.0f}"] for r in p["runs"]]))
        need = p["needed_demand_hit_rate"]
        md.append("\nDemand hit rate an eviction needs for oracle + it to reach the goal (interpolated over the rows "
                  "above): " + (f"**{need:.3f}**." if need is not None else "**none reaches it**."))
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())

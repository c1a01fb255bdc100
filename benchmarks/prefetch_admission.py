"""Prediction against no prediction under prefetch admission (`runtime/admission.py`), simulated on real routing.

Each trace is split by sequence as `benchmarks/real_routing.py` does (seeded 80/10/10, or with fewer than 3
sequences the longest trains; history and interlayer fitted on the training sequences), and its held-out decode is simulated for every capacity x policy x misses mode x
predictor: "none", the oracle and the trained routing-only predictors. All figures are simulated (hardware and host
profiles, the trace's matching model shape; `--compression` for a compressed shape). The predictor's own copies
("issued", "used" before eviction, "refused" by admission) are counted apart from the copies of host-computed
experts (misses="auto", `Stats.reuse_issued` / `reuse_used`), and hits on copies still in flight apart from hits
on resident experts.

    specmoe import-routing moe-beyond /work/traces/eamc --max-sequences 120 --out /tmp/deepseek
    python benchmarks/prefetch_admission.py /tmp/deepseek --capacities 0.1 0.25 0.5 --max-fit
    python benchmarks/prefetch_admission.py /tmp/mixtral --capacities --max-fit --compression none int4-g128 \
        --predictors none oracle --name prefetch_admission_mixtral

Writes benchmarks/results/<name>.{json,md}.
"""

# Shape legend: L MoE layers, E experts, k top-k

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from specmoe.bench.environment import environment
from specmoe.io import write_json, write_text
from specmoe.sim.bounds import memory_plan
from specmoe.sim.compute import count_ops
from specmoe.sim.engine import simulate
from specmoe.sim.hardware import HardwareProfile
from specmoe.sim.host import HostProfile
from specmoe.sim.predictions import replay_oracle, replay_predictor
from specmoe.sim.shapes import ModelShape, matching_presets
from specmoe.sim.stream import RoutingStream
from specmoe.traces import load_traces
from specmoe.training.fit import fit_predictor
from specmoe.training.loop import TrainConfig

from real_routing import split  # benchmarks/ is on sys.path when this runs as a script

RESULTS = Path(__file__).parent / "results"
PREDICTORS = ("none", "oracle", "history", "interlayer")


def replays(splits, stream, geo, names, args) -> dict:
    out = {}
    for name in names:
        if name == "none":
            continue
        if name == "oracle":
            out[name] = replay_oracle(stream, geo.num_experts, 1)
            continue
        config = TrainConfig(steps=args.train_steps, warmup_steps=max(1, min(100, args.train_steps // 10)),
                             max_minutes=args.train_minutes, device="cpu", seed=args.seed)
        options = {"dim": 64, "layers": 2, "heads": 4, "ff": 128} if name == "interlayer" else {}
        predictor, _ = fit_predictor(name, splits, lookahead=1, config=config, **options)
        out[name] = replay_predictor(stream, predictor, geo, [None] * geo.num_layers, name, progress=False)
    return out


def run_trace(directory: Path, args) -> list[dict]:
    trace = load_traces(directory, hidden=False)
    geo = trace.geometry
    splits, _ = split(trace, args.seed)  # as real_routing.py: 80/10/10 by sequence, or the longest trains
    stream = RoutingStream.from_trace(splits["test"])
    if stream.num_passes > args.max_passes:
        stream = stream.select_passes(0, args.max_passes)
    name = next(s for s in matching_presets(stream) if ModelShape.from_name(s).geometry.num_experts == geo.num_experts)
    profile, host = HardwareProfile.from_name(args.profile), HostProfile.from_name(args.host)
    reps = replays(splits, stream, geo, args.predictors, args)
    rows = []
    for compression in args.compression:
        shape = ModelShape.from_name(name).compressed(compression)
        ops = count_ops(shape.model_type)
        caps = [(c, f"{c:g}") for c in args.capacities]
        if args.max_fit:
            fit = memory_plan(shape, profile, (), context=args.context)["max_capacity"]
            caps.append((fit, f"max fit {fit:.3f}"))
        for cap, label in caps:
            for policy in args.policies:
                for misses in args.misses:
                    row = {"trace": str(directory), "shape": shape.name, "compression": compression,
                           "capacity": cap, "capacity_label": label, "policy": policy, "misses": misses, "runs": {}}
                    for pred in args.predictors:
                        rep = reps.get(pred)
                        kw = dict(candidates=rep.candidates, lookahead=rep.lookahead) if rep else {}
                        r = simulate(stream, shape, profile, cap, ops=ops, policy=policy, misses=misses,
                                     host=host if misses != "fetch" else None, warmup_passes=args.warmup,
                                     context=args.context, **kw)
                        row["runs"][pred] = {"tok_s": r.tok_s, "hit_rate": r.hit_rate, "hits": r.hits,
                                             "hits_in_flight": r.hits_in_flight, "misses": r.misses,
                                             "prefetch_issued": r.prefetch_issued, "prefetch_used": r.prefetch_used,
                                             "prefetch_refused": r.prefetch_refused,
                                             "prefetch_precision": r.prefetch_precision,
                                             "reuse_issued": r.reuse_issued, "reuse_used": r.reuse_used,
                                             "reuse_refused": r.reuse_refused,
                                             "host_computed": r.host_computed}
                    rows.append(row)
                    print(label, policy, misses, {p: round(v["tok_s"], 2) for p, v in row["runs"].items()},
                          flush=True)
    return rows


def predicted(run: dict) -> str:
    """A predictor's own copies: issued / used / refused (REUSE copies, of host-computed experts, apart)."""
    return (f"{run['prefetch_issued'] - run.get('reuse_issued', 0)} / {run['prefetch_used'] - run.get('reuse_used', 0)}"
            f" / {run['prefetch_refused'] - run.get('reuse_refused', 0)}")


def markdown(result: dict) -> str:
    preds = result["settings"]["predictors"]
    guessing = [p for p in preds if p != "none"]
    lines = ["| shape | capacity | policy | misses | " + " | ".join(f"{p} tok/s" for p in preds) +
             " | predicted copies issued / used / refused (" + ", ".join(guessing) + ") | copies of host-computed "
             "experts issued / used / refused (" + ", ".join(preds) + ") | hits on copies in flight (" + ", ".join(preds) + ") |",
             "|---|---|---|---|" + "---:|" * len(preds) + "---|---|---|"]
    for row in result["rows"]:
        runs = row["runs"]
        best_none = runs.get("none", {}).get("tok_s")
        cells = []
        for p in preds:
            v = runs[p]["tok_s"]
            below = best_none is not None and p != "none" and round(v, 2) < round(best_none, 2)
            mark = " (below none)" if below else ""
            cells.append(f"{v:.2f}{mark}")
        counts = ", ".join(predicted(runs[p]) for p in guessing)
        reuse = ("—" if row["misses"] == "fetch" else
                 ", ".join(f"{runs[p].get('reuse_issued', 0)} / {runs[p].get('reuse_used', 0)} / "
                           f"{runs[p].get('reuse_refused', 0)}" for p in preds))
        late = ", ".join(str(runs[p]["hits_in_flight"]) for p in preds)
        lines.append(f"| {row['shape']} | {row['capacity_label']} | {row['policy']} | {row['misses']} | "
                     + " | ".join(cells) + f" | {counts} | {reuse} | {late} |")
    s = result["settings"]
    lines += ["", f"Simulated decode (not measured on a GPU) on {s['profile']} with host {s['host']}, held-out "
              f"sequences of each trace (seed {s['seed']}), first {s['max_passes']} steps, warm-up {s['warmup']} "
              f"excluded; prefetch admission on (`runtime/admission.py`). *Predicted copies*: the predictor's "
              f"candidates copied ahead of their use ('used': routed to before eviction; 'refused': candidates not "
              f"resident that admission did not copy). *Copies of host-computed experts* (misses=auto only, in every "
              f"predictor's row; no predictor chooses them): experts the host just computed, copied behind the "
              f"predictor's candidates so that they are resident at their layer's next visit, where admission finds "
              f"them worth their victim and the link time they take from demand copies. *Hits on copies in "
              f"flight*: routed experts whose copy had not landed (compute waited for it), counted apart from hits "
              f"on resident experts. git {result['environment'].get('git_sha')}."]
    return "\n".join(lines) + "\n"


def rerender(json_path: Path) -> None:
    """Rewrite the markdown of a result JSON (the table is made from the JSON alone)."""
    from specmoe.io import read_json

    write_text(json_path.with_suffix(".md"), markdown(read_json(json_path)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("traces", nargs="+", type=Path)
    p.add_argument("--capacities", type=float, nargs="*", default=[0.1, 0.25, 0.5])
    p.add_argument("--max-fit", action="store_true", help="also the largest capacity that fits the profile")
    p.add_argument("--compression", nargs="+", default=["none"])
    p.add_argument("--policies", nargs="+", default=["hit-density"])
    p.add_argument("--misses", nargs="+", default=["fetch", "auto"])
    p.add_argument("--predictors", nargs="+", default=["none", "oracle", "history"], choices=PREDICTORS)
    p.add_argument("--profile", default="rtx3090")
    p.add_argument("--host", default="3090-box")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--max-passes", type=int, default=600)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--train-minutes", type=float, default=None,
                   help="also cap each predictor's training at this wall time (default: none, so that a rerun fits "
                        "the same predictors whatever the machine's load)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="prefetch_admission")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = [row for d in args.traces for row in run_trace(d, args)]
    result = {"benchmark": "prefetch_admission", "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                             for k, v in vars(args).items() if k != "traces"},
              "traces": [str(d) for d in args.traces], "rows": rows, "environment": environment("cpu"),
              "seconds": round(time.perf_counter() - t0, 1)}
    result["settings"]["out"] = str(args.out)
    out = args.out / f"{args.name}.json"
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

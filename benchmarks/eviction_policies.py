"""Eviction policies on routing streams: LRU, aged LFU, the runtime's default and Belady's MIN (demand fetching),
and the deployable ones again with the oracle's prefetches, at each capacity and at the largest that fits the
profile. Simulated (`specmoe.sim`): hit rate and decode tok/s.

    python benchmarks/eviction_policies.py benchmarks/results/bench_reference_cpu.routing.safetensors
    python benchmarks/eviction_policies.py STREAM.safetensors ... --max-passes 3000 --capacities 0.1 0.25

Each TRACE is a routing stream written by `RoutingStream.save`; its model shape is the preset with its routing
geometry (or --shapes, one per trace). Writes benchmarks/results/<name>.{json,md}: settings, environment and
aggregate counters per run only (no routing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specmoe.bench.environment import environment
from specmoe.bench.report import markdown_table
from specmoe.io import write_json, write_text
from specmoe.runtime.policies import DEFAULT_POLICY
from specmoe.sim.hardware import PROFILES, HardwareProfile
from specmoe.sim.predictions import replay_oracle
from specmoe.sim.shapes import PRESETS, ModelShape, matching_presets
from specmoe.sim.stream import RoutingStream
from specmoe.sim.sweep import SweepSettings, run_sweep

RESULTS = Path(__file__).parent / "results"
DEMAND = ("lru", "lfu", DEFAULT_POLICY, "belady")
PREFETCH = ("lru", DEFAULT_POLICY)


def shape_for(stream: RoutingStream, name: str | None) -> ModelShape:
    """The named preset, else the first preset whose routing geometry the stream has."""
    found = matching_presets(stream)
    names = [name] if name else sorted(PRESETS)
    for n in names:
        if n in found:
            return ModelShape.from_name(n)
    raise SystemExit(f"no shape among {names} has the stream's geometry L={stream.num_layers} k={stream.top_k} "
                     f"E={stream.num_experts}; pass --shapes")


def trace_markdown(entry: dict) -> str:
    rows = []
    for r in sorted(entry["runs"], key=lambda r: (r["capacity"], r["predictor"] != "none", r["policy"])):
        label = r["policy"] if r["predictor"] == "none" else f"{r['predictor']} + {r['policy']}"
        rows.append([f"{r['capacity']:.3f}" + (" (max fit)" if r["max_fit"] else ""), label, f"{r['hit_rate']:.3f}",
                     f"{r['tok_s']:.1f}", f"{r['bound_tok_s']:.1f}"])
    head = f"## {entry['trace']} ({entry['shape']}, {entry['passes']} passes, {entry['tokens']} tokens)\n\n"
    return head + markdown_table(["capacity", "policy", "hit rate", "tok/s (simulated)", "bound tok/s"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", type=Path, help="routing streams (.safetensors from RoutingStream.save)")
    ap.add_argument("--shapes", nargs="+", choices=sorted(PRESETS), help="model shape per trace (default: by geometry)")
    ap.add_argument("--profile", default="rtx3090", choices=sorted(PROFILES))
    ap.add_argument("--capacities", type=float, nargs="+", default=[0.25], help="the max-fit capacity is added")
    ap.add_argument("--max-passes", type=int, default=None, help="replay only the first N passes of each trace")
    ap.add_argument("--warmup", type=int, default=64, help="passes replayed before measuring")
    ap.add_argument("--no-prefetch", action="store_true", help="skip the runs with the oracle's prefetches")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="eviction_policies")
    args = ap.parse_args(argv)
    if args.shapes and len(args.shapes) != len(args.traces):
        ap.error("give one --shapes entry per trace")
    profile = HardwareProfile.from_name(args.profile)
    settings = SweepSettings(capacities=tuple(args.capacities), policies=DEMAND,
                             prefetch_policies=() if args.no_prefetch else PREFETCH, warmup_passes=args.warmup)
    out = {"environment": environment("cpu"), "settings": {**settings.to_dict(), "profile": profile.name,
           "max_passes": args.max_passes, "default_policy": DEFAULT_POLICY}, "traces": []}
    for i, path in enumerate(args.traces):
        stream = RoutingStream.load(path)
        if args.max_passes:
            stream = stream.select_passes(0, min(args.max_passes, stream.num_passes))
        shape = shape_for(stream, args.shapes[i] if args.shapes else None)
        predictors = [] if args.no_prefetch else [replay_oracle(stream, shape.num_experts)]
        sweep = run_sweep(stream, [shape], [profile], settings, predictors)
        keep = ("capacity", "max_fit", "policy", "predictor", "hit_rate", "tok_s", "hits", "misses", "prefetch_issued",
                "prefetch_used", "prefetch_wasted", "bytes_moved", "stall_s", "tokens", "num_slots", "bound_tok_s")
        out["traces"].append({"trace": path.name, "shape": shape.name, "passes": stream.num_passes,
                              "tokens": stream.num_tokens, "runs": [{k: r[k] for k in keep} for r in sweep["runs"]]})
        print(trace_markdown(out["traces"][-1]) + "\n", flush=True)
    json_path = args.out / f"{args.name}.json"
    write_json(json_path, out)
    env = out["environment"]
    md = [f"# Eviction policies (simulated, {profile.name})\n",
          f"Default policy: {DEFAULT_POLICY}. git {env.get('git_sha', '?')}; warm-up {args.warmup} passes"
          + (f"; first {args.max_passes} passes" if args.max_passes else "") + ".\n"]
    md += [trace_markdown(t) + "\n" for t in out["traces"]]
    write_text(json_path.with_suffix(".md"), "\n".join(md))
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

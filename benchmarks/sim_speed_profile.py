"""Where the simulator's replay spends its time, per setting of `sim_speed.py`: the share of each part of the code.

Each setting (`sim_speed.SETTINGS`: LRU, the oracle + LRU, Belady's MIN, hit-density) is replayed once without a
profiler: process CPU µs per MoE layer step. It is then replayed again under cProfile, and the profile's own time per
function is summed per part of the code: the runtime's scheduler (`runtime/scheduler.py`), prefetch admission and its
governor (`runtime/admission.py`), the eviction policy (`runtime/policies.py`, `sim/policies.py`), the cache
(`runtime/cache.py`), the replay and its clock (`sim/engine.py`, `sim/clock.py`), numpy, and the rest. cProfile
charges every Python call its own overhead, so the shares are estimates (parts made of many small calls look
larger than they are). From them: a setting's µs per step with each part's share taken out, which says how fast
the replay would be if that part cost nothing, and so whether a goal against a baseline (`--baseline-json`: a
`sim_speed.py` result) can be reached by cutting only the other parts.

    python benchmarks/sim_speed_profile.py --stream routing.safetensors --tokens 2000 \\
        --baseline-json benchmarks/results/sim_speed_hit_density.json

Writes benchmarks/results/sim_speed_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

GOALS = {"hit-density": 3.0}  # issue 18, item 5; the other settings: no slower than the baseline (1.0x)
PARTS = (("scheduler", ("runtime/scheduler.py",)), ("admission", ("runtime/admission.py",)),
         ("policy", ("runtime/policies.py", "sim/policies.py")), ("cache", ("runtime/cache.py",)),
         ("replay", ("sim/engine.py", "sim/clock.py")), ("numpy", ("numpy",)))


def part_of(filename: str, function: str) -> str:
    """The part of the code a profiled function belongs to (`PARTS`; builtins' methods by their name)."""
    path = filename.replace("\\", "/")
    for name, needles in PARTS:
        if any(n in path for n in needles):
            return name
    if path == "~" and ("numpy" in function or "ndarray" in function or "ufunc" in function):
        return "numpy"
    return "other"


def profile_setting(stream, shape, profile, capacity, ops, make) -> dict:
    from specmoe.sim.engine import simulate

    steps = stream.num_passes * shape.moe_layers
    kw = make()
    t0 = time.process_time()
    simulate(stream, shape, profile, capacity, ops=ops, **kw)
    plain = (time.process_time() - t0) / steps * 1e6
    prof = cProfile.Profile()
    prof.runcall(simulate, stream, shape, profile, capacity, ops=ops, **kw)
    shares = dict.fromkeys([name for name, _ in PARTS] + ["other"], 0.0)
    total = 0.0
    for (filename, _, function), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():
        shares[part_of(filename, function)] += tottime
        total += tottime
    shares = {k: v / total for k, v in shares.items()}
    return {"us_per_layer_step": plain, "share": shares,
            "without": {k: plain * (1 - v) for k, v in shares.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stream", required=True, help="a routing stream (RoutingStream.save); its first --tokens passes")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--capacity", type=float, default=0.25)
    ap.add_argument("--baseline-json", help="a sim_speed.py result: its 'before' figures are the baseline's")
    ap.add_argument("--out", default=str(RESULTS / "sim_speed_profile.json"))
    args = ap.parse_args(argv)

    from specmoe.bench.environment import environment
    from specmoe.io import write_json, write_text
    from specmoe.sim.engine import simulate
    from sim_speed import SETTINGS, replay_setup

    shape, stream, profile, ops, makes = replay_setup(args.tokens, args.stream)
    simulate(stream.select_passes(0, 20), shape, profile, args.capacity, ops=ops)  # warm-up: lazy imports
    rows = {name: profile_setting(stream, shape, profile, args.capacity, ops, makes[name]) for name in SETTINGS}
    baseline = None
    if args.baseline_json:
        ref = json.loads(Path(args.baseline_json).read_text())
        baseline = {"file": Path(args.baseline_json).name, "ref": ref["baseline"]["ref"],
                    "before": {k: v["us_per_layer_step"]["before"] for k, v in ref["rows"].items()},
                    "after": {k: v["us_per_layer_step"]["after"] for k, v in ref["rows"].items()}}
    data = {"environment": environment(), "settings": {"stream": f"{Path(args.stream).name}, first "
                                                       f"{stream.num_passes} passes", "capacity": args.capacity,
                                                       "shape": "deepseek-v2-lite", "profile": "rtx3090"},
            "load_average": os.getloadavg()[0], "rows": rows, "baseline": baseline}
    out = Path(args.out)
    write_json(out, data)
    names = [name for name, _ in PARTS] + ["other"]
    lines = ["| setting | µs per layer step | " + " | ".join(f"{n} share" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['us_per_layer_step']:.1f} | "
                     + " | ".join(f"{100 * r['share'][n]:.0f} %" for n in names) + " |")
    lines.append(f"\nShare of the replay's time per part of the code (cProfile's own time per function, summed; "
                 f"estimates: many small calls look larger), {data['settings']['stream']}, capacity {args.capacity}, "
                 f"{data['settings']['shape']} on {data['settings']['profile']}; µs per layer step: process CPU "
                 f"time of one run without the profiler (load average {data['load_average']:.1f}).")
    if baseline is not None:
        lines.append(f"\nAgainst {baseline['ref']} ({baseline['file']}: its figures; the shares are this run's): what "
                     f"the replay would cost if a part cost nothing, and the speed-up that would give.\n")
        lines.append("| setting | baseline µs | this checkout µs | speed-up | goal | time to cut for it | without "
                     "scheduler | without admission | without policy | without scheduler + admission + policy |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            before, after = baseline["before"][name], baseline["after"][name]
            share, goal = r["share"], GOALS.get(name, 1.0)

            def speedup(*parts):
                return before / (after * (1 - sum(share[p] for p in parts)))

            cut = max(0.0, 1 - before / (goal * after))  # share of this checkout's time the goal needs removed
            lines.append(f"| {name} | {before:.1f} | {after:.1f} | {before / after:.2f}x | {goal:g}x | "
                         f"{100 * cut:.0f} % | {speedup('scheduler'):.2f}x | {speedup('admission'):.2f}x | "
                         f"{speedup('policy'):.2f}x | {speedup('scheduler', 'admission', 'policy'):.2f}x |")
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

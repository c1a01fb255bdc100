"""What an eviction policy costs per MoE layer call on this CPU: the learned policies given, the default
(hit-density) and LRU, each driven as the scheduler drives it with demand fetching (observe, touch, victim,
forget through ExpertCache; `specmoe.training.eviction.measure_costs`) on the first calls of a routing trace.
Process CPU time (a shared machine's other load is not counted), median of --repeats replays, the policies'
replays taking turns (load falls on all alike); LRU's is the floor of the cache's own bookkeeping.

    python benchmarks/eviction_cost.py traces/ds_test --learned policies/deepseek --name eviction_cost

Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specmoe.bench.environment import environment
from specmoe.bench.report import markdown_table
from specmoe.io import write_json, write_text
from specmoe.runtime.learned_policy import load_learned_policy
from specmoe.runtime.policies import HitDensityPolicy, LRUPolicy
from specmoe.sim.stream import load_stream
from specmoe.training.eviction import measure_costs

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", type=Path, help="routing streams or trace directories")
    ap.add_argument("--learned", nargs="+", type=Path, required=True, help="per trace: a learned policy directory")
    ap.add_argument("--capacity", type=float, default=0.25)
    ap.add_argument("--calls", type=int, default=3000, help="MoE layer calls replayed")
    ap.add_argument("--repeats", type=int, default=5, help="replays per policy (taking turns); the median is kept")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="eviction_cost")
    args = ap.parse_args(argv)
    if len(args.learned) != len(args.traces):
        ap.error("give one --learned entry per trace")
    rows, out = [], {"environment": environment("cpu"), "settings": {"capacity": args.capacity, "calls": args.calls},
                     "traces": []}
    for path, learned in zip(args.traces, args.learned):
        stream = load_stream(path)
        E = stream.num_experts
        costs = measure_costs({"lru": LRUPolicy, "hit-density": HitDensityPolicy,
                               "learned": lambda: load_learned_policy(learned)}, stream, E, args.capacity, args.calls,
                              args.repeats)
        out["traces"].append({"trace": path.name, "learned": str(learned), "per_call_s": costs})
        for name, s in costs.items():
            rows.append([path.name, name, f"{s * 1e6:.1f}", f"{(s - costs['lru']) * 1e6:.1f}"])
        print(rows[-3:], flush=True)
    json_path = args.out / f"{args.name}.json"
    write_json(json_path, out)
    md = ("**Eviction policy cost per MoE layer call on this CPU**\n\n"
          + markdown_table(["trace", "policy", "us per layer call", "us beyond LRU"], rows)
          + f"\n\nProcess CPU time, median of {args.repeats} replays (the policies taking turns) of {args.calls} layer "
          f"calls at capacity {args.capacity}, demand fetching. git {out['environment'].get('git_sha', '?')}.\n")
    write_text(json_path.with_suffix(".md"), md)
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

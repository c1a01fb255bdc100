"""Simulator speed: wall time per MoE layer step of `specmoe.sim.simulate`.

A decode stream with DeepSeek-V2-Lite's routing geometry (26 MoE layers, 64 experts, top-6; synthetic,
Zipf-popular experts per layer with a token-to-token reuse, seeded) is replayed on the RTX 3090 profile in
the settings a sweep runs most: LRU demand fetching, the oracle's prefetches + LRU, and Belady's MIN, at
capacity 0.25. The figure is wall seconds / (passes * MoE layers), median over --repeats; candidates and
the Belady future are built outside the timed part (a sweep builds them once for many runs).

    python benchmarks/sim_speed.py --label after          # this checkout
    PYTHONPATH=/path/to/main python benchmarks/sim_speed.py --label before   # another checkout's code

Each label's row is kept in benchmarks/results/sim_speed.json (machine, versions, git sha of the code measured);
the markdown table and the speed-up (before / after) are written next to it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import specmoe
from specmoe.bench.environment import environment
from specmoe.io import read_json, write_json, write_text
from specmoe.sim.compute import count_ops
from specmoe.sim.engine import simulate
from specmoe.sim.hardware import HardwareProfile
from specmoe.sim.predictions import oracle_candidates
from specmoe.sim.shapes import ModelShape
from specmoe.sim.stream import RoutingStream

RESULTS = Path(__file__).parent / "results"
GOAL = 5.0  # speed-up of "after" over "before"


def synthetic_decode(tokens: int, layers: int, experts: int, top_k: int, reuse: float = 0.5, seed: int = 0):
    """[tokens, layers, top_k] routing: each layer's experts drawn from its own Zipf popularity, each of a token's
    experts kept from the previous token's same layer with probability `reuse`."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.arange(1, experts + 1).float().pow(-0.8)
    probs = torch.stack([popularity[torch.randperm(experts, generator=g)] for _ in range(layers)])  # [L, E]
    fresh = probs.repeat(tokens, 1).multinomial(top_k, generator=g).view(tokens, layers, top_k)  # [N, L, k]
    keep = torch.rand(tokens, layers, generator=g) < reuse  # [N, L]
    ids = fresh.clone()
    for t in range(1, tokens):
        ids[t, keep[t]] = ids[t - 1, keep[t]]
    return RoutingStream.from_sequences(ids, num_experts=experts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", required=True, help="row name, e.g. before / after")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--capacity", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream", help="a saved RoutingStream (RoutingStream.save) instead of the synthetic one")
    ap.add_argument("--out", default=str(RESULTS / "sim_speed.json"))
    args = ap.parse_args(argv)

    shape = ModelShape.from_name("deepseek-v2-lite")
    if args.stream:
        stream = RoutingStream.load(args.stream)
        source = Path(args.stream).name
    else:
        stream = synthetic_decode(args.tokens, shape.moe_layers, shape.num_experts, shape.top_k)
        source = f"synthetic decode, {args.tokens} tokens"
    profile = HardwareProfile.from_name("rtx3090")
    ops = count_ops(shape.model_type)
    steps = stream.num_passes * shape.moe_layers
    oracle = oracle_candidates(stream, shape.num_experts)
    settings = {"lru": dict(policy="lru"), "oracle+lru": dict(policy="lru", candidates=oracle),
                "belady": dict(policy="belady")}
    rows = {}
    for name, kw in settings.items():
        times, run = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run = simulate(stream, shape, profile, args.capacity, ops=ops, **kw)
            times.append(time.perf_counter() - t0)
        rows[name] = {"us_per_layer_step": statistics.median(times) / steps * 1e6, "seconds": statistics.median(times),
                      "hits": run.hits, "misses": run.misses, "prefetch_issued": run.prefetch_issued,
                      "tok_s": run.tok_s}
        print(f"{args.label} {name:11s} {rows[name]['us_per_layer_step']:8.1f} us/step  hits {run.hits} "
              f"misses {run.misses} prefetch {run.prefetch_issued}")

    out = Path(args.out)
    data = read_json(out, what="sim speed results") if out.is_file() else {"runs": {}}
    env = environment()
    env["specmoe_file"] = str(Path(specmoe.__file__).parent)  # the code measured (a checkout of main for "before")
    data["runs"][args.label] = {"environment": env, "rows": rows}
    data["settings"] = {"shape": "deepseek-v2-lite", "profile": "rtx3090", "capacity": args.capacity,
                        "stream": source, "passes": stream.num_passes, "layer_steps": steps, "repeats": args.repeats}
    runs = data["runs"]
    lines = ["| setting | " + " | ".join(f"{label} (µs/step)" for label in runs) + " | speed-up |",
             "|---|" + "---|" * len(runs) + "---|"]
    for name in settings:
        us = [runs[label]["rows"].get(name, {}).get("us_per_layer_step") for label in runs]
        speed = (f"{runs['before']['rows'][name]['us_per_layer_step'] / runs['after']['rows'][name]['us_per_layer_step']:.1f}x"
                 if {"before", "after"} <= set(runs) else "")
        lines.append(f"| {name} | " + " | ".join(f"{u:.1f}" if u else "" for u in us) + f" | {speed} |")
    if {"before", "after"} <= set(runs):
        data["speedup"] = {name: runs["before"]["rows"][name]["us_per_layer_step"]
                           / runs["after"]["rows"][name]["us_per_layer_step"] for name in settings}
        data["goal"] = GOAL
    write_json(out, data)
    s = data["settings"]
    lines.append(f"\nSimulator wall time per MoE layer step ({s['stream']}, {s['shape']}, {s['profile']}, capacity "
                 f"{s['capacity']}; median of {s['repeats']}).")
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Simulator speed: CPU time per MoE layer step of `specmoe.sim.simulate`, this checkout against a baseline.

A decode stream with DeepSeek-V2-Lite's routing geometry (26 MoE layers, 64 experts, top-6; synthetic, seeded:
each layer's experts drawn from its own Zipf popularity, a token keeping the previous token's experts at a layer
with probability 0.2, which puts LRU's hit rate at capacity 0.25 (0.52) near that of DeepSeek-V2-Lite's real
routing (0.49 on MoE-Beyond's traces)) is replayed on the RTX 3090 profile at capacity 0.25 in the settings a
sweep runs most: LRU demand fetching, the oracle's prefetches + LRU, and Belady's MIN. Two figures per setting,
in process CPU µs per MoE layer step (passes * MoE layers), the minimum over --repeats (the machine may be
shared: CPU time and the minimum are the least disturbed by other processes): `simulate` alone, and a run,
i.e. its inputs too (the oracle's candidates; Belady's future is built inside `simulate`).

The baseline's `specmoe/` is taken from git (`git archive REF`, default fd61117: main when issue 18 was filed)
and measured in a subprocess, alternating with this checkout's, so both see the same machine load. The goal
(issue 18, item 5): the default policy's (hit-density's) replay >= 3x faster than fd61117 on held-out-sized runs:

    python benchmarks/sim_speed.py                    # this checkout vs fd61117, synthetic routing
    python benchmarks/sim_speed.py --stream routing.safetensors --tokens 8916 --out ...

Writes benchmarks/results/sim_speed.{json,md} (machine, versions, git shas, settings, every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GOAL = 3.0  # issue 18, item 5: the default policy's replay (hit-density) >= 3x faster than the baseline
GOAL_SETTING = "hit-density"
BASELINE = "fd61117"  # main when issue 18 was filed (hit-density: 73 µs per MoE layer step on held-out routing)
SETTINGS = ("lru", "oracle+lru", "belady", "hit-density")


def synthetic_decode(tokens: int, layers: int, experts: int, top_k: int, reuse: float = 0.2, seed: int = 0):
    """[tokens, layers, top_k] routing ids (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.arange(1, experts + 1).float().pow(-0.8)
    probs = torch.stack([popularity[torch.randperm(experts, generator=g)] for _ in range(layers)])  # [L, E]
    fresh = probs.repeat(tokens, 1).multinomial(top_k, generator=g).view(tokens, layers, top_k)  # [N, L, k]
    keep = torch.rand(tokens, layers, generator=g) < reuse  # [N, L]
    ids = fresh.clone()
    for t in range(1, tokens):
        ids[t, keep[t]] = ids[t - 1, keep[t]]
    return ids


def replay_setup(tokens: int, stream_file: str | None = None):
    """(shape, stream, profile, op counts, inputs) with whichever specmoe is importable: DeepSeek-V2-Lite's shape,
    the first `tokens` passes of `stream_file` (else the synthetic decode), the RTX 3090 profile, and per setting
    a function giving `simulate`'s keyword arguments (its inputs)."""
    from specmoe.sim.compute import count_ops
    from specmoe.sim.hardware import HardwareProfile
    from specmoe.sim.predictions import oracle_candidates
    from specmoe.sim.shapes import ModelShape
    from specmoe.sim.stream import RoutingStream

    shape = ModelShape.from_name("deepseek-v2-lite")
    if stream_file:
        stream = RoutingStream.load(stream_file)
        stream = stream.select_passes(0, min(tokens, stream.num_passes))
    else:
        ids = synthetic_decode(tokens, shape.moe_layers, shape.num_experts, shape.top_k)
        stream = RoutingStream.from_sequences(ids, num_experts=shape.num_experts)
    inputs = {"lru": lambda: dict(policy="lru"),
              "oracle+lru": lambda: dict(policy="lru", candidates=oracle_candidates(stream, shape.num_experts)),
              "belady": lambda: dict(policy="belady"),  # Belady's future is built inside simulate
              "hit-density": lambda: dict(policy="hit-density")}  # the default policy
    return shape, stream, HardwareProfile.from_name("rtx3090"), count_ops(shape.model_type), inputs


def worker(tokens: int, capacity: float, stream_file: str | None = None) -> dict:
    """One timed `simulate` per setting with whichever specmoe is importable; returns the figures."""
    from specmoe.sim.engine import simulate

    shape, stream, profile, ops, inputs = replay_setup(tokens, stream_file)
    simulate(stream.select_passes(0, 20), shape, profile, capacity, ops=ops)  # warm-up: first calls, lazy imports
    steps = stream.num_passes * shape.moe_layers
    out = {}
    for name, make in inputs.items():
        t0 = time.process_time()
        kw = make()
        t1 = time.process_time()
        run = simulate(stream, shape, profile, capacity, ops=ops, **kw)
        t2 = time.process_time()
        out[name] = {"us_per_layer_step": (t2 - t1) / steps * 1e6, "run_us_per_layer_step": (t2 - t0) / steps * 1e6,
                     "hits": run.hits, "misses": run.misses, "prefetch_issued": run.prefetch_issued,
                     "prefetch_used": run.prefetch_used, "tok_s": run.tok_s}
    return out


def _run_worker(code_root: Path, tokens: int, capacity: float, stream_file: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tokens", str(tokens),
           "--capacity", str(capacity)]
    cmd += ["--stream", str(Path(stream_file).resolve())] if stream_file else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=code_root)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, check=True).stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=BASELINE, help=f"git ref whose specmoe/ is the 'before' (default {BASELINE})")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--capacity", type=float, default=0.25)
    ap.add_argument("--stream", help="replay this routing stream (RoutingStream.save; its first --tokens passes) "
                                     "instead of the synthetic one, e.g. real routing you may not redistribute")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "sim_speed.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        torch.set_num_threads(1)
        print(json.dumps(worker(args.tokens, args.capacity, args.stream)))
        return 0

    from specmoe.bench.environment import environment
    from specmoe.io import write_json, write_text

    baseline_sha = _git("rev-parse", args.baseline).decode().strip()
    samples: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=BytesIO(_git("archive", "--format=tar", baseline_sha, "specmoe"))) as tar:
            tar.extractall(tmp, filter="data")
        for i in range(args.repeats):  # alternate, so that both see the same load
            for label, root in (("before", Path(tmp)), ("after", ROOT)):
                samples[label].append(_run_worker(root, args.tokens, args.capacity, args.stream))
                print(f"round {i + 1}/{args.repeats} {label}: " + ", ".join(
                    f"{k} {v['us_per_layer_step']:.1f}" for k, v in samples[label][-1].items()), flush=True)

    rows = {}
    for name in SETTINGS:
        row = {}
        for metric in ("us_per_layer_step", "run_us_per_layer_step"):
            best = {label: min(s[name][metric] for s in samples[label]) for label in samples}
            row[metric] = {"before": best["before"], "after": best["after"], "speedup": best["before"] / best["after"]}
        counters = ("hits", "misses", "prefetch_issued", "prefetch_used")
        row["before_counters"] = {k: samples["before"][0][name][k] for k in counters}
        row["after_counters"] = {k: samples["after"][0][name][k] for k in counters}
        rows[name] = row
    data = {
        "environment": environment(),  # machine and versions (its git_sha is that of the installed specmoe)
        "after": {"git_sha": _git("rev-parse", "HEAD").decode().strip(),
                  "dirty": bool(_git("status", "--porcelain", "--", "specmoe").strip())},
        "baseline": {"ref": args.baseline, "git_sha": baseline_sha},
        "settings": {"shape": "deepseek-v2-lite", "profile": "rtx3090", "capacity": args.capacity,
                     "stream": (f"{Path(args.stream).name}, first {args.tokens} passes" if args.stream
                                else f"synthetic decode, {args.tokens} tokens (seed 0)"), "repeats": args.repeats,
                     "timer": "process CPU time, minimum over repeats"},
        "goal": {"issue": 18, "setting": GOAL_SETTING, "speedup": GOAL,
                 "met": rows[GOAL_SETTING]["us_per_layer_step"]["speedup"] >= GOAL},
        "rows": rows,
        "samples": samples,
    }
    out = Path(args.out)
    write_json(out, data)
    lines = ["| setting | simulate: before | after | speed-up | run (inputs + simulate): before | after | speed-up "
             "| same counters |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        same = "yes" if r["before_counters"] == r["after_counters"] else "no"
        a, b = r["us_per_layer_step"], r["run_us_per_layer_step"]
        lines.append(f"| {name} | {a['before']:.1f} | {a['after']:.1f} | {a['speedup']:.1f}x | {b['before']:.1f} | "
                     f"{b['after']:.1f} | {b['speedup']:.1f}x | {same} |")
    s = data["settings"]
    after = data["after"]["git_sha"][:7] + (" + uncommitted changes" if data["after"]["dirty"] else "")
    lines.append(f"\nSimulator CPU time in µs per MoE layer step: {s['stream']}, {s['shape']} on {s['profile']}, "
                 f"capacity {s['capacity']}; before = {baseline_sha[:7]}, after = {after}; {s['timer']} of "
                 f"{s['repeats']}. A run's inputs: the oracle's candidates (Belady's future is built inside simulate).")
    goal = data["goal"]
    lines.append(f"\nGoal (issue {goal['issue']}, item 5): {goal['setting']}'s replay >= {GOAL:g}x faster than "
                 f"{args.baseline}: {rows[GOAL_SETTING]['us_per_layer_step']['speedup']:.2f}x, "
                 f"{'met' if goal['met'] else 'missed'}.")
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

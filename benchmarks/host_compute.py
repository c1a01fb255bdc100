"""Validate the host-compute model on this machine's CPU: expert times measured at real expert shapes
(Qwen1.5-MoE-A2.7B and DeepSeek-V2-Lite share one, Mixtral-8x7B; bf16, int8, int4-g128; 1-8 tokens) against
what `specmoe.sim.host.HostProfile` "this-machine" predicts (its RAM bandwidth and kernel rates measured in the
same run, `measure_host_profile`, on the same host threads).

    python benchmarks/host_compute.py                    # a few minutes; writes benchmarks/results/host_compute.{json,md}
    python benchmarks/host_compute.py --quick            # the small shape only, 1 and 8 tokens
    python benchmarks/host_compute.py --host-threads 2   # host kernel threads (default: the runtime's default)

The experts are computed exactly as the runtime computes missed experts with misses="host" (`HostExperts`:
the host kernel where it runs, which each row names), each call on the next of enough copies of the expert to
exceed the caches, as decode reads experts from RAM. Times are the median over repeats (the machine is shared;
the spread and the load average are recorded next to each figure). The profile is measured twice (before and
after the rows) to show it is stable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specmoe.bench.environment import environment
from specmoe.io import write_json, write_text
from specmoe.sim.calibrate import SyntheticExpert
from specmoe.kernels.host import check_threads
from specmoe.sim.host import KERNEL_FORMATS, copies_beyond_cache, measure_host_profile
from specmoe.sim.shapes import ModelShape

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "host_compute"
GOAL = 0.20


def shapes(quick: bool) -> list[dict]:
    """Distinct expert shapes (H, I) of the named presets, with the models that share each."""
    names = ["qwen1.5-moe-a2.7b", "deepseek-v2-lite"] + ([] if quick else ["mixtral-8x7b"])
    out: dict[tuple[int, int], list[str]] = {}
    for name in names:
        s = ModelShape.from_name(name)
        out.setdefault((s.hidden_size, s.moe_intermediate_size), []).append(name)
    return [{"hidden": h, "inter": i, "models": models} for (h, i), models in out.items()]


def time_runs(fn, repeats: int, warmup: bool) -> list[float]:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run(quick: bool, threads: int) -> dict:
    load_before = os.getloadavg()
    profile = measure_host_profile(threads=threads)
    rows = []
    plan = [(shape, fmt) for shape in shapes(quick) for fmt in KERNEL_FORMATS]
    for shape, fmt in tqdm(plan, desc="host experts", unit="shape"):
        big = shape["hidden"] * shape["inter"] > 2**24
        tokens = (1, 8) if quick else (1, 2, 4, 8)
        repeats = 9 if big else 21
        one = SyntheticExpert(fmt, 16, 16)
        nbytes = one.nbytes * shape["hidden"] * shape["inter"] // 256
        one.close()
        expert = SyntheticExpert(fmt, shape["hidden"], shape["inter"], copies=copies_beyond_cache(nbytes),
                                 threads=threads)
        for t in tokens:
            times = time_runs(expert.runner(t), repeats, warmup=True)
            measured = statistics.median(times)
            predicted = profile.expert_seconds(expert.nbytes, expert.weights, t, fmt)
            bandwidth = profile.expert_call_s + profile.bandwidth_seconds(expert.nbytes)
            rows.append({
                "models": shape["models"], "hidden": shape["hidden"], "inter": shape["inter"], "format": fmt,
                "kernel": expert.kernel, "copies": expert.copies,
                "tokens": t, "bytes": expert.nbytes, "weights": expert.weights, "repeats": repeats,
                "measured_s": measured, "min_s": min(times), "max_s": max(times),
                "spread": max(times) / min(times) - 1,
                "predicted_s": predicted, "error": predicted / measured - 1,
                "bandwidth_only_s": bandwidth, "bandwidth_only_error": bandwidth / measured - 1,
                "achieved_bytes_per_s": expert.nbytes / measured,
            })
        expert.close()
        del expert
    within = [abs(r["error"]) <= GOAL for r in rows]
    again = measure_host_profile(refresh=True, threads=threads)  # stability: the same measurement once more
    return {
        "name": NAME, "environment": environment("cpu"), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "host_profile": profile.to_dict(), "goal": GOAL,
        "host_profile_again": again.to_dict(), "stability": stability(profile, again),
        "settings": {"quick": quick, "torch_threads": torch.get_num_threads(), "host_threads": threads},
        "rows": rows, "within_goal": sum(within), "total": len(rows),
    }


def stability(a, b) -> dict:
    """Second measurement / first - 1 for the bandwidth, the call cost and each kernel rate."""
    out = {"memory_bytes_per_s": b.memory_bytes_per_s / a.memory_bytes_per_s - 1,
           "expert_call_s": b.expert_call_s / a.expert_call_s - 1}
    for fmt in KERNEL_FORMATS:
        ka, kb = a.kernel(fmt), b.kernel(fmt)
        out[f"{fmt}.bytes_per_s"] = kb.bytes_per_s / ka.bytes_per_s - 1
        out[f"{fmt}.flops"] = kb.flops / ka.flops - 1
    return out


def markdown(result: dict) -> str:
    p = result["host_profile"]
    env = result["environment"]
    lines = [
        "| expert (models) | format | kernel | tokens | MB read | measured ms (spread) | model ms | error | "
        "bandwidth-only ms | error | achieved GB/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| H {r['hidden']} I {r['inter']} ({', '.join(r['models'])}) | {r['format']} | {r['kernel']} | "
            f"{r['tokens']} | "
            f"{r['bytes'] / 1e6:.1f} | {r['measured_s'] * 1e3:.1f} (+{r['spread'] * 100:.0f}%) | "
            f"{r['predicted_s'] * 1e3:.1f} | {r['error'] * 100:+.0f}% | {r['bandwidth_only_s'] * 1e3:.2f} | "
            f"{r['bandwidth_only_error'] * 100:+.0f}% | {r['achieved_bytes_per_s'] / 1e9:.2f} |")
    kernels = ", ".join(f"{fmt} {k['bytes_per_s'] / 1e9:.2f} GB/s at 1 token, {k['flops'] / 1e9:.1f} GFLOP/s at 8 "
                        f"({k['large'][1] / 1e9:.2f} GB/s, {k['large'][2] / 1e9:.1f} GFLOP/s at the large expert)"
                        for fmt, k in p["kernels"].items())
    worst = max(result["stability"].items(), key=lambda kv: abs(kv[1]))
    lines += [
        "",
        f"Measured on {env['device_name']} (torch {env['torch']}, git {env['git_sha']}, {env['date']}), shared with "
        f"other jobs: load average {result['load_average_before'][0]:.1f} before, "
        f"{result['load_average_after'][0]:.1f} after; host threads {result['settings']['host_threads']}. Median "
        f"over repeats, each call on the next of enough copies to exceed the caches; spread = slowest / fastest - 1.",
        f"Host profile \"this machine\" ({p['kernel_name']}): RAM read {p['memory_bytes_per_s'] / 1e9:.2f} GB/s, "
        f"per-expert call {p['expert_call_s'] * 1e3:.3f} ms, kernels (at a 2048x1408 and a 4096x14336 expert) "
        f"{kernels}. Measured "
        f"again after the rows: largest change {worst[0]} {worst[1] * 100:+.1f}%.",
        f"Model within ±{result['goal'] * 100:.0f}%: {result['within_goal']} of {result['total']} rows. "
        "Model = per-expert call + max(bytes / min(RAM bandwidth, kernel byte rate), 2 x weights x tokens / "
        "kernel FLOP/s). Bandwidth-only = per-expert call + bytes / RAM bandwidth, what a kernel at the read "
        "bandwidth would take.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (for the torch fallback path)")
    ap.add_argument("--host-threads", type=int, default=None,
                    help="host kernel threads (default: the runtime's, physical cores - 1, at most 8)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.quick, check_threads(args.host_threads))
    name = NAME + ("_quick" if args.quick else "")
    write_json(args.out / f"{name}.json", result)
    text = markdown(result)
    write_text(args.out / f"{name}.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

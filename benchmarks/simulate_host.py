"""Misses computed where they live, simulated: an RTX 3090 with the 3090-box host profile (Ryzen 9 5950X,
dual-channel DDR4-3200), misses="fetch" / "auto" / "host", the static hottest-experts placement, and the host
bound, at the largest capacity that fits 24 GB.

    python benchmarks/simulate_host.py \\
        --deepseek /work/data/streams/deepseek_dev_200.safetensors --mixtral /work/data/streams/mixtral_dev.safetensors

The reference model's routing (committed, benchmarks/results/bench_reference_cpu.routing.safetensors, with
Qwen1.5-MoE-A2.7B's sizes) always runs; real routing traces run when given (they are not in the repository:
no license). Writes benchmarks/results/simulate_host.{json,md}. Every figure is simulated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from specmoe.bench.environment import environment
from specmoe.bench.report import markdown_table
from specmoe.io import write_json, write_text
from specmoe.runtime.policies import DEFAULT_POLICY
from specmoe.sim.bounds import host_bound, memory_plan
from specmoe.sim.compute import count_ops
from specmoe.sim.engine import simulate
from specmoe.sim.hardware import HardwareProfile
from specmoe.sim.host import HostProfile
from specmoe.sim.predictions import replay_oracle
from specmoe.sim.shapes import ModelShape
from specmoe.sim.stream import load_stream

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = RESULTS / "bench_reference_cpu.routing.safetensors"
ANCHORS = [  # published figures the simulation stands beside (quoted, not re-measured here)
    {"model": "mixtral-8x7b", "tok_s": 24.0, "what": "llama.cpp, Q4 Mixtral-8x7B, 28 of 33 layers on an RTX 3090",
     "source": "figure quoted in specmoe issues #11 and #12; primary source not re-checked here"},
]


def cases(args) -> list[dict]:
    out = [{"name": "reference routing", "stream": REFERENCE, "shape": "qwen1.5-moe-a2.7b", "compression": "none",
            "capacities": (0.25, 0.5, "max"), "max_passes": None}]
    if args.deepseek:
        out.append({"name": "DeepSeek-V2-Lite real routing", "stream": args.deepseek, "shape": "deepseek-v2-lite",
                    "compression": "none", "capacities": ("max",), "max_passes": args.max_passes})
    if args.mixtral:
        for scheme in ("none", "int4-g128"):
            out.append({"name": f"Mixtral-8x7B real routing ({scheme})", "stream": args.mixtral,
                        "shape": "mixtral-8x7b", "compression": scheme, "capacities": ("max",), "max_passes": None})
    return out


def run(args) -> dict:
    gpu, host = HardwareProfile.from_name("rtx3090"), HostProfile.from_name(args.host)
    rows, bounds = [], []
    for case in cases(args):
        stream = load_stream(case["stream"])
        if case["max_passes"]:
            stream = stream.select_passes(0, min(case["max_passes"], stream.num_passes))
        shape = ModelShape.from_name(case["shape"]).compressed(case["compression"])
        ops = count_ops(shape.model_type)
        warmup = min(args.warmup, stream.num_passes // 4)
        kw = dict(ops=ops, warmup_passes=warmup)
        unwrapped = simulate(stream, shape, gpu, None, **kw)
        oracle = replay_oracle(stream, shape.num_experts, 1)
        plan = memory_plan(shape, gpu)
        variants = [("none", m) for m in ("fetch", "auto", "host")] + [("static", "host")] + \
                   [("oracle", m) for m in ("fetch", "auto", "host")]
        caps = [plan["max_slots"] if c == "max" else c for c in case["capacities"]]
        for cap in tqdm(caps, desc=case["name"], unit="capacity"):
            bound = host_bound(stream, shape, gpu, host, cap, unwrapped=unwrapped, **kw)
            bounds.append({"case": case["name"], "capacity": cap, **bound.to_dict()})
            for predictor, misses in variants:
                where = {"misses": misses, "host": host} if misses != "fetch" else {}
                extra = {}
                if predictor == "static":
                    extra = {"placement": "trace"}
                elif predictor == "oracle":
                    extra = {"candidates": oracle.candidates, "ops": ops.for_predictor(oracle.predict_ops)}
                r = simulate(stream, shape, gpu, cap, **{**kw, **where, **extra})
                rows.append({"case": case["name"], "shape": shape.name, "capacity": r.num_slots /
                             (shape.moe_layers * shape.num_experts), "max_fit": cap == plan["max_slots"],
                             "predictor": predictor, "misses_mode": misses, **r.to_dict(),
                             "unwrapped_tok_s": unwrapped.tok_s, "bound_tok_s": bound.tok_s,
                             "passes_replayed": stream.num_passes, "warmup_passes": warmup, "policy": DEFAULT_POLICY})
    return {"name": "simulate_host", "environment": environment("cpu"), "gpu": gpu.to_dict(),
            "host": host.to_dict(), "anchors": ANCHORS, "rows": rows, "bounds": bounds,
            "settings": {"max_passes": args.max_passes, "warmup": args.warmup}}


def markdown(result: dict) -> str:
    out = []
    for case in dict.fromkeys(r["case"] for r in result["rows"]):
        rows = []
        runs = [r for r in result["rows"] if r["case"] == case]
        fetch = {(r["capacity"], r["predictor"]): r["tok_s"] for r in runs if r["misses_mode"] == "fetch"}
        for r in runs:
            per_tok = max(r["tokens"], 1)
            base = fetch.get((r["capacity"], "none" if r["predictor"] == "static" else r["predictor"]))
            rows.append([f"{r['capacity']:.3f}" + (" (max fit)" if r["max_fit"] else ""),
                         "static placement" if r["predictor"] == "static" else
                         (r.get("policy", "lru") if r["predictor"] == "none" else f"oracle + {r.get('policy', 'lru')}"),
                         r["misses_mode"],
                         f"{r['tok_s']:.1f}", f"{r['tok_s'] / r['unwrapped_tok_s']:.2f}",
                         f"{r['tok_s'] / base:.2f}" if base else None,
                         f"{(r['misses'] - r['host_computed']) / per_tok:.2f} / {r['host_computed'] / per_tok:.2f}",
                         f"{(r['prefetch_issued'] - r.get('reuse_issued', 0)) / per_tok:.2f} / "
                         f"{r.get('reuse_issued', 0) / per_tok:.2f}",
                         f"{r['hits_in_flight'] / per_tok:.2f}",
                         f"{r['bytes_moved'] / per_tok / 2**20:.0f}", f"{r['bound_tok_s']:.1f}"])
        r0 = runs[0]
        out += [f"*{case}* ({r0['shape']}, {r0['passes_replayed']} passes, {r0['warmup_passes']} of them warm-up; "
                f"all-resident {r0['unwrapped_tok_s']:.1f} tok/s, simulated)", "",
                markdown_table(["capacity", "placement", "misses", "tok/s", "× all-resident", "× fetch",
                                "misses/token fetched / host", "copies ahead/token predicted / host-computed",
                                "hits in flight/token", "MiB moved/token", "host bound tok/s"], rows), ""]
    anchors = "; ".join(f"{a['what']}: {a['tok_s']:g} tok/s ({a['source']})" for a in result["anchors"])
    env = result["environment"]
    out += [f"**Simulated**: GPU `{result['gpu']['name']}`, host `{result['host']['name']}` "
            f"({result['host']['description']}). Published anchor beside it, not simulated: {anchors}. "
            "*Copies ahead*: the predictor's prefetches, and copies of experts the host just computed (misses=auto: "
            "resident at their layer's next visit, where admission finds them worth their victim and link time); *hits in flight*: routed experts "
            "whose copy had not landed (counted apart from hits on resident experts). "
            "Host bound: max(device compute, copied bytes / bandwidth, host compute) for Belady-with-bypass misses "
            f"split at best between link and host. git {env['git_sha']}, {env['date']}."]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deepseek", type=Path, help="DeepSeek-V2-Lite routing stream (.safetensors)")
    ap.add_argument("--mixtral", type=Path, help="Mixtral-8x7B routing stream (.safetensors)")
    ap.add_argument("--host", default="3090-box")
    ap.add_argument("--max-passes", type=int, default=4000, help="passes of the DeepSeek stream replayed")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    result = run(args)
    write_json(args.out / "simulate_host.json", result)
    text = markdown(result)
    write_text(args.out / "simulate_host.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shape-real GPU benchmark: a model with a published MoE's real shapes and random weights, side by side with
accelerate's offload and the unwrapped model, at a sweep of cache capacities.

The model is built on the meta device and materialised on the host (random numbers drawn on the GPU), so it
is never all on the device unless the unwrapped row asks for it. Copy and compute times are real; routing is
that of random weights (uniform-ish), so hit rates here say nothing about trained models: the oracle, which
replays the recorded routing, gives the ceiling. The goal at 50% of experts resident: >= 0.85x the unwrapped
model's decode tok/s, >= 10x accelerate's, >= 2x no predictor (on demand only).

    python benchmarks/shape_real.py --shape qwen1.5-moe-a2.7b          # on a GPU (about 6 min on an H100)
    python benchmarks/shape_real.py --shape olmoe-1b-7b
    python benchmarks/shape_real.py --shape qwen1.5-moe-a2.7b --smoke  # tiny sizes, CPU, seconds
    specmoe simulate --validate benchmarks/results/shape_real_<shape>_<gpu>.json   # the simulator vs this run

Writes benchmarks/results/shape_real_<shape>_<device>.{json,md,png} and .routing.safetensors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from specmoe.runtime.config import OffloadConfig
from specmoe.bench.compare import BenchSettings, run_benchmark
from specmoe.bench.report import write_bench_report
from specmoe.io import write_json
from specmoe.measure import measure_h2d
from specmoe.sim.compute import load_op_counts
from specmoe.sim.hardware import HardwareProfile
from specmoe.sim.shapes import PRESETS, ModelShape
from specmoe.sim.stream import RoutingStream
from specmoe.sim.synthetic import build_random_model, smoke_config

RESULTS = Path(__file__).parent / "results"
GOALS = {"vs_unwrapped": 0.85, "vs_accelerate": 10.0, "vs_lru": 2.0}


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    try:
        return HardwareProfile.for_device_name(torch.cuda.get_device_name(device)).name
    except ValueError:
        return torch.cuda.get_device_name(device).lower().replace(" ", "-")


def goals(result: dict, capacity: float = 0.5) -> dict:
    """Ratios at `capacity` for each predictor, and whether the best one meets the issue's goals."""
    v = {(x["kind"], x.get("capacity"), x.get("predictor")): x for x in result["variants"]}
    unwrapped = next((x for x in result["variants"] if x["kind"] == "unwrapped"), None)
    accel = next((x for x in result["variants"] if x["kind"] == "accelerate"), None)
    lru = v.get(("specmoe", capacity, "none"))
    rows = {}
    for (kind, cap, pred), x in v.items():
        if kind != "specmoe" or cap != capacity:
            continue
        tok = x["decode_tok_s"]
        rows[pred] = {"decode_tok_s": tok,
                      "vs_unwrapped": tok / unwrapped["decode_tok_s"] if unwrapped else None,
                      "vs_accelerate": tok / accel["decode_tok_s"] if accel else None,
                      "vs_lru": tok / lru["decode_tok_s"] if lru else None}
    best = max(rows, key=lambda p: rows[p]["decode_tok_s"]) if rows else None
    met = {k: (rows[best][k] >= goal if best and rows[best][k] is not None else None) for k, goal in GOALS.items()}
    return {"capacity": capacity, "targets": GOALS, "per_predictor": rows, "best_predictor": best, "met": met}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen1.5-moe-a2.7b", choices=sorted(PRESETS))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes of the same family (CPU, seconds)")
    ap.add_argument("--device", default=None, help="default: cuda when present")
    ap.add_argument("--capacities", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--predictors", nargs="+", default=["none", "oracle"],
                    help="none / pregate / oracle (random weights make the pre-gate meaningless for accuracy)")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--accelerate-tokens", type=int, default=6)
    ap.add_argument("--lookahead", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="untimed generate calls per variant")
    ap.add_argument("--no-accelerate", action="store_true")
    ap.add_argument("--misses", default="fetch", choices=["fetch", "host", "auto"],
                    help="where missed experts run (SpeculativeMoE's misses; the file name says it unless fetch)")
    ap.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                    help="compiled decode of the SpeculativeMoE rows (file name: _compiled), optionally with a cheap "
                    "backend (eager, aot_eager); `specmoe simulate --validate` then checks the compiled compute model")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    published = ModelShape.from_name(args.shape)
    if published.expert_dtype != "bf16":
        published = ModelShape.from_name(args.shape, expert_dtype="bf16")  # transformers runs experts in bf16
    config = smoke_config(published) if args.smoke else published.to_config()
    dt = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    shape = ModelShape.from_config(config, name=published.name + (" (smoke)" if args.smoke else ""),
                                   source=published.source, dtype=dt, expert_dtype=dt)
    print(shape.summary())

    unwrapped = True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        unwrapped = shape.total_bytes + shape.kv_bytes(args.prompt_len + args.new_tokens) < 0.9 * free
    settings = BenchSettings(capacities=tuple(args.capacities), predictors=tuple(args.predictors),
                             new_tokens=args.new_tokens, warmup=args.warmup, lookahead=args.lookahead,
                             unwrapped=unwrapped,
                             accelerate=not args.no_accelerate, accelerate_new_tokens=args.accelerate_tokens,
                             offload=OffloadConfig(misses=args.misses, compile=args.compile))
    tag = f"{published.name}_{device_tag(device)}" + ("_smoke" if args.smoke else "") + \
        (f"_misses-{args.misses}" if args.misses != "fetch" else "") + ("_compiled" if args.compile else "")
    json_path = args.out / f"shape_real_{tag}.json"
    extras = {"benchmark": "shape_real", "shape": shape.to_dict(), "scaled_down": args.smoke,
              "op_counts": load_op_counts(shape.model_type).to_dict(),
              "copy_microbenchmark": measure_h2d(shape.slot_bytes, device)}

    stream_path = json_path.with_name(json_path.stem + ".routing.safetensors")

    def save(partial):
        """Everything so far, after every variant: a run cut short still leaves a usable result."""
        partial["settings"].update(prompts=args.prompts, prompt_len=args.prompt_len, dtype=str(dtype))
        if partial.get("routing") is not None and "routing_file" not in partial:
            calls = [{"prompt": i, "new_tokens": n, "timed": timed, "passes": len(r)}
                     for (i, n, timed), r in zip(partial["schedule"], partial["routing"])]
            RoutingStream.from_passes([ids for call in partial["routing"] for ids in call], calls=calls,
                                      num_experts=shape.num_experts).save(stream_path)
            partial["routing_file"] = stream_path.name
        write_json(json_path, {**{k: v for k, v in partial.items() if k != "routing"}, **extras,
                               "goals": goals(partial)})
        if any(v["kind"] == "specmoe" for v in partial["variants"]):
            write_bench_report(json_path)

    def random_model():
        model = build_random_model(config, dtype=dtype, device="cpu", experts_device="cpu", seed=0)
        model.generation_config.eos_token_id = None  # every prompt runs its full length
        model.generation_config.pad_token_id = 0
        return model

    model = random_model()
    g = torch.Generator().manual_seed(1)
    prompts = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}
               for ids in (torch.randint(3, config.vocab_size, (1, args.prompt_len), generator=g)
                           for _ in range(args.prompts))]
    result = run_benchmark(
        model, prompts, settings, device, model_name=f"{shape.name}, random weights",
        make_offload_copy=random_model,
        on_variant=save)
    save(result)
    md, png = write_bench_report(json_path)
    print(md.read_text())
    print(f"wrote {json_path}, {md}, {png}, {stream_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

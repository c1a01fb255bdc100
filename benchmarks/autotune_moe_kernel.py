"""Tune the fused experts kernel's launch configs on this GPU and record where it beats transformers' experts.

For each expert geometry and token bucket it times every candidate launch config, keeps the fastest, times
transformers' grouped_mm (the runtime's default on CUDA), batched_mm and eager on the same slot pool, and
writes specmoe/kernels/configs/<device>.json (merged with what the file already holds). The runtime's
compute="auto" runs the kernel exactly where an entry says "faster": true.

    python benchmarks/autotune_moe_kernel.py                          # all presets, quick search space
    python benchmarks/autotune_moe_kernel.py --space full --presets mixtral-8x7b --max-minutes 8
    python benchmarks/autotune_moe_kernel.py --smoke --out-dir /tmp/cfg   # CPU, interpreted: tests the script

"faster" means the best config's median beats grouped_mm's median by more than --margin (default 3%).
Times: medians of CUDA-event timings with the L2 flushed before each run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def candidates(tokens: int, space: str) -> list[dict]:
    """Launch configs worth trying at this many tokens (as dicts for MoEKernelConfig)."""
    if space == "smoke":
        return [dict(block_t=1, block_k=32, block_i=16, block_h=32), dict(block_t=16, block_k=32, block_i=16,
                                                                          block_h=32)]
    full = space == "full"
    out = []
    if tokens <= 16:  # one pair per program: decode
        grid = itertools.product([64, 128, 256] if full else [128, 256], [16, 32, 64], [64, 128] if full else [128],
                                 [4, 8], [1, 2, 3] if full else [2])
        out += [dict(block_t=1, block_k=k, block_i=i, block_h=h, num_warps=w, num_stages=s)
                for k, i, h, w, s in grid]
    if tokens >= 2:  # sorted blocks with tensor-core dots
        bts = [bt for bt in ([16, 32, 64, 128] if full else [16, 64]) if bt <= max(16, tokens)]
        grid = itertools.product(bts, [32, 64, 128] if full else [64], [64, 128], [64, 128], [4, 8],
                                 [2, 3, 4] if full else [3])
        out += [dict(block_t=t, block_k=k, block_i=i, block_h=h, num_warps=w, num_stages=s)
                for t, k, i, h, w, s in grid]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None, help="expert geometries (default: all but 'tiny')")
    p.add_argument("--tokens", nargs="+", type=int, default=TOKENS, help="token buckets to tune")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--space", default="quick", choices=["quick", "full"])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--margin", type=float, default=0.03)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and write what is done) after this")
    p.add_argument("--out-dir", type=Path, default=None, help="default: specmoe/kernels/configs")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, interpreted kernel: tests the script")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch
    from tqdm import tqdm

    from specmoe.bench.kernel_problem import PRESETS, ExpertsProblem, max_abs_diff
    from specmoe.io import read_json, write_json
    from specmoe.kernels import MoEKernelConfig, shape_key
    from specmoe.kernels.launch_config import CONFIG_DIR, FORMAT, device_slug, read_device_file
    from specmoe.measure import environment, time_fn

    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: autotuning needs the GPU it tunes for (use --smoke to test the script)")
    dtype = getattr(torch, args.dtype)
    presets = ["tiny"] if args.smoke else (args.presets or [n for n in PRESETS if n != "tiny"])
    tokens = [1, 33] if args.smoke else sorted(args.tokens)
    space = "smoke" if args.smoke else args.space
    repeats = 2 if args.smoke else args.repeats
    env = environment(device)
    name = env["device_name"] if device.type == "cuda" else "cpu"
    out_dir = args.out_dir or CONFIG_DIR
    path = out_dir / f"{device_slug(name)}.json"
    shapes = read_json(path, "tuned launch configs")["shapes"] if path.is_file() else {}
    if path.is_file():
        read_device_file(path)  # refuse to merge into a file that does not read back
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    settings = {"dtype": args.dtype, "slots": args.slots, "space": space, "repeats": repeats, "margin": args.margin,
                "compared_with": "grouped_mm (the runtime's pool path on CUDA)"}

    stopped = False
    for preset in presets:
        shape = PRESETS[preset]
        key = shape_key(dtype, shape.hidden, shape.intermediate, shape.top_k)
        for T in tqdm(tokens, desc=preset):
            if deadline is not None and time.monotonic() > deadline:
                stopped = True
                break
            problem = ExpertsProblem(shape, T, args.slots, dtype, device)
            reference = problem.runner("grouped_mm")()
            best = None
            for cand in candidates(T, space):
                config = MoEKernelConfig(**cand)
                fn = problem.runner("triton", config)
                try:
                    err = max_abs_diff(fn(), reference)
                except Exception as exc:  # e.g. triton OutOfResources (shared memory) for big tiles
                    tqdm.write(f"{preset} T={T} {cand}: skipped ({type(exc).__name__})")
                    continue
                t = time_fn(fn, device, warmup=1 if args.smoke else 3, repeats=repeats)["median_us"]
                if best is None or t < best[0]:
                    best = (t, config, err)
            if best is None:
                tqdm.write(f"{preset} T={T}: no config ran")
                continue
            others = {impl: time_fn(problem.runner(impl), device, warmup=1 if args.smoke else 3,
                                    repeats=repeats)["median_us"] for impl in ("grouped_mm", "batched_mm", "eager")}
            t, config, err = best
            shapes.setdefault(key, {})[str(T)] = {
                "config": config.to_dict(),
                "faster": bool(t < others["grouped_mm"] * (1 - args.margin)),
                "kernel_us": t, **{f"{impl}_us": v for impl, v in others.items()},
                "max_abs_diff_vs_grouped_mm": err, "preset": preset,
            }
            del problem
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if stopped:
            break
    write_json(path, {"format": FORMAT, "device_name": name, "environment": env, "settings": settings,
                      "shapes": shapes})
    read_device_file(path)  # what was written reads back
    print(f"wrote {path}" + (" (stopped at --max-minutes)" if stopped else ""))
    for key, table in shapes.items():
        wins = [b for b, e in sorted(table.items(), key=lambda kv: int(kv[0])) if e["faster"]]
        print(f"  {key}: kernel faster at token buckets {wins or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fused experts kernel vs transformers' experts implementations (grouped_mm, batched_mm, eager), on
decode (1-8 tokens) and prefill shapes of public MoE models, all reading one layer's experts from a slot pool;
and the kernel on compressed slots (--compression: int8, int4-g128, ... dequantized in registers) against the
same bf16 baselines.

    python benchmarks/moe_kernel.py                        # on a GPU: JSON + markdown + PNG in benchmarks/results
    python benchmarks/moe_kernel.py --report results.json  # regenerate the markdown and PNG from a JSON
    python benchmarks/moe_kernel.py --smoke                # tiny shapes on CPU (interpreted; tests the script only)

The kernel uses the launch configs of this GPU (specmoe/kernels/configs, from autotune_moe_kernel.py) where
present, untuned defaults elsewhere; the JSON records which. Times: medians over --repeats CUDA-event timings,
L2 flushed before each run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None, help="expert geometries (default: all but 'tiny')")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help="tokens per layer call (default: 1 2 4 8 32 128 512 2048; --smoke: 1 3 33)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--slots", type=int, default=64, help="slot pool size S (the runtime's cache)")
    p.add_argument("--implementations", nargs="+", default=None, help="default: triton grouped_mm batched_mm eager")
    p.add_argument("--compression", nargs="*", default=["int8", "int4-g128"], metavar="SCHEME",
                   help="also run the kernel on compressed slots of these schemes (rows 'triton-<scheme>')")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: results/moe_kernel_<device>.json)")
    p.add_argument("--report", type=Path, default=None, help="only write markdown + PNG from this JSON")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, interpreted kernel, few repeats")
    return p.parse_args(argv)


def run(args) -> dict:
    import torch
    from tqdm import tqdm

    from specmoe.bench.kernel_problem import IMPLEMENTATIONS, PRESETS, ExpertsProblem, max_abs_diff
    from specmoe.kernels import launch_configs, shape_key
    from specmoe.bench.kernel_problem import COMPRESSED_PREFIX, compression_of
    from specmoe.measure import environment, time_fn

    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU (use --smoke to test the script on CPU)")
    dtype = getattr(torch, args.dtype)
    presets = args.presets or ([] if args.smoke else [n for n in PRESETS if n != "tiny"])
    compression = args.compression
    if args.smoke:
        presets, tokens, repeats = ["tiny"], args.tokens or [1, 3, 33], 2
        impls = args.implementations or ["triton", "grouped_mm", "eager"]
        compression = compression[-1:]  # one compressed scheme: the script, not figures
    else:
        tokens = args.tokens or [1, 2, 4, 8, 32, 128, 512, 2048]
        repeats, impls = args.repeats, args.implementations or list(IMPLEMENTATIONS)
    impls = list(impls) + [COMPRESSED_PREFIX + c for c in compression]
    unknown = [n for n in presets if n not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
    table = launch_configs(device)
    rows = []
    for name in presets:
        shape = PRESETS[name]
        for T in tqdm(tokens, desc=name):
            problem = ExpertsProblem(shape, T, args.slots, dtype, device)
            key = shape_key(dtype, shape.hidden, shape.intermediate, shape.top_k)
            reference = problem.runner("grouped_mm")()
            for impl in impls:
                fn = problem.runner(impl)
                out = fn()
                err = max_abs_diff(out, reference)
                timing = time_fn(fn, device, warmup=1 if args.smoke else 5, repeats=repeats)
                row = {"preset": name, "tokens": T, "implementation": impl, **timing,
                       "weight_bytes": problem.bytes_touched(impl),
                       "weight_gb_per_s": problem.bytes_touched(impl) / timing["median_us"] / 1e3,
                       "max_abs_diff_vs_grouped_mm": err}  # compressed rows: includes the quantization error
                if compression_of(impl) is not None:  # the kernel's own error: against its reference
                    row["max_abs_diff_vs_reference"] = max_abs_diff(out, problem.reference(impl))
                if impl.startswith("triton"):
                    row["config"] = table.config_for(key, T).to_dict()
                    row["config_tuned"] = table.kernel_faster(key, T) is not None
                rows.append(row)
            del problem
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {
        "benchmark": "moe_kernel",
        "environment": environment(device),
        "settings": {"presets": {n: vars(PRESETS[n]) for n in presets}, "tokens": tokens, "dtype": args.dtype,
                     "slots": args.slots, "repeats": repeats, "implementations": impls, "smoke": args.smoke,
                     "compression": compression,
                     "launch_configs": table.source or "untuned defaults (specmoe/kernels/configs/default.json)"},
        "rows": rows,
    }


def report(result: dict, md_path: Path, png_path: Path) -> None:
    """Markdown table and PNG (kernel speedup over grouped_mm vs tokens), from the JSON only."""
    from specmoe.measure.results import pyplot

    plt = pyplot()

    env, settings = result["environment"], result["settings"]
    by = {}
    for r in result["rows"]:
        by.setdefault(r["preset"], {}).setdefault(r["tokens"], {})[r["implementation"]] = r
    impls = settings["implementations"]
    kernels = [i for i in impls if i.startswith("triton")]
    lines = [f"# Fused experts kernel vs transformers' experts ({settings['dtype']}; 'triton-<scheme>': the kernel "
             "on compressed slots)", "",
             f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, transformers "
             f"{env['transformers']}, git {env['git_sha']}. One MoE layer's routed experts read from a pool of "
             f"{settings['slots']} slots; median of {settings['repeats']} runs in microseconds, L2 flushed. "
             f"Launch configs: {settings['launch_configs']}.", ""]
    for preset, per_t in by.items():
        p = settings["presets"][preset]
        lines += [f"## {preset} (H={p['hidden']}, I={p['intermediate']}, E={p['num_experts']}, k={p['top_k']})", "",
                  "| tokens | " + " | ".join(f"{i} (us)" for i in impls) + " | "
                  + " | ".join(f"{i} vs grouped_mm" for i in kernels) + " | kernel GB/s | tuned |",
                  "|" + "---|" * (len(impls) + len(kernels) + 3)]
        for T, cells in sorted(per_t.items()):
            tri, gmm = cells.get("triton"), cells.get("grouped_mm")
            speeds = " | ".join(f"{gmm['median_us'] / cells[i]['median_us']:.2f}x" if i in cells and gmm else "-"
                                for i in kernels)
            gbs = " / ".join(f"{cells[i]['weight_gb_per_s']:.0f}" for i in kernels if i in cells) or "-"
            tuned = ("yes" if tri["config_tuned"] else "no") if tri else "-"
            vals = " | ".join(f"{cells[i]['median_us']:.1f}" if i in cells else "-" for i in impls)
            lines.append(f"| {T} | {vals} | {speeds} | {gbs} | {tuned} |")
        lines.append("")
    md_path.write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for preset, per_t in by.items():
        for kernel in kernels:
            ts = sorted(t for t, c in per_t.items() if kernel in c and "grouped_mm" in c)
            ax.plot(ts, [per_t[t]["grouped_mm"]["median_us"] / per_t[t][kernel]["median_us"] for t in ts], "o-",
                    label=f"{preset} {kernel}")
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the layer call")
    ax.set_ylabel("speedup over bf16 grouped_mm")
    ax.set_title(f"{env['device_name']}, {settings['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from specmoe.io import read_json, write_json
    from specmoe.kernels.launch_config import device_slug

    if args.report is not None:
        result, out = read_json(args.report, "benchmark result"), args.report
    else:
        result = run(args)
        slug = "smoke" if args.smoke else device_slug(result["environment"]["device_name"])
        out = args.out or RESULTS / f"moe_kernel_{slug}.json"
        write_json(out, result)
        print(f"wrote {out}")
    report(result, out.with_suffix(".md"), out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The host experts kernel (`specmoe.kernels.host`) at real expert shapes against this machine's read bandwidth,
measured in the same run, and beside llama.cpp's CPU kernels (ggml) at the same shapes and bit widths.

    python benchmarks/host_kernels.py --ggml /path/to/ggml            # ggml checkout with its build in build/
    python benchmarks/host_kernels.py --shapes 4096x14336 --threads 1 --tokens 1 4   # other cases
    python benchmarks/host_kernels.py --calibrate   # per-thread rates of each build -> specmoe/sim/calibration
    python benchmarks/host_kernels.py --calibrate --kernel-formats mxfp4 fp8 gptq   # only these, beside int4/int8

One case = one expert (gate/up [2I, H], activation, down [H, I]) for T tokens, in a format the store holds
(bf16, int8, int4-g32, int4-g128, and the publishers' mxfp4, fp8-b128, gptq-int4-g128 as their checkpoints
hold them, and mxfp4-int8act: MXFP4 with the opt-in int8 activations, `host_activations="int8"`; a shape a format cannot hold, e.g. GPTQ g128 at gpt-oss's 2880, is skipped), on N threads. Each case rotates over enough copies of the expert that they
exceed the last-level cache 8x (every call reads its weights from RAM), and reports the median over repeats
(the machine is shared; the load average is recorded). Read bandwidth: a vectorised sum (the kernel library's
`read_sum`) reading the same copies in the same turn on the same threads, right before each case; fraction =
the kernel's GB/s over it. ggml: a small C driver (in this file, compiled against the given build) times the same expert as
llama.cpp computes it (ggml_mul_mat gate, up, silu, mul, ggml_mul_mat down) in BF16, Q8_0, Q4_0, Q4_1 (Q4_1:
a scale and a minimum per 32 weights, the int4-g32 layout) and MXFP4 (gpt-oss's format: the same e2m1 codes and
e8m0 scale per 32), with a persistent ggml threadpool, one process per expert and type (quantized once, every case timed on it);
its commit is recorded. The peers: MXFP4 - ggml MXFP4,
FP8 - Q8_0 (ggml has no FP8), GPTQ int4 - Q4_0. Writes benchmarks/results/host_kernels.{json,md,png}.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling ggml_peer.py
from ggml_peer import GGML_TYPES, Ggml, ggml_bytes  # noqa: E402

from specmoe.bench.environment import environment
from specmoe.io import write_json, write_text
from specmoe.kernels.host import HostExpertsKernel, kernel_group, matrix, prequant_matrix
from specmoe.kernels.prequant import PrequantFormat
from specmoe.kernels.quant import QuantFormat, quantize
from specmoe.sim.host import copies_beyond_cache, last_level_cache

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "host_kernels"
SHAPES = {"mixtral-8x7b": (4096, 14336), "deepseek-v2-lite": (2048, 1408), "qwen3-30b-a3b": (2048, 768),
          "gpt-oss": (2880, 2880)}
FORMATS = ("bf16", "int8", "int4-g32", "int4-g128", "mxfp4", "mxfp4-int8act", "fp8-b128", "gptq-int4-g128")
PUBLISHED = {"mxfp4": "mxfp4", "fp8-b128": "fp8", "gptq-int4-g128": "gptq"}  # format -> kernel format
INT8_ACT = {"mxfp4-int8act": "mxfp4"}  # the opt-in int8 activations (host_activations="int8") on these bytes
BITS = {"bf16": 16, "int8": 8, "int4-g32": 4, "int4-g128": 4, "mxfp4": 4, "mxfp4-int8act": 4, "fp8-b128": 8,
        "gptq-int4-g128": 4, "q8_0": 8, "q4_0": 4, "q4_1": 4}
PEER = {"bf16": "bf16", "int8": "q8_0", "int4-g32": "q4_1", "int4-g128": "q4_0",  # the goal's comparison
        "mxfp4": "mxfp4", "mxfp4-int8act": "mxfp4", "fp8-b128": "q8_0", "gptq-int4-g128": "q4_0"}
GOALS = {"fraction": 0.6, "vs_ggml": 0.9, "two_threads": 1.6}

def published_parts(fmt: PrequantFormat, n: int, k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One W [N, K] in a publisher's format with random codes (what the kernel reads, at no quantizing cost:
    the timing does not depend on the values): finite, normal-range scales; FP8 codes without NaN; GPTQ with a
    sorted g_idx (desc_act false, as the published Qwen GPTQ builds)."""
    parts = {}
    for sfx, (shape, dtype) in fmt.parts(n, k).items():
        if sfx == "_scales":
            t = torch.randint(118, 123, shape, generator=g, dtype=torch.uint8)  # 2^-9 .. 2^-5
        elif sfx == "":  # normal e4m3 codes, |x| < 1 (exponent field 1-6), both signs
            t = (torch.randint(8, 56, shape, generator=g, dtype=torch.uint8) |
                 (torch.randint(0, 2, shape, generator=g, dtype=torch.uint8) << 7)).view(torch.float8_e4m3fn)
        elif sfx == "_scale_inv":
            t = torch.rand(shape, generator=g) * 0.01 + 0.001
        elif sfx == ".scales":
            t = (torch.rand(shape, generator=g) * 0.002 + 0.001).half()
        elif sfx == ".g_idx":
            t = torch.arange(k, dtype=torch.int32) // fmt.block
        else:  # _blocks, .qweight, .qzeros: random codes
            t = torch.randint(0, 256, (math.prod(shape) * torch.tensor([], dtype=dtype).element_size(),),
                              generator=g, dtype=torch.uint8).view(dtype).reshape(shape)
        parts[sfx] = t
    return parts


@functools.lru_cache(maxsize=1)
def _bf16_expert(hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One random bf16 expert (gate_up [2I, H], down [H, I]), made once per shape for every format built from it."""
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.rand(2 * inter, hidden, generator=g) * 0.04 - 0.02).to(torch.bfloat16)
    down = (torch.rand(hidden, inter, generator=g) * 0.04 - 0.02).to(torch.bfloat16)
    return gate_up, down


def expert_copies(fmt: str, hidden: int, inter: int, copies: int | None = None):
    """`copies` identical experts in `fmt` (distinct buffers; None: enough to exceed the last-level cache 8x,
    `copies_beyond_cache`), the expert built once: ([(gate_up Mat, down Mat)], bytes, keep)."""
    fmt = INT8_ACT.get(fmt, fmt)  # the same bytes
    g = torch.Generator().manual_seed(0)
    shapes = [(2 * inter, hidden), (hidden, inter)]
    if fmt in PUBLISHED:
        pre = PrequantFormat.parse(fmt)
        parts = [published_parts(pre, n, k, g) for n, k in shapes]
        nbytes = sum(v.numel() * v.element_size() for p in parts for v in p.values())
        copies = copies or copies_beyond_cache(nbytes)
        mats, keep = [], []
        for _ in range(copies):
            own = [{k: v.clone() for k, v in p.items()} for p in parts]
            keep.append(own)
            mats.append(tuple(prequant_matrix(own[i], shapes[i], pre) for i in range(2)))
        return mats, nbytes, keep
    gate_up, down = _bf16_expert(hidden, inter)
    q = None if fmt == "bf16" else QuantFormat.parse(fmt)
    parts = [gate_up, down] if q is None else [quantize(gate_up, q), quantize(down, q)]
    del gate_up, down
    nbytes = sum(p.numel() * p.element_size() for p in parts) if q is None else \
        sum(v.numel() * v.element_size() for p in parts for v in p.values())
    copies = copies or copies_beyond_cache(nbytes)
    mats, keep = [], []
    for _ in range(copies):
        own = [p.clone() for p in parts] if q is None else [{k: v.clone() for k, v in p.items()} for p in parts]
        keep.append(own)
        mats.append(tuple(matrix(own[i], shapes[i], q) for i in range(2)))
    return mats, nbytes, keep


def time_calls(kernel, kind: str, group: int, mats, hidden: int, inter: int, tokens: int, repeats: int,
               activations: str = "fp32") -> list[float]:
    """Seconds of `repeats` calls for `tokens` tokens, each on the next copy (after one warm-up call per copy)."""
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1))
    ids, w = torch.zeros(tokens, 1, dtype=torch.long), torch.ones(tokens, 1)
    out = torch.zeros(tokens, hidden)
    for m in mats:
        kernel(kind, "silu", x, ids, w, [0], [m], inter, group, out=out, activations=activations)
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        kernel(kind, "silu", x, ids, w, [0], [mats[r % len(mats)]], inter, group, out=out, activations=activations)
        times.append(time.perf_counter() - start)
    return times


def copies_bandwidth(kernel, threads: int, keep, repeats: int = 7) -> tuple[float, float]:
    """(median, best) bytes/s of the vectorised sum reading the expert copies themselves, one copy per call in
    turn, on `threads` threads: this machine's read bandwidth for exactly the bytes the kernel reads."""
    views = []
    for own in keep:  # one copy: each of its tensors as float32 words
        tensors = [t for p in own for t in (p.values() if isinstance(p, dict) else [p])]
        words = [t.reshape(-1).view(torch.uint8) for t in tensors]
        views.append([w[: w.numel() // 4 * 4].view(torch.float32) for w in words])
    nbytes = sum(v.numel() * 4 for v in views[0])

    def one(i):
        for v in views[i % len(views)]:
            kernel.read_sum(v, threads)

    for i in range(len(views)):
        one(i)
    times = []
    for r in range(max(repeats, len(views))):
        start = time.perf_counter()
        one(r)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times), nbytes / min(times)


def repeats_for(seconds: float, budget_s: float) -> int:
    return int(min(40, max(7, math.ceil(budget_s / max(seconds, 1e-6)))))


def holds(fmt: str, hidden: int, inter: int) -> bool:
    """Whether `fmt` can hold an expert of (H, I) (GPTQ g128 needs H and I multiples of 128, MXFP4 of 32)."""
    fmt = INT8_ACT.get(fmt, fmt)
    if fmt not in PUBLISHED:
        return True
    try:
        pre = PrequantFormat.parse(fmt)
        pre.parts(2 * inter, hidden), pre.parts(hidden, inter)
    except ValueError:
        return False
    return True


def kernel_args(fmt: str) -> tuple[str, int, str]:
    """(kernel format, group, activations) of a benchmark format."""
    if fmt in INT8_ACT:
        return *kernel_args(INT8_ACT[fmt])[:2], "int8"
    if fmt in PUBLISHED:
        return PUBLISHED[fmt], kernel_group(PrequantFormat.parse(fmt)), "fp32"
    if fmt == "bf16":
        return "bf16", 64, "fp32"
    q = QuantFormat.parse(fmt)
    return q.scheme, q.group_size, "fp32"


def run(args) -> dict:
    load_before = os.getloadavg()
    shapes = [(f"{h}x{i}", (h, i)) for h, i in args.shapes] if args.shapes else \
        [(name, hi) for name, hi in SHAPES.items()]
    kernels = {t: HostExpertsKernel(t) for t in args.threads}
    ggml = Ggml(args.ggml) if args.ggml else None
    llc = last_level_cache()
    rows, probes = [], {}
    plan = [(name, hi, fmt) for name, hi in shapes for fmt in args.formats if holds(fmt, *hi)]
    skipped = [{"shape": name, "format": fmt} for name, hi in shapes for fmt in args.formats if not holds(fmt, *hi)]
    bar = tqdm(total=len(plan) + (len(shapes) * len(GGML_TYPES) if ggml else 0), desc="host kernels", unit="case")
    for name, (hidden, inter) in shapes:
        for fmt in args.formats:
            if not holds(fmt, hidden, inter):
                continue
            mats, nbytes, keep = expert_copies(fmt, hidden, inter)
            copies = len(mats)
            kind, group, acts = kernel_args(fmt)
            for t in args.threads:
                for tokens in args.tokens:
                    bw = probes[(name, fmt, t)] = copies_bandwidth(kernels[t], t, keep)  # right before the case
                    first = time_calls(kernels[t], kind, group, mats, hidden, inter, tokens, 1, acts)
                    times = time_calls(kernels[t], kind, group, mats, hidden, inter, tokens,
                                       repeats_for(min(first), args.budget), acts)
                    rows.append(_row(kernels[t].name, name, hidden, inter, fmt, t, tokens, nbytes, times, bw,
                                     copies))
            del mats, keep
            bar.update()
        if ggml is None:
            continue
        for gtype in GGML_TYPES:  # one process per type: the expert quantized once, every case timed on it
            copies = copies_beyond_cache(ggml_bytes(gtype, hidden, inter))
            cases, bws = [], []
            for t in args.threads:
                for tokens in args.tokens:
                    peer = next((f for f, g in PEER.items() if g == gtype and (name, f, t) in probes), None)
                    bws.append(probes.get((name, peer, t)) or next(v for (n, _, th), v in probes.items()
                                                                   if n == name and th == t))
                    ours = next((r["seconds"] for r in rows if (r["shape"], r["format"], r["threads"], r["tokens"])
                                 == (name, peer, t, tokens)), None)  # how many calls fill the budget, about
                    cases.append((tokens, t, repeats_for(ours, args.budget) if ours else 7))
            for (tokens, t, _), bw, res in zip(cases, bws, ggml.time_cases(gtype, hidden, inter, copies, cases)):
                rows.append(_row(f"ggml-{ggml.commit[:10]}", name, hidden, inter, gtype, t, tokens, res["bytes"],
                                 [res["median_s"]], bw, copies, spread=(res["min_s"], res["max_s"])))
            bar.update()
    bar.close()
    result = {
        "name": NAME, "environment": environment("cpu"), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "ggml_commit": ggml.commit if ggml else None,
        "ggml_path": str(args.ggml) if ggml else None, "llc_bytes": llc,
        "isa": next(iter(kernels.values())).isa, "settings": {"shapes": [s for s, _ in shapes],
                                                              "formats": list(args.formats),
                                                              "threads": args.threads, "tokens": args.tokens,
                                                              "budget_s": args.budget},
        "skipped": skipped, "rows": rows,
    }
    result["goals"] = goals(rows)
    return result


def _row(kernel, shape, hidden, inter, fmt, threads, tokens, nbytes, times, bandwidth, copies, spread=None):
    seconds = statistics.median(times)
    lo, hi = spread if spread else (min(times), max(times))
    return {"kernel": kernel, "shape": shape, "hidden": hidden, "inter": inter, "format": fmt, "bits": BITS[fmt],
            "threads": threads, "tokens": tokens, "seconds": seconds, "min_s": lo, "max_s": hi,
            "repeats": len(times) if spread is None else None, "copies": copies, "bytes": nbytes,
            "gbps": nbytes / seconds / 1e9, "bandwidth_gbps": bandwidth[0] / 1e9, "fraction": nbytes / seconds / bandwidth[0],
            "best_gbps": nbytes / lo / 1e9, "best_bandwidth_gbps": bandwidth[1] / 1e9,
            "best_fraction": nbytes / lo / bandwidth[1], "gweights_per_s": 3 * hidden * inter / seconds / 1e9}


def goals(rows: list[dict]) -> list[dict]:
    """The issue's goals at T = 1, one entry per (shape, format[, threads])."""
    ours = {(r["shape"], r["format"], r["threads"], r["tokens"]): r for r in rows if not r["kernel"].startswith("ggml")}
    peer = {(r["shape"], r["format"], r["threads"], r["tokens"]): r for r in rows if r["kernel"].startswith("ggml")}
    out = []
    for (shape, fmt, threads, tokens), r in ours.items():
        if tokens != 1:
            continue
        if threads == 1:
            out.append({"goal": f"fraction >= {GOALS['fraction']}", "shape": shape, "format": fmt, "threads": 1,
                        "value": r["fraction"], "met": r["fraction"] >= GOALS["fraction"]})
        p = peer.get((shape, PEER[fmt], threads, 1))
        if p is not None:
            ratio = p["seconds"] / r["seconds"]
            out.append({"goal": f"speed >= {GOALS['vs_ggml']}x ggml {PEER[fmt]}", "shape": shape, "format": fmt,
                        "threads": threads, "value": ratio, "met": ratio >= GOALS["vs_ggml"]})
        two = ours.get((shape, fmt, 2, 1))
        if threads == 1 and two is not None:
            ratio = r["seconds"] / two["seconds"]
            out.append({"goal": f"2 threads >= {GOALS['two_threads']}x 1 thread", "shape": shape, "format": fmt,
                        "threads": 2, "value": ratio, "met": ratio >= GOALS["two_threads"],
                        "bandwidth_ratio": two["bandwidth_gbps"] / r["bandwidth_gbps"]})
    return out


def markdown(result: dict) -> str:
    rows = result["rows"]
    env = result["environment"]
    peer = {(r["shape"], r["format"], r["threads"], r["tokens"]): r for r in rows if r["kernel"].startswith("ggml")}
    lines = ["| expert (H x I) | format | threads | T | specmoe ms | GB/s | of read bw (best/best) | ggml type | "
             "ggml ms | GB/s | of read bw (best/best) | specmoe / ggml speed |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["kernel"].startswith("ggml"):
            continue
        p = peer.get((r["shape"], PEER[r["format"]], r["threads"], r["tokens"]))
        cells = (f"{PEER[r['format']]} | {p['seconds'] * 1e3:.2f} | {p['gbps']:.1f} | {p['fraction']:.2f} "
                 f"({p['best_fraction']:.2f}) | "
                 f"{p['seconds'] / r['seconds']:.2f}x") if p else "— | — | — | — | —"
        lines.append(f"| {r['shape']} ({r['hidden']} x {r['inter']}) | {r['format']} | {r['threads']} | {r['tokens']} | "
                     f"{r['seconds'] * 1e3:.2f} | {r['gbps']:.1f} | {r['fraction']:.2f} ({r['best_fraction']:.2f}) | "
                     f"{cells} |")
    others = [r for r in rows if r["kernel"].startswith("ggml") and r["format"] not in PEER.values()]
    if others:
        lines += ["", "ggml types without a specmoe format of the same layout (Q4_0: symmetric int4, a scale per 32):",
                  "", "| expert | ggml type | threads | T | ms | GB/s | of read bw |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['shape']} | {r['format']} | {r['threads']} | {r['tokens']} | {r['seconds'] * 1e3:.2f} | "
                  f"{r['gbps']:.1f} | {r['fraction']:.2f} |" for r in others]
    met = [g for g in result["goals"] if g["met"]]
    lines += [
        "",
        f"Measured on {env['device_name']}, specmoe build `{result['isa']}` (torch {env['torch']}, git "
        f"{env['git_sha']}, {env['date']}); ggml {result['ggml_commit']} (llama.cpp's CPU kernels, native build). "
        f"Median over repeats, each call on one of enough copies of the expert to exceed the "
        f"{result['llc_bytes'] / 2**20:.0f} MiB last-level cache 8x; read bandwidth = a vectorised sum reading the "
        f"same copies in the same turn on the same threads, right before each case (ggml rows: the probe of the "
        f"specmoe format it is compared with); 'of read bw' = median GB/s over the median bandwidth, (best/best) = "
        f"fastest call over the fastest sum, the least disturbed pair on a shared machine. "
        f"The machine is shared with other jobs (load average {result['load_average_before'][0]:.1f} before, "
        f"{result['load_average_after'][0]:.1f} after). int4-g32 is compared with Q4_1 (a scale and a minimum per "
        f"32 weights, the same layout); int4-g128 with Q4_0 (the nearest 4-bit type); the publishers' formats, read "
        f"in their own bytes: mxfp4 with ggml's MXFP4 (the same e2m1 codes and e8m0 scale per 32), fp8-b128 with "
        f"Q8_0 (ggml has no FP8), gptq-int4-g128 with Q4_0. ggml quantizes the "
        f"activations to 8 bits (Q8_0/Q8_1) for its Q8/Q4 and MXFP4 dot products; specmoe keeps them in float32, "
        f"so its outputs equal the dequantized expert's to float rounding, except in the mxfp4-int8act rows: the "
        f"same MXFP4 bytes with the opt-in int8 activations (host_activations='int8', one scale per 32 columns, "
        f"as ggml's MXFP4 x Q8_0), which change the numerics.",
        f"Goals at T = 1 met: {len(met)} of {len(result['goals'])}.",
        "",
        "| goal | expert | format | threads | value | met |", "|---|---|---|---:|---:|---|",
    ]
    lines += [f"| {g['goal']} | {g['shape']} | {g['format']} | {g['threads']} | {g['value']:.2f} | "
              f"{'yes' if g['met'] else 'no'} |" for g in result["goals"]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from specmoe.measure.results import pyplot

    plt = pyplot()

    rows = [r for r in result["rows"] if r["tokens"] == 1]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4), squeeze=False)
    series = [(f, False) for f in result["settings"]["formats"]] + [(g, True) for g in GGML_TYPES]
    for ax, t in zip(axes[0], threads):
        width = 0.8 / len(series)
        for j, (fmt, is_ggml) in enumerate(series):
            vals = []
            for s in shapes:
                r = next((r for r in rows if r["shape"] == s and r["format"] == fmt and r["threads"] == t
                          and r["kernel"].startswith("ggml") == is_ggml), None)
                vals.append(r["fraction"] if r else 0)
            ax.bar([i + j * width for i in range(len(shapes))], vals, width,
                   label=("ggml " if is_ggml else "specmoe ") + fmt, hatch="//" if is_ggml else None)
        ax.axhline(GOALS["fraction"], color="k", lw=0.8, ls="--")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, fontsize=8)
        ax.set_ylabel("fraction of measured read bandwidth")
        ax.set_title(f"one expert, T = 1, {t} thread{'s' if t > 1 else ''}")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def calibrate(out: Path, repeats: int = 3, formats: list[str] | None = None) -> dict:
    """Per-thread rates of each build this CPU runs (AVX2 and the native one), as the simulator's desktop
    presets use them: `sim.host.measure_kernel` (the runtime's HostExperts path, one thread, a DeepSeek-V2-Lite
    expert read from RAM, 1 and 8 tokens), the median of `repeats` runs of it per format.

    `formats` (publishers' formats, e.g. ["mxfp4"]): measure only those, each in turn with the kernel it stands
    beside (`sim.host.STAND_IN`: int4 for MXFP4 / GPTQ, int8 for FP8) in the same run, and store the file's rate
    of that kernel times the ratio measured (a shared machine's load cancels in the ratio); the rest of the file
    is kept as it is. A format with an int8-activation kernel (`sim.host.INT8_ACT`: MXFP4) has it measured in
    the same turns too ("mxfp4-int8act", labelled: host_activations="int8", which changes the numerics), stored
    the same way, with its ratio to the exact kernel of the same run (`vs_exact`)."""
    from specmoe.kernels.host import build
    from specmoe.sim.host import (INT8_ACT, INT8_ACT_FORMATS, KERNEL_FORMATS, MEASURE_SHAPE, MEASURE_TOKENS,
                                  PUBLISHED_FORMATS, STAND_IN, _median_time, measure_kernel)
    from specmoe.sim.calibrate import SyntheticExpert

    old = json.loads(out.read_text()) if formats else None
    saved = os.environ.get("SPECMOE_HOST_ISA")
    builds = {}
    try:
        for isa in dict.fromkeys(["avx2", build.choose_isa() or "scalar"]):
            os.environ["SPECMOE_HOST_ISA"] = isa
            tiny = SyntheticExpert("bf16", 64, 64, threads=1)
            call = _median_time(tiny.runner(1), 31)
            name = tiny.kernel
            tiny.close()
            if formats:
                builds[isa] = old["builds"][isa]
                for fmt in formats:
                    ref, q8 = STAND_IN[fmt], INT8_ACT.get(fmt)
                    turns = [fmt] + ([q8] if q8 else [])  # measured in the same turns, beside `ref`
                    runs = [(measure_kernel(ref, 1, call_s=call)[0],
                             *(measure_kernel(f, 1, call_s=call)[0] for f in turns)) for _ in range(repeats)]
                    measured = {"date": environment("cpu")["date"], "git_sha": environment("cpu")["git_sha"],
                                "load_average": os.getloadavg(),
                                "command": f"python benchmarks/host_kernels.py --calibrate --kernel-formats "
                                           f"{' '.join(formats)}" + (f" --repeats {repeats}" if repeats != 3 else "")}
                    base = builds[isa]["kernels"][ref]
                    for n, f in enumerate(turns, start=1):
                        rb = statistics.median(run[n].bytes_per_s / run[0].bytes_per_s for run in runs)
                        rf = statistics.median(run[n].flops / run[0].flops for run in runs)
                        entry = builds[isa]["kernels"][f] = {
                            "bytes_per_s_per_thread": base["bytes_per_s_per_thread"] * rb,
                            "flops_per_thread": base["flops_per_thread"] * rf,
                            "relative_to": ref, "ratio": {"bytes_per_s": rb, "flops": rf},
                            "runs": [{"bytes_per_s": run[n].bytes_per_s, "flops": run[n].flops,
                                      f"{ref}_bytes_per_s": run[0].bytes_per_s, f"{ref}_flops": run[0].flops}
                                     for run in runs], "measured": measured}
                        if f == q8:
                            entry.update(
                                activations="int8",
                                label=f"{fmt} weights x int8 activations (opt-in host_activations='int8': x and the "
                                      "activations rounded to int8 per 32 columns; changes the numerics)",
                                vs_exact={"bytes_per_s": statistics.median(r[n].bytes_per_s / r[1].bytes_per_s
                                                                           for r in runs),
                                          "flops": statistics.median(r[n].flops / r[1].flops for r in runs)})
                            for run, row in zip(runs, entry["runs"]):
                                row[f"{fmt}_bytes_per_s"] = run[1].bytes_per_s
                continue
            kernels = {}
            for fmt in KERNEL_FORMATS + PUBLISHED_FORMATS + INT8_ACT_FORMATS:
                runs = [measure_kernel(fmt, 1, call_s=call)[0] for _ in range(repeats)]
                kernels[fmt] = {"bytes_per_s_per_thread": statistics.median(k.bytes_per_s for k in runs),
                                "flops_per_thread": statistics.median(k.flops for k in runs),
                                "runs": [{"bytes_per_s": k.bytes_per_s, "flops": k.flops} for k in runs]}
            builds[isa] = {"kernel": name.rsplit("-", 1)[0], "call_s": call, "kernels": kernels,
                           "shape": f"{MEASURE_SHAPE[0]}x{MEASURE_SHAPE[1]}", "tokens": [1, MEASURE_TOKENS]}
    finally:
        if saved is None:
            os.environ.pop("SPECMOE_HOST_ISA", None)
        else:
            os.environ["SPECMOE_HOST_ISA"] = saved
    if formats:
        data = {**old, "builds": builds}
    else:
        data = {"what": "per-thread rates of this project's host experts kernel builds (sim.host.calibrated_kernels)",
                "command": "python benchmarks/host_kernels.py --calibrate", "environment": environment("cpu"),
                "load_average": os.getloadavg(), "builds": builds}
    write_json(out, data)
    return data


def parse_shape(text: str) -> tuple[int, int]:
    try:
        h, i = (int(v) for v in text.lower().split("x"))
        return h, i
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: write HxI, e.g. 4096x14336") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ggml", type=Path, default=None, help="a ggml checkout with its build in build/")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=None, help="HxI ... (default: four models)")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timed calls per case (>= 7 calls)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=NAME)
    ap.add_argument("--calibrate", action="store_true",
                    help="measure each build's per-thread rates into specmoe/sim/calibration/host_kernels.json")
    ap.add_argument("--kernel-formats", nargs="+", default=None, choices=("mxfp4", "fp8", "gptq"),
                    help="with --calibrate: only these publishers' formats, measured beside their int4/int8 kernel "
                         "and scaled to its rate in the file (the rest kept); mxfp4 with its int8-activation kernel "
                         "too")
    ap.add_argument("--repeats", type=int, default=3,
                    help="with --calibrate: runs per kernel, the median kept (more on a busy machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.calibrate:
        from specmoe.sim.host import CALIBRATION

        data = calibrate(CALIBRATION, repeats=args.repeats, formats=args.kernel_formats)
        for isa, b in data["builds"].items():
            print(isa, {f: f"{k['bytes_per_s_per_thread'] / 1e9:.2f} GB/s, {k['flops_per_thread'] / 1e9:.1f} "
                           f"GFLOP/s" for f, k in b["kernels"].items()}, f"call {b['call_s'] * 1e6:.0f} us")
        return 0
    result = run(args)
    write_json(args.out / f"{args.name}.json", result)
    text = markdown(result)
    write_text(args.out / f"{args.name}.md", text + "\n")
    plot(result, args.out / f"{args.name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

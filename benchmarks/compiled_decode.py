"""Compiled decode vs eager (issue 20 items 2 and 4): decode tok/s of one model, unwrapped and wrapped.

Modes, in one process, interleaved over repeats (medians): the unwrapped model eager (dynamic cache) and
compiled by transformers' own static-cache path (``generate(cache_implementation="static",
compile_config=...)``), and SpeculativeMoE (no predictor) at each capacity, eager and with ``compile=True``.
For each mode it also records, per decode step (from a profiled N-token call minus a profiled 1-token call):
compiled graph segments entered, aten ops dispatched by the host, and CUDA-graph replays;
the compile time (the warm-up decode steps that compiled); and whether its greedy tokens equal the unwrapped
eager model's. The segment counts are what the simulator's "compiled" compute model reads (`sim.compute`, via
`--calibration`).

    nice python benchmarks/compiled_decode.py --threads 1            # the reference model on CPU (README table)
    python benchmarks/compiled_decode.py --model PATH --device cuda --capacities 1.0 0.5 --name X   # gpu_check
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from specmoe import SpeculativeMoE
from specmoe.io import read_json, write_json, write_text
from specmoe.measure import environment, time_generate

RESULTS = Path(__file__).parent / "results"
REFERENCE = Path(__file__).resolve().parent.parent / "specmoe" / "reference" / "checkpoint"
CALIBRATION = Path(__file__).resolve().parent.parent / "specmoe" / "sim" / "calibration" / "compiled_decode.json"


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def hf_compiled_generate(model, backend: str, device: torch.device):
    """The unwrapped model through transformers' own compiled decode: a static cache and compile_config
    (on CPU transformers compiles only when told to compile on every device)."""
    from transformers import CompileConfig

    cc = CompileConfig(backend=backend, mode="reduce-overhead" if device.type == "cuda" else "default",
                       dynamic=False)
    if device.type != "cuda":
        cc._compile_all_devices = True  # transformers' own switch for compiling off-GPU (no public one)

    def generate(**kwargs):
        return model.generate(**kwargs, cache_implementation="static", compile_config=cc)
    return generate


def per_step_counts(generate, inputs, new_tokens: int) -> dict:
    """Per decode step: compiled segments entered, aten ops the host dispatched (outermost: eager ops, and inside
    compiled graphs their extern calls), CUDA-graph replays (cudaGraphLaunch calls)."""
    from torch.profiler import ProfilerActivity, profile

    def count(n):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        seg = ops = replays = 0
        for ev in prof.events():
            name = ev.name
            if name.startswith("Torch-Compiled Region"):
                seg += 1
            elif name == "cudaGraphLaunch":
                replays += 1
            elif name.startswith("aten::"):
                parent = ev.cpu_parent
                while parent is not None and not parent.name.startswith("aten::"):
                    parent = parent.cpu_parent
                ops += parent is None
        return seg, ops, replays

    full, one = count(new_tokens), count(1)
    steps = new_tokens - 1
    return {k: (a - b) / steps for k, a, b in zip(("segments", "aten_ops", "cuda_graph_replays"),
                                                   full, one)}


ASSUMED_SEGMENT_S = 25e-6  # host cost of one compiled segment on a GPU: dynamo's guards + a CUDA-graph replay


def write_calibration(path: Path, result: dict, source: Path) -> None:
    """The simulator's compiled host model (`sim.compute`, preset "compiled"): compiled segments entered per
    MoE layer (the step's segments less the one that ends it, over the layers) and per pass, as measured."""
    seg = result["modes"]["wrapped 1 compiled"]["segments_per_token"]
    layers = result["num_layers"]
    write_json(path, {
        "what": "compiled decode segments per decode step of the wrapped model (SpeculativeMoE(..., compile=True))",
        "command": f"python benchmarks/compiled_decode.py (results/{source.name})",
        "environment": result["environment"], "num_layers": layers, "segments_per_token": seg,
        "segments_per_layer": (seg - 1) / layers, "segments_per_pass": 1.0,
        "assumed_segment_s": ASSUMED_SEGMENT_S,
        "assumption": "host seconds per compiled segment on a GPU (guards + CUDA-graph replay): assumed, not "
                      "measured; the segment counts are measured (backend-independent: dynamo's graph breaks)"})


def markdown(r: dict) -> str:
    env, st = r["environment"], r["settings"]
    lines = ["| mode | decode tok/s (median) | vs eager | segments / token | aten ops / token | "
             "CUDA-graph replays / token | compile s | same tokens |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for name, m in r["modes"].items():
        eager = r["modes"].get(m.get("eager_of") or name, m)
        lines.append(f"| {name} | {m['decode_tok_s']:.1f} | {m['decode_tok_s'] / eager['decode_tok_s']:.2f}x | "
                     f"{m['segments_per_token']:.1f} | {m['aten_ops_per_token']:.0f} | "
                     f"{m['cuda_graph_replays_per_token']:.0f} | "
                     f"{m['compile_s']:.1f} | {'yes' if m['same_tokens'] else 'NO'} |")
    lines += ["", f"{r['model']}, {st['dtype']}, prompt {st['prompt_len']} tokens, {st['new_tokens']} new, medians "
              f"of {st['repeats']} interleaved repeats, backend {st['backend']}, wrapped rows without a predictor; "
              f"{env['device_name']}, {env['torch_threads']} torch threads, torch {env['torch']}, transformers "
              f"{env['transformers']}, git {env['git_sha']}. Segments: compiled graphs entered per decode step; "
              "aten ops: ops the host dispatched (inside compiled graphs only extern calls such as matmuls); "
              "compile s: time of the decode steps that compiled."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REFERENCE, help="a save_pretrained directory (default: reference)")
    ap.add_argument("--shape", default=None, help="instead of --model: a simulator preset's shapes with random weights "
                    "(benchmarks/shape_real.py's model), e.g. qwen1.5-moe-a2.7b")
    ap.add_argument("--smoke", action="store_true", help="with --shape: its tiny version (CPU, seconds)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--capacities", type=float, nargs="+", default=[1.0, 0.25])
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-step op counts")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--calibration", default=str(CALIBRATION),
                    help="where the simulator's segment counts go (default: specmoe/sim/calibration/; '' for none)")
    ap.add_argument("--render", type=Path, help="only rewrite the markdown of this result JSON")
    ap.add_argument("--name", default=None, help="file stem (default: compiled_decode_<device type>)")
    args = ap.parse_args(argv)

    if args.render:
        write_text(args.render.with_suffix(".md"), markdown(read_json(args.render, what="compiled_decode result")))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.shape:
        from specmoe.sim.shapes import ModelShape
        from specmoe.sim.synthetic import build_random_model, smoke_config

        published = ModelShape.from_name(args.shape, expert_dtype="bf16")
        config = smoke_config(published) if args.smoke else published.to_config()
        base = build_random_model(config, dtype=dtype, device="cpu", experts_device="cpu", seed=0).eval()
        model_name = f"{args.shape} shapes, random weights" + (" (smoke)" if args.smoke else "")
    else:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True).eval()
        model_name = str(args.model.name if args.model == REFERENCE else args.model)
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = base.generation_config.pad_token_id or 0
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, base.config.vocab_size, (1, args.prompt_len), generator=g).to(device)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])

    modes: dict[str, dict] = {}
    unwrapped = copy.deepcopy(base).to(device)
    modes["unwrapped eager"] = {"generate": unwrapped.generate}
    modes["unwrapped compiled (transformers static cache)"] = {
        "generate": hf_compiled_generate(unwrapped, args.backend, device), "eager_of": "unwrapped eager"}
    wrappers = {}
    for cap in args.capacities:
        for compiled in (False, True):
            name = f"wrapped {cap:g} {'compiled' if compiled else 'eager'}"
            smoe = SpeculativeMoE(copy.deepcopy(base), None, cap, device=device,
                                  compile=args.backend if compiled and args.backend != "inductor" else compiled)
            wrappers[name] = smoe
            modes[name] = {"generate": smoe.generate, "capacity": cap}
            if compiled:
                modes[name]["eager_of"] = f"wrapped {cap:g} eager"

    with torch.no_grad():
        expected = unwrapped.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
    runs = {k: [] for k in modes}
    for r in range(args.repeats):  # interleaved: drift on a shared machine hits every mode alike
        for name, m in modes.items():
            if r == 0:  # warm-up: compiles; its tokens are checked
                before, start = _graphs(), time.perf_counter()
                with torch.no_grad():
                    out = m["generate"](**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        do_sample=False)
                m["warmup_s"] = time.perf_counter() - start
                m["graphs"] = _graphs() - before
                m["same_tokens"] = bool(torch.equal(out.cpu(), expected.cpu()))
            t = time_generate(m["generate"], inputs, args.new_tokens, repeats=1, warmup=0, device=device)
            runs[name].append(t.decode_tok_s)
            print(f"repeat {r} {name}: {t.decode_tok_s:.1f} tok/s", file=sys.stderr)
    for name, m in modes.items():
        m["decode_tok_s"] = statistics.median(runs[name])
        m["runs_decode_tok_s"] = runs[name]
        smoe = wrappers.get(name)
        cs = smoe.compile_stats if smoe is not None else None
        m["compile_s"] = cs["compile_s"] if cs else (m["warmup_s"] if m["graphs"] else 0.0)
        if cs:
            m["compiled_steps"], m["eager_steps"] = cs["compiled_steps"], cs["eager_steps"]
        counts = dict.fromkeys(("segments", "aten_ops", "cuda_graph_replays"), 0.0) if args.no_profile else \
            per_step_counts(m["generate"], inputs, args.new_tokens)  # the timed length: no new static cache
        m.update({f"{k}_per_token": v for k, v in counts.items()})
        del m["generate"]
    base_name = "unwrapped compiled (transformers static cache)"
    result = {
        "benchmark": "compiled_decode",
        "model": model_name,
        "settings": {"capacities": args.capacities, "predictor": None, "dtype": str(dtype), "backend": args.backend,
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats},
        "environment": environment(device),
        "num_layers": wrappers[next(iter(wrappers))].geometry.num_layers if wrappers else None,
        "modes": modes,
        "ratio_wrapped_1_compiled_over_unwrapped_compiled": (
            modes["wrapped 1 compiled"]["decode_tok_s"] / modes[base_name]["decode_tok_s"]
            if "wrapped 1 compiled" in modes else None),
    }
    out = args.out / f"{args.name or 'compiled_decode_' + device.type}.json"
    if args.calibration and "wrapped 1 compiled" in modes and not args.no_profile:
        write_calibration(Path(args.calibration), result, out)
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    print(json.dumps({k: {"tok_s": round(v["decode_tok_s"], 1), "same": v["same_tokens"]}
                      for k, v in modes.items()}, indent=1))
    print(f"wrote {out}")
    return 0 if all(m["same_tokens"] for m in modes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

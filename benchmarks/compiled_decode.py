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
import os
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


class _ReplayCounter:
    """CUDA-graph replays while open: `torch.cuda.CUDAGraph.replay` counted (cudagraph trees replay every graph
    through it; the profiler's CPU events do not show them)."""

    def __enter__(self):
        self.n = 0
        self._cls = getattr(getattr(torch, "cuda", None), "CUDAGraph", None)
        if self._cls is not None:
            self._orig = self._cls.replay

            def replay(graph, *a, **k):
                self.n += 1
                return self._orig(graph, *a, **k)
            self._cls.replay = replay
        return self

    def __exit__(self, *exc):
        if self._cls is not None:
            self._cls.replay = self._orig


def per_step_counts(generate, inputs, new_tokens: int) -> dict:
    """Per decode step: compiled regions entered (profiler's "Torch-Compiled Region" events), aten ops the host
    dispatched (outermost: eager ops, and inside compiled graphs their extern calls), runtime experts calls
    through the `specmoe::experts` op, CUDA-graph replays (`_ReplayCounter`)."""
    from torch.profiler import ProfilerActivity, profile

    def count(n):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof, _ReplayCounter() as replays:
            generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        seg = ops = op_calls = 0
        for ev in prof.events():
            name = ev.name
            if name.startswith("Torch-Compiled Region"):
                seg += 1
            elif name == "specmoe::experts":
                op_calls += 1
            elif name.startswith("aten::"):
                parent = ev.cpu_parent
                while parent is not None and not parent.name.startswith("aten::"):
                    parent = parent.cpu_parent
                ops += parent is None
        return seg, ops, op_calls, replays.n

    full, one = count(new_tokens), count(1)
    steps = new_tokens - 1
    return {k: (a - b) / steps for k, a, b in zip(("segments", "aten_ops", "experts_op_calls", "cuda_graph_replays"),
                                                   full, one)}


ASSUMED_REPLAY_S = 15e-6  # host cost of one CUDA-graph replay: cudaGraphLaunch + cudagraph trees' bookkeeping
# + the copy of the partition's input into its static buffer; an assumption until a GPU run measures it


def host_costs(backend: str, calls: int = 2000, repeats: int = 7) -> dict:
    """Host seconds, on this machine, of (a) entering a compiled region that runs one tiny kernel, (b) one
    `specmoe::experts` call from inside compiled code (its dispatch; the runtime's own work left out: the op
    returns a preallocated tensor) and (c) one eager aten op (the same tiny kernel called eagerly), and (a), (b)
    in units of (c): what the simulator charges, times its eager per-op cost. Process CPU seconds (what other processes on a shared machine do not
    inflate), minimum over `repeats` batches of `calls` calls (medians recorded too)."""
    from specmoe.runtime import compiled as runtime_compiled

    x, ids, w = torch.zeros(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2)
    out = torch.zeros(4, 8)

    def plain(x, ids, w):
        return x + 1

    def with_op(x, ids, w):
        return torch.ops.specmoe.experts(x, ids, w, 0) + 1

    fns = {"eager_op": plain, "region": torch.compile(plain, backend=backend, dynamic=False),
           "region_with_op": torch.compile(with_op, backend=backend, dynamic=False)}
    previous = getattr(runtime_compiled._ACTIVE, "calls", None)
    runtime_compiled._ACTIVE.calls = {0: lambda h, i, ww: out}
    try:
        samples = {k: [] for k in fns}
        with torch.no_grad():
            for f in fns.values():
                f(x, ids, w)  # compiles
            for _ in range(repeats):
                for k, f in fns.items():
                    start = time.process_time()
                    for _ in range(calls):
                        f(x, ids, w)
                    samples[k].append((time.process_time() - start) / calls)
    finally:
        runtime_compiled._ACTIVE.calls = previous
    best = {k: min(v) for k, v in samples.items()}
    op = max(0.0, best["region_with_op"] - best["region"])
    return {"backend": backend, "calls": calls, "repeats": repeats, "clock": "process CPU time",
            "segment_s": best["region"], "experts_op_s": op, "eager_op_s": best["eager_op"],
            "segment_in_eager_ops": best["region"] / best["eager_op"], "experts_op_in_eager_ops": op / best["eager_op"],
            "median_segment_s": statistics.median(samples["region"]),
            "median_experts_op_s": max(0.0, statistics.median(samples["region_with_op"]) -
                                       statistics.median(samples["region"]))}


def write_calibration(path: Path, result: dict, source: Path) -> None:
    """The simulator's compiled host model (`sim.compute`, preset "compiled"): compiled regions and experts-op
    calls per MoE layer and per pass (as measured: counts), the host cost of each (measured here on the CPU:
    `host_costs`), and the CUDA-graph replays (counted on a GPU run, else the graph partition's structure and an
    assumed cost)."""
    m = result["modes"]["wrapped 1 compiled"]
    layers, costs = result["num_layers"], result["host_costs"]
    seg, calls, replays = m["segments_per_token"], m["experts_op_calls_per_token"], m["cuda_graph_replays_per_token"]
    cuda = result["environment"].get("device") == "cuda"
    cpu = result["environment"]["device_name"]
    write_json(path, {
        "what": "compiled decode host model of the wrapped model (SpeculativeMoE(..., compile=True)): counts per "
                "decode step and host seconds of each",
        "command": f"python benchmarks/compiled_decode.py (results/{source.name})",
        "environment": result["environment"], "num_layers": layers,
        "segments_per_token": seg, "segments_per_layer": max(0.0, seg - 1) / layers, "segments_per_pass": 1.0,
        "experts_op_calls_per_token": calls, "experts_op_calls_per_layer": calls / layers,
        "segment_s": costs["segment_s"], "experts_op_s": costs["experts_op_s"], "eager_op_s": costs["eager_op_s"],
        "segment_in_eager_ops": costs["segment_in_eager_ops"],
        "experts_op_in_eager_ops": costs["experts_op_in_eager_ops"],
        "host_costs_source": f"measured on {cpu} with backend {costs['backend']} as multiples of one eager aten op "
                             f"there (process CPU time, min of {costs['repeats']} x {costs['calls']} calls); a GPU "
                             "host assumed to keep the ratios",
        "replays_per_layer": (replays - 1) / layers if cuda else 1.0,
        "replays_per_pass": 1.0,
        "replay_s": ASSUMED_REPLAY_S,
        "replay_source": ("counted on this GPU run" if cuda else "assumed: inductor's graph partition makes one CUDA "
                          "graph between consecutive experts ops (L + 1 per step), not yet counted on a GPU")
        + f"; {ASSUMED_REPLAY_S * 1e6:.0f} us per replay assumed (launch + cudagraph trees + an input copy)"})


def record_routing(model, inputs, new_tokens: int) -> list[dict]:
    """The routing of the calls a mode's measurement makes, in order (the warm-up N-token call, then the timed
    1-token and N-token calls), on the unwrapped model (every mode gives its tokens): per call its passes' ids."""
    from specmoe.traces import capture_routing

    calls = []
    for n, timed in ((new_tokens, False), (1, True), (new_tokens, True)):
        with torch.no_grad(), capture_routing(model) as cap:
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        calls.append({"new_tokens": n, "timed": timed, "ids": [p.ids for p in cap.passes]})
    return calls


def write_validation_views(out: Path, result: dict, routing: list[dict], config, dtype) -> list[Path]:
    """`specmoe simulate --validate` inputs from this run, one per mode (eager / compiled SpeculativeMoE rows, each
    with the eager unwrapped row): the recorded routing, the shape, and per row its decode tok/s per CPU second
    (load-proof on a shared machine; wall-clock on a GPU)."""
    from specmoe.sim.compute import load_op_counts
    from specmoe.sim.shapes import ModelShape
    from specmoe.sim.stream import RoutingStream

    cpu = result["environment"].get("device") == "cpu"
    dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    shape = ModelShape.from_config(config, name=result["model"], dtype=dt, expert_dtype=dt)
    stream_path = out.with_name(out.stem + ".routing.safetensors")
    passes = [ids for call in routing for ids in call["ids"]]
    calls = [{"prompt": 0, "new_tokens": c["new_tokens"], "timed": c["timed"], "passes": len(c["ids"])}
             for c in routing]
    RoutingStream.from_passes(passes, calls=calls, num_experts=config.num_experts).save(stream_path)
    paths = []
    for view in ("eager", "compiled"):
        variants = []
        for name, m in result["modes"].items():
            if name == "unwrapped eager" or (name.startswith("wrapped") and name.endswith(view)):
                tok = m["decode_tok_per_cpu_s"] if cpu else m["decode_tok_s"]
                variants.append({"name": name, "kind": "unwrapped" if name.startswith("unwrapped") else "specmoe",
                                 "capacity": m.get("capacity"), "predictor": None if "capacity" not in m else "none",
                                 "decode_tok_s": tok, "ttft_s": m.get("ttft_cpu_s" if cpu else "ttft_s")})
        path = out.with_name(f"{out.stem}.{view}_view.json")
        write_json(path, {
            "benchmark": "compiled_decode (validation view)", "source": out.name, "routing_file": stream_path.name,
            "timing": "decode tokens per process CPU second" if cpu else "decode tokens per second",
            "environment": result["environment"], "shape": shape.to_dict(),
            "op_counts": load_op_counts(shape.model_type).to_dict(), "variants": variants,
            "settings": {"new_tokens": result["settings"]["new_tokens"], "prompt_len": result["settings"]["prompt_len"],
                         "lookahead": 1, "policy": "default", "offload": {"compile": view == "compiled"}}})
        paths.append(path)
    return paths


def markdown(r: dict) -> str:
    env, st = r["environment"], r["settings"]
    lines = ["| mode | decode tok/s (median) | vs eager | vs eager (median of pairs) | decode tok per CPU s | "
             "vs eager (CPU s) | segments / token | experts op calls / token | "
             "aten ops / token | CUDA-graph replays / token | compile s | same tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for name, m in r["modes"].items():
        eager = r["modes"].get(m.get("eager_of") or name, m)
        pairs = f"{m['median_ratio_of_pairs']:.2f}x" if m.get("median_ratio_of_pairs") else "—"
        cpu = m.get("decode_tok_per_cpu_s")
        cpu_cells = f"{cpu:.1f} | {cpu / eager['decode_tok_per_cpu_s']:.2f}x" if cpu else "— | —"
        lines.append(f"| {name} | {m['decode_tok_s']:.1f} | {m['decode_tok_s'] / eager['decode_tok_s']:.2f}x | {pairs} | "
                     f"{cpu_cells} | "
                     f"{m['segments_per_token']:.1f} | {m.get('experts_op_calls_per_token', 0):.0f} | "
                     f"{m['aten_ops_per_token']:.0f} | "
                     f"{m['cuda_graph_replays_per_token']:.0f} | "
                     f"{m['compile_s']:.1f} | {'yes' if m['same_tokens'] else 'NO'} |")
    lines += ["", f"{r['model']}, {st['dtype']}, prompt {st['prompt_len']} tokens, {st['new_tokens']} new, medians "
              f"of {st['repeats']} interleaved repeats, backend {st['backend']}, wrapped rows without a predictor; "
              f"{env['device_name']}, {env['torch_threads']} torch threads, torch {env['torch']}, transformers "
              f"{env['transformers']}, git {env['git_sha']}. Segments: compiled graphs entered per decode step; "
              "aten ops: ops the host dispatched (inside compiled graphs only extern calls such as matmuls); "
              "compile s: time of the decode steps that compiled; per CPU s: decode tokens per second of this "
              "process's CPU time (all its threads), which other processes on a shared machine do not inflate."]
    if r.get("load_average"):
        la = r["load_average"]
        lines[-1] += (f" Load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in la['before'])} before, "
                      f"{'/'.join(f'{x:.1f}' for x in la['after'])} after.")
    if r.get("host_costs"):
        hc = r["host_costs"]
        lines[-1] += (f" Host costs here ({hc['backend']}, CPU time, min of {hc['repeats']} x {hc['calls']} calls): an "
                      f"eager aten op {hc['eager_op_s'] * 1e6:.1f} us, a compiled region "
                      f"{hc['segment_s'] * 1e6:.1f} us ({hc['segment_in_eager_ops']:.1f} ops), an experts op call in "
                      f"it {hc['experts_op_s'] * 1e6:.1f} us ({hc['experts_op_in_eager_ops']:.1f} ops).")
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
    ap.add_argument("--no-routing", action="store_true", help="skip recording the routing (the validation views: "
                    "`specmoe simulate --validate <stem>.{eager,compiled}_view.json`)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--calibration", default=str(CALIBRATION),
                    help="where the simulator's segment counts go (default: specmoe/sim/calibration/; '' for none)")
    ap.add_argument("--render", type=Path, help="only rewrite the markdown of this result JSON")
    ap.add_argument("--calibration-from", type=Path, metavar="RESULT_JSON",
                    help="only rewrite --calibration from this result JSON (its counts and host costs)")
    ap.add_argument("--name", default=None, help="file stem (default: compiled_decode_<device type>)")
    args = ap.parse_args(argv)

    if args.render:
        write_text(args.render.with_suffix(".md"), markdown(read_json(args.render, what="compiled_decode result")))
        return 0
    if args.calibration_from:  # the host costs measured again now (the counts are the result's)
        result = read_json(args.calibration_from, what="compiled_decode result")
        result["host_costs"] = host_costs(result["settings"]["backend"])
        result["load_average"]["host_costs"] = list(os.getloadavg())
        write_json(args.calibration_from, result)
        write_text(args.calibration_from.with_suffix(".md"), markdown(result))
        write_calibration(Path(args.calibration), result, args.calibration_from)
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

    load_before = os.getloadavg()
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
    cpu_runs = {k: [] for k in modes}  # decode tokens per process CPU second: what a shared machine cannot blur
    cpu_ttft, wall_ttft = {k: [] for k in modes}, {k: [] for k in modes}
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
            stamps = []  # process CPU seconds before the 1-token and the N-token call (`between`), and after
            t = time_generate(m["generate"], inputs, args.new_tokens, repeats=1, warmup=0, device=device,
                              between=lambda: stamps.append(time.process_time()))
            stamps.append(time.process_time())
            runs[name].append(t.decode_tok_s)
            cpu_runs[name].append((args.new_tokens - 1) / max((stamps[2] - stamps[1]) - (stamps[1] - stamps[0]), 1e-9))
            cpu_ttft[name].append(stamps[1] - stamps[0])
            wall_ttft[name].append(t.ttft_s)
            print(f"repeat {r} {name}: {t.decode_tok_s:.1f} tok/s, {cpu_runs[name][-1]:.1f} per CPU s",
                  file=sys.stderr)
    for name, m in modes.items():
        m["decode_tok_s"] = statistics.median(runs[name])
        m["runs_decode_tok_s"] = runs[name]
        m["decode_tok_per_cpu_s"] = statistics.median(cpu_runs[name])
        m["runs_decode_tok_per_cpu_s"] = cpu_runs[name]
        m["ttft_cpu_s"], m["ttft_s"] = statistics.median(cpu_ttft[name]), statistics.median(wall_ttft[name])
        smoe = wrappers.get(name)
        cs = smoe.compile_stats if smoe is not None else None
        m["compile_s"] = cs["compile_s"] if cs else (m["warmup_s"] if m["graphs"] else 0.0)
        if cs:
            m["compiled_steps"], m["eager_steps"] = cs["compiled_steps"], cs["eager_steps"]
        counts = dict.fromkeys(("segments", "aten_ops", "experts_op_calls", "cuda_graph_replays"), 0.0) if args.no_profile else \
            per_step_counts(m["generate"], inputs, args.new_tokens)  # the timed length: no new static cache
        m.update({f"{k}_per_token": v for k, v in counts.items()})
        del m["generate"]
    for name, m in modes.items():  # per repeat, compiled over its eager mode (the same minute of load)
        if m.get("eager_of"):
            m["median_ratio_of_pairs"] = statistics.median(
                c / e for c, e in zip(m["runs_decode_tok_s"], modes[m["eager_of"]]["runs_decode_tok_s"]))
    base_name = "unwrapped compiled (transformers static cache)"
    costs = host_costs(args.backend) if not args.no_profile else None
    result = {
        "benchmark": "compiled_decode",
        "model": model_name,
        "settings": {"capacities": args.capacities, "predictor": None, "dtype": str(dtype), "backend": args.backend,
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats},
        "environment": environment(device),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "host_costs": costs,
        "num_layers": wrappers[next(iter(wrappers))].geometry.num_layers if wrappers else None,
        "modes": modes,
        "ratio_wrapped_1_compiled_over_unwrapped_compiled": (
            modes["wrapped 1 compiled"]["decode_tok_s"] / modes[base_name]["decode_tok_s"]
            if "wrapped 1 compiled" in modes else None),
    }
    out = args.out / f"{args.name or 'compiled_decode_' + device.type}.json"
    if args.calibration and "wrapped 1 compiled" in modes and not args.no_profile:
        write_calibration(Path(args.calibration), result, out)
    if not args.no_routing:
        views = write_validation_views(out, result, record_routing(unwrapped, inputs, args.new_tokens), base.config,
                                       dtype)
        result["validation_views"] = [v.name for v in views]
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    print(json.dumps({k: {"tok_s": round(v["decode_tok_s"], 1), "same": v["same_tokens"]}
                      for k, v in modes.items()}, indent=1))
    print(f"wrote {out}")
    return 0 if all(m["same_tokens"] for m in modes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

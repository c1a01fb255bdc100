"""Peak host memory of loading: `load_offloaded(host_store="ram" | "mmap")` against transformers' from_pretrained,
on a random-weight sharded checkpoint with >= 2 GB of experts.

    python benchmarks/streaming_load.py                  # writes benchmarks/results/streaming_load.{json,md}

1. A subprocess writes a random-weight Mixtral-style checkpoint (bf16, hub format: per-expert keys, sharded with
   model.safetensors.index.json) outside the git tree (default /tmp/specmoe-streaming-ckpt).
2. One fresh subprocess per configuration loads it and greedy-generates the same prompt; each reports its RSS
   after imports, its peak RSS (getrusage ru_maxrss, which counts every page the process ever had resident),
   the load time, decode tok/s (from the first new token to the end) and the tokens.
   * from_pretrained: the unwrapped model, everything in host memory (the reference tokens);
   * ram / mmap: `specmoe.load_offloaded(..., device="cpu", cache_capacity=C, host_store=...)`.
   On a CPU the device cache is host memory too: its C share of the experts is part of each wrapped row's RSS.
3. The goal: mmap raises peak RSS (over the RSS after imports) by less than half the experts' bytes, and gives
   the from_pretrained tokens. The page cache is warm after the writer (load times are from the page cache);
   this script does not drop it (that needs root and slows every other job on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's specmoe, in the child processes too
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=22, num_attention_heads=8,
              num_key_value_heads=2, head_dim=128, num_local_experts=8, num_experts_per_tok=2, vocab_size=4096,
              max_position_embeddings=256, tie_word_embeddings=False)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def write_checkpoint(directory: Path, shard: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", **CONFIG)
    cfg.eos_token_id = None
    cfg.pad_token_id = 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # decisive routers (random init leaves them near uniform)
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2 and p.shape[0] == CONFIG["num_local_experts"]:
                p.normal_(0, 0.5)
    model.save_pretrained(directory, max_shard_size=shard)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"expert_bytes": expert_bytes, "total_bytes": total,
            "shards": len(list(directory.glob("*.safetensors")))}


def measure(kind: str, directory: Path, capacity: float, new_tokens: int, prompt_len: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from specmoe import load_offloaded
    from specmoe.bench.compare import FirstTokenClock

    base = _rss_bytes()
    t0 = time.perf_counter()
    store_path, cache_bytes = None, 0
    if kind == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto", local_files_only=True).eval()
        generate = model.generate
    else:
        smoe = load_offloaded(directory, device="cpu", cache_capacity=capacity, host_store=kind)
        generate, store_path, cache_bytes = smoe.generate, smoe.store_path, smoe.memory()["cache_bytes"]
    load_s = time.perf_counter() - t0
    after_load, peak_load = _rss_bytes(), _peak_rss_bytes()
    ids = torch.randint(3, CONFIG["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(0))
    clock = FirstTokenClock("cpu")
    with torch.no_grad():
        out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, streamer=clock)
    decode_s = clock.decode_seconds()
    return {"kind": kind, "rss_after_imports": base, "rss_after_load": after_load, "peak_rss_load": peak_load,
            "peak_rss": _peak_rss_bytes(),
            "load_s": load_s, "decode_tok_s": (new_tokens - 1) / decode_s, "store_path": store_path,
            "cache_bytes": cache_bytes,
            "tokens": out[0, prompt_len:].tolist()}


def _markdown(result: dict) -> str:
    gib = 2**30
    e = result["checkpoint"]["expert_bytes"]
    lines = ["| load | loading: peak RSS raise (GiB) | / expert bytes | with generate: peak RSS raise (GiB) | "
             "/ expert bytes | load s | decode tok/s | tokens = from_pretrained | host store |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|---|"]
    for r in result["runs"]:
        load = r["peak_rss_load"] - r["rss_after_imports"]
        raise_ = r["peak_rss"] - r["rss_after_imports"]
        lines.append(f"| {r['kind']} | {load / gib:.2f} | {load / e:.2f} | {raise_ / gib:.2f} | {raise_ / e:.2f} | "
                     f"{r['load_s']:.1f} | {r['decode_tok_s']:.2f} | {'yes' if r['same_tokens'] else 'NO'} | "
                     f"{r['store_path'] or 'everything in host memory'} |")
    s = result["settings"]
    env = result["environment"]
    lines += ["", f"Random-weight Mixtral-style checkpoint, bf16, {result['checkpoint']['shards']} safetensors shards, "
              f"{e / gib:.2f} GiB of experts ({result['checkpoint']['total_bytes'] / gib:.2f} GiB in all); one fresh "
              f"process per row; peak RSS raise = ru_maxrss (after loading; after generating too) - RSS after "
              f"imports; wrapped rows: cache capacity {s['capacity']} (on a CPU the cache pool is host memory too, "
              f"filled during generate; on a GPU it is device memory), {s['new_tokens']} greedy tokens after a "
              f"{s['prompt_len']}-token prompt, 1 torch thread, page cache warm. {env['device_name']}, torch "
              f"{env['torch']}, transformers {env['transformers']}, git {env['git_sha']}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/specmoe-streaming-ckpt"),
                    help="where the random checkpoint is written (outside the git tree)")
    ap.add_argument("--shard", default="400MB", help="max_shard_size of the checkpoint")
    ap.add_argument("--capacity", type=float, default=0.25, help="cache capacity of the wrapped rows")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--kinds", nargs="+", default=["from_pretrained", "ram", "mmap"])
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"],
                    help="decoder layers (22: 2.06 GiB of experts; fewer for a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument("--_write", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    CONFIG["num_hidden_layers"] = args.layers
    if args._write:
        print(json.dumps(write_checkpoint(args.checkpoint, args.shard)))
        return 0
    if args._measure:
        print(json.dumps(measure(args._measure, args.checkpoint, args.capacity, args.new_tokens, args.prompt_len)))
        return 0

    def child(*extra):
        cmd = [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--shard", args.shard, "--capacity",
               str(args.capacity), "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len),
               "--layers", str(args.layers), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"writing a random checkpoint to {args.checkpoint} ...", flush=True)
    checkpoint = child("--_write")
    print(f"  {checkpoint}", flush=True)
    runs = []
    for kind in args.kinds:
        print(f"measuring {kind} ...", flush=True)
        runs.append(child("--_measure", kind))
        r = runs[-1]
        print(f"  peak RSS raise {(r['peak_rss'] - r['rss_after_imports']) / 2**30:.2f} GiB, load {r['load_s']:.1f} s, "
              f"{r['decode_tok_s']:.2f} tok/s", flush=True)
    reference = next((r["tokens"] for r in runs if r["kind"] == "from_pretrained"), None)
    for r in runs:
        r["same_tokens"] = reference is not None and r["tokens"] == reference
        r["peak_rss_raise_over_expert_bytes"] = (r["peak_rss"] - r["rss_after_imports"]) / checkpoint["expert_bytes"]
        r["load_peak_rss_raise_over_expert_bytes"] = (r["peak_rss_load"] - r["rss_after_imports"]) / \
            checkpoint["expert_bytes"]
    from specmoe.bench import environment
    from specmoe.io import write_json

    result = {"benchmark": "streaming_load", "environment": environment("cpu"), "checkpoint": checkpoint,
              "settings": {"capacity": args.capacity, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
                           "config": CONFIG, "dtype": "bfloat16", "shard": args.shard},
              "runs": runs,
              "goal": {"mmap_load_raise_under_half_expert_bytes": next(
                  (r["load_peak_rss_raise_over_expert_bytes"] < 0.5 for r in runs if r["kind"] == "mmap"), None),
                       "mmap_raise_with_generate_under_half_expert_bytes": next(
                  (r["peak_rss_raise_over_expert_bytes"] < 0.5 for r in runs if r["kind"] == "mmap"), None),
                       "mmap_same_tokens": next((r["same_tokens"] for r in runs if r["kind"] == "mmap"), None)}}
    write_json(args.out / "streaming_load.json", result)
    md = _markdown(result)
    (args.out / "streaming_load.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compressed experts (store, copies and cache slots): perplexity change, bytes moved host->device, and how
many experts a GPU holds, per scheme.

    python benchmarks/compression.py                        # the reference model on held-out text (CPU is fine)
    python benchmarks/compression.py --tiny qwen2_moe       # a random tiny model: tests the script, not a result
    python benchmarks/compression.py --report results.json  # regenerate the markdown from a JSON

For each scheme (none, int8, int4 with groups of 128, 64, 32) the model is wrapped with SpeculativeMoE at
--capacity with no predictor (on demand only), and the held-out windows are scored: perplexity, and the bytes
the copies moved per token. A short greedy generation is timed too (decode tok/s on this machine; on a CPU
there is no PCIe link, so it shows the cost of dequantizing, not the transfer saving). The bytes per expert
are also given for bfloat16 experts, what a GPU run holds, and the memory plan of three real models on an
RTX 3090 (`specmoe.sim.memory_plan`: largest capacity that fits, slots an 8 GiB budget buys). Simulated tok/s
on a GPU: see the note the markdown ends with.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SCHEMES = ["none", "int8", "int4-g128", "int4-g64", "int4-g32"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", default=None, help="a tiny random model of this family instead of the reference")
    p.add_argument("--schemes", nargs="+", default=SCHEMES)
    p.add_argument("--capacity", type=float, default=0.25, help="cache capacity (fraction of all experts)")
    p.add_argument("--window", type=int, default=256, help="tokens per evaluation window")
    p.add_argument("--windows", type=int, default=32, help="held-out windows scored")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens timed per scheme (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None, help="only write the markdown from this JSON")
    return p.parse_args(argv)


def load(args):
    """(model, eval windows [N, T], description of model and text)."""
    if args.tiny:
        from specmoe.sim.shapes import PRESETS, ModelShape
        from specmoe.sim.synthetic import build_random_model, smoke_config

        shapes = {ModelShape.from_name(name).model_type: name for name in PRESETS}
        if args.tiny not in shapes:
            raise SystemExit(f"--tiny {args.tiny}: no preset shape of that family; choose one of {sorted(shapes)}")
        config = smoke_config(ModelShape.from_name(shapes[args.tiny]))  # the family at tiny sizes: smoke runs only
        model = build_random_model(config, dtype=torch.float32, progress=False)
        model.generation_config.eos_token_id = None
        g = torch.Generator().manual_seed(0)
        windows = torch.randint(2, model.config.vocab_size, (args.windows, args.window), generator=g)
        return model, windows, {"model": f"tiny random {args.tiny} (smoke test, not a result)",
                                "text": "uniform random token ids"}
    from specmoe.reference.corpus import load_corpus
    from specmoe.reference.data import encode_documents, eval_windows
    from specmoe.reference.model import load_reference_model, load_reference_tokenizer

    model = load_reference_model(device="cpu", dtype=torch.float32)
    corpus = load_corpus()
    stream = encode_documents(load_reference_tokenizer(), corpus.texts("val"))
    return model, eval_windows(stream, args.window, args.windows), {
        "model": "the reference model (specmoe.reference, float32 on CPU)", "text": corpus.describe()}


MEMORY_SHAPES = ("mixtral-8x7b", "deepseek-v2-lite", "qwen1.5-moe-a2.7b")
MEMORY_PROFILE = "rtx3090"
BUDGET = "8GiB"


def real_shape_bytes(scheme: str, shape_name: str = "qwen1.5-moe-a2.7b") -> dict:
    """Bytes of one expert of a real model: bfloat16, and its slot (= what a copy moves) under `scheme`."""
    from specmoe.sim.shapes import ModelShape

    shape = ModelShape.from_name(shape_name).compressed(scheme)
    return {"shape": shape_name, "bf16_bytes": shape.uncompressed_slot_bytes, "slot_bytes": shape.slot_bytes,
            "transfer_bytes": shape.transfer_bytes, "ratio": shape.uncompressed_slot_bytes / shape.slot_bytes}


def memory_rows(schemes) -> list[dict]:
    """Per real model and scheme: slot bytes, the largest capacity that fits an RTX 3090 (memory_plan), and
    the slots an 8 GiB budget buys (resolve_capacity, as `cache_capacity="8GiB"`)."""
    from specmoe.runtime.capacity import resolve_capacity
    from specmoe.sim.bounds import memory_plan
    from specmoe.sim.hardware import HardwareProfile
    from specmoe.sim.shapes import ModelShape

    profile = HardwareProfile.from_name(MEMORY_PROFILE)
    rows = []
    for name in MEMORY_SHAPES:
        for scheme in dict.fromkeys(["none", *schemes]):
            shape = ModelShape.from_name(name).compressed(scheme)
            plan = memory_plan(shape, profile, capacities=(1.0,))
            rows.append({"shape": name, "scheme": scheme, "profile": MEMORY_PROFILE, "slot_bytes": shape.slot_bytes,
                         "max_capacity": plan["max_capacity"], "max_slots": plan["max_slots"],
                         "experts": shape.moe_layers * shape.num_experts,
                         "budget": BUDGET, "budget_slots": resolve_capacity(BUDGET, shape.moe_layers, shape.num_experts,
                                                                            shape.slot_bytes),
                         "context": plan["context"], "reserve_bytes": plan["reserve_bytes"]})
    return rows


def run(args) -> dict:
    from tqdm import tqdm

    from specmoe import SpeculativeMoE
    from specmoe.measure import environment
    from specmoe.reference.evaluation import evaluate_loss

    torch.set_num_threads(args.threads)
    original, windows, described = load(args)
    rows = []
    for scheme in tqdm(args.schemes, desc="schemes"):
        model = copy.deepcopy(original)  # unwrap() gives back dequantized experts: never reuse a model
        smoe = SpeculativeMoE(model, None, cache_capacity=args.capacity, device="cpu",
                              compression=None if scheme == "none" else scheme)
        smoe.reset_stats()
        t0 = time.perf_counter()
        nll = evaluate_loss(smoe, windows, batch_size=args.batch)
        eval_s = time.perf_counter() - t0
        stats, memory = smoe.stats, smoe.memory()
        row = {"scheme": scheme, "nll": nll, "perplexity": math.exp(nll), "eval_s": eval_s,
               "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
               "bytes_moved": stats.total.bytes_moved, "hit_rate": stats.hit_rate,
               "bytes_moved_per_token": stats.total.bytes_moved / windows.numel(),
               "slot_bytes": memory["slot_bytes"], "host_expert_bytes": memory["host_expert_bytes"],
               "host_store_bytes": memory["host_store_bytes"], "real_shape": real_shape_bytes(scheme)}
        if args.decode_tokens:
            prompt = windows[:1, :32]
            smoe.generate(input_ids=prompt, max_new_tokens=2, do_sample=False)  # warm-up
            smoe.reset_stats()
            t0 = time.perf_counter()
            smoe.generate(input_ids=prompt, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
                          do_sample=False)
            row["generate_tok_s_cpu"] = args.decode_tokens / (time.perf_counter() - t0)
            row["decode_hit_rate"] = smoe.stats.hit_rate
            row["decode_bytes_moved_per_token"] = smoe.stats.total.bytes_moved / args.decode_tokens
        with warnings.catch_warnings():  # it warns that the experts come back dequantized: this copy is dropped
            warnings.simplefilter("ignore", UserWarning)
            smoe.unwrap()
        rows.append(row)
    base = next((r for r in rows if r["scheme"] == "none"), None)
    for r in rows:
        if base is not None:
            r["perplexity_change"] = r["perplexity"] / base["perplexity"] - 1
            r["bytes_moved_ratio"] = base["bytes_moved"] / r["bytes_moved"] if r["bytes_moved"] else None
    return {"benchmark": "compression", "environment": environment("cpu"), "described": described,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows,
            "memory": memory_rows(args.schemes)}


NOTE = ("Perplexity: the held-out windows scored by the wrapped model (prefill, LRU at the capacity above). "
        "Decode: one prompt of 32 tokens, greedy; on a CPU there is no PCIe link, so tok/s shows the cost of "
        "dequantizing (the CPU path dequantizes the routed slots into a scratch), not the transfer saving. "
        "Slots hold experts compressed, so a copy moves exactly one slot. The reference model's experts are "
        "tiny (64 x 32), so its scales and padding weigh more than in a real model: the last column gives one "
        "expert of Qwen1.5-MoE-A2.7B (bfloat16, and its compressed slot).")

SIMULATED = RESULTS / "simulate_compression.json"  # python benchmarks/simulate_routing_real.py --name simulate_compression ...


def simulated_table(sweep: dict, profile: str = "rtx3090", predictors=("none", "hidden")) -> list[str]:
    """Simulated decode with compressed copies: tok/s and MiB moved per token per scheme and capacity."""
    runs = [r for r in sweep["runs"] if r["profile"] == profile and r["policy"] == "lru"
            and r["predictor"] in predictors]
    if not runs:
        return []
    lines = [f"Simulated decode, Qwen1.5-MoE-A2.7B's sizes on {profile} with the reference model's routing "
             "(LRU; slots hold the compressed experts, a copy moves one slot and the experts kernel reads "
             "the compressed bytes; max fit is each scheme's own; from "
             "`benchmarks/results/simulate_compression.json`, made by the command in "
             "`benchmarks/simulate_routing_real.py`'s docstring):", "",
             "| experts | capacity | predictor | tok/s | MiB moved / token | stall ms / token |",
             "|---|---|---|---|---|---|"]
    def scheme(r):  # "qwen1.5-moe-a2.7b+int8" -> "int8"
        return r["shape"].partition("+")[2] or "bf16"

    for r in sorted(runs, key=lambda r: (r["capacity"], r["predictor"], scheme(r) != "bf16", scheme(r) != "int8",
                                         scheme(r))):
        cap = f"{r['capacity']:.3f}" + (" (max fit)" if r["max_fit"] else "")
        lines.append(f"| {scheme(r)} | {cap} | {r['predictor']} | {r['tok_s']:.1f} | "
                     f"{r['bytes_moved'] / r['tokens'] / 2**20:.0f} | {1e3 * r['stall_s'] / r['tokens']:.2f} |")
    return lines + [""]


def memory_table(rows: list[dict]) -> list[str]:
    """Slots per model and scheme: the largest capacity that fits the GPU, and what a budget buys."""
    if not rows:
        return []
    r0 = rows[0]
    lines = [f"Experts a GPU holds ({r0['profile']}, from `specmoe.sim.memory_plan`: non-expert weights + KV cache "
             f"of one {r0['context']}-token sequence + {r0['reserve_bytes'] / 2**30:.0f} GiB reserve, the rest "
             f"slots; and `cache_capacity=\"{r0['budget']}\"`):", "",
             "| model | experts | slot MiB | largest capacity that fits | slots | "
             f"slots for {r0['budget']} (at most all) | vs bf16 |", "|---|---|---|---|---|---|---|"]
    base = {r["shape"]: r for r in rows if r["scheme"] == "none"}
    for r in rows:
        more = r["budget_slots"] / base[r["shape"]]["budget_slots"] if r["shape"] in base else None
        lines.append(f"| {r['shape']} | {'bf16' if r['scheme'] == 'none' else r['scheme']} | "
                     f"{r['slot_bytes'] / 2**20:.1f} | {r['max_capacity']:.3f} | {r['max_slots']} of {r['experts']} | "
                     f"{r['budget_slots']} | " + (f"{more:.2f}x |" if more else "- |"))
    return lines + [""]


def report(result: dict, md_path: Path) -> None:
    env, rows = result["environment"], result["rows"]
    lines = [f"Model: {result['described']['model']}. Capacity {result['settings']['capacity']}, no predictor. "
             f"{result['settings']['windows']} held-out windows of {result['settings']['window']} tokens. "
             f"{env['device_name']}, torch {env['torch']}, git {env['git_sha']}.", "",
             "| scheme | perplexity | change | expert bytes (slot = copy) | decode hit rate | decode kB moved / token "
             "| decode tok/s (CPU) | Qwen1.5-MoE-A2.7B expert (bf16 / slot) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["real_shape"]
        change = f"{100 * r['perplexity_change']:+.2f}%" if "perplexity_change" in r else "-"
        decode = (f"{r['decode_hit_rate']:.3f} | {r['decode_bytes_moved_per_token'] / 1e3:.1f} | "
                  f"{r['generate_tok_s_cpu']:.1f}") if "generate_tok_s_cpu" in r else "- | - | -"
        lines.append(f"| {r['scheme']} | {r['perplexity']:.3f} | {change} | {r['slot_bytes']} | {decode} | "
                     f"{b['bf16_bytes'] / 2**20:.2f} / {b['slot_bytes'] / 2**20:.2f} MiB"
                     + (f" ({b['ratio']:.2f}x less)" if b["ratio"] > 1 else "") + " |")
    lines += ["", NOTE, ""]
    lines += memory_table(result.get("memory", []))
    if SIMULATED.is_file():
        from specmoe.io import read_json

        lines += simulated_table(read_json(SIMULATED, "simulator sweep"))
    from specmoe.io import write_text

    write_text(md_path, "\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    from specmoe.io import read_json, write_json

    if args.report is not None:
        result, out = read_json(args.report, "benchmark result"), args.report
    else:
        result = run(args)
        out = args.out or RESULTS / ("compression_smoke.json" if args.tiny else "compression.json")
        write_json(out, result)
        print(f"wrote {out}")
    report(result, out.with_suffix(".md"))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compressed host storage of experts: perplexity change and bytes moved host->device, per scheme.

    python benchmarks/compression.py                        # the reference model on held-out text (CPU is fine)
    python benchmarks/compression.py --tiny qwen2_moe       # a random tiny model: tests the script, not a result
    python benchmarks/compression.py --report results.json  # regenerate the markdown from a JSON

For each scheme (none, int8, int4 with groups of 128, 64, 32) the model is wrapped with SpeculativeMoE at
--capacity with no predictor (LRU on demand), and the held-out windows are scored: perplexity, and the bytes
the copies moved per token. A short greedy generation is timed too (decode tok/s on this machine; on a CPU
there is no PCIe link, so it shows the cost of dequantizing, not the transfer saving). The bytes per expert
are also given for bfloat16 experts, what a GPU run holds. Simulated tok/s on a GPU: see the note the
markdown ends with.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
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
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None, help="only write the markdown from this JSON")
    return p.parse_args(argv)


def load(args):
    """(model, eval windows [N, T], description of model and text)."""
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import build_tiny  # the test suite's tiny models: smoke runs only

        model = build_tiny(args.tiny)
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


@torch.no_grad()
def mean_nll(call, windows: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy in nats over windows [N, T]."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i : i + batch]  # [b, T]
        logits = call(input_ids=x).logits.float()  # [b, T, V]
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(),
                                                   reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


def bf16_bytes(model, scheme: str) -> dict:
    """Bytes of one expert as a slot (bfloat16) and on the host under `scheme`, from the layouts alone."""
    from specmoe.runtime.adapters import ExpertTensorSpec, find_moe_layers
    from specmoe.runtime.compression import make_codec
    from specmoe.runtime.store import ExpertLayout

    specs = tuple(ExpertTensorSpec(s.name, s.shape, torch.bfloat16 if s.dtype.is_floating_point else s.dtype)
                  for s in find_moe_layers(model).specs)
    layout = ExpertLayout(specs)
    codec = make_codec(scheme, layout)
    host = codec.layout.nbytes if codec else layout.nbytes
    return {"slot_bytes": layout.nbytes, "host_expert_bytes": host, "ratio": layout.nbytes / host}


def run(args) -> dict:
    from tqdm import tqdm

    from specmoe import SpeculativeMoE
    from specmoe.bench import environment

    original, windows, described = load(args)
    rows = []
    for scheme in tqdm(args.schemes, desc="schemes"):
        model = copy.deepcopy(original)  # unwrap() gives back dequantized experts: never reuse a model
        smoe = SpeculativeMoE(model, None, cache_capacity=args.capacity, device="cpu",
                              compression=None if scheme == "none" else scheme)
        smoe.reset_stats()
        t0 = time.perf_counter()
        nll = mean_nll(smoe, windows, args.batch)
        eval_s = time.perf_counter() - t0
        stats, memory = smoe.stats, smoe.memory()
        row = {"scheme": scheme, "nll": nll, "perplexity": math.exp(nll), "eval_s": eval_s,
               "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
               "bytes_moved": stats.total.bytes_moved, "hit_rate": stats.hit_rate,
               "bytes_moved_per_token": stats.total.bytes_moved / windows.numel(),
               "slot_bytes": memory["slot_bytes"], "host_expert_bytes": memory["host_expert_bytes"],
               "host_store_bytes": memory["host_store_bytes"], "bfloat16": bf16_bytes(original, scheme)}
        if args.decode_tokens:
            prompt = windows[:2, :32]
            smoe.generate(input_ids=prompt, max_new_tokens=2, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            smoe.generate(input_ids=prompt, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
                          do_sample=False)
            row["generate_tok_s_cpu"] = 2 * args.decode_tokens / (time.perf_counter() - t0)
        smoe.unwrap()
        rows.append(row)
    base = next((r for r in rows if r["scheme"] == "none"), None)
    for r in rows:
        if base is not None:
            r["perplexity_change"] = r["perplexity"] / base["perplexity"] - 1
            r["bytes_moved_ratio"] = base["bytes_moved"] / r["bytes_moved"] if r["bytes_moved"] else None
    return {"benchmark": "compression", "environment": environment("cpu"), "described": described,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}


NOTE = ("For a simulated GPU: scale each expert swap's PCIe bytes by host_expert_bytes / slot_bytes of the "
        "bfloat16 columns, and add per swap a dequantization that reads host_expert_bytes and writes slot_bytes "
        "at device memory bandwidth (it runs on the copy stream, before the slot is ready). Hit rates and "
        "routing are nearly those of the uncompressed model (see hit rate above).")


def report(result: dict, md_path: Path) -> None:
    env, rows = result["environment"], result["rows"]
    lines = ["# Compressed expert storage", "",
             f"Model: {result['described']['model']}. Capacity {result['settings']['capacity']}, no predictor. "
             f"{result['settings']['windows']} held-out windows of {result['settings']['window']} tokens. "
             f"{env['device_name']}, torch {env['torch']}, git {env['git_sha']}.", "",
             "| scheme | perplexity | change | bytes moved / token | bytes moved vs none | hit rate | expert bytes, "
             "this run (slot / host) | bf16 expert bytes (slot / host, ratio) | generate tok/s (CPU) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["bfloat16"]
        change = f"{100 * r['perplexity_change']:+.2f}%" if "perplexity_change" in r else "-"
        ratio = f"{r['bytes_moved_ratio']:.2f}x less" if r.get("bytes_moved_ratio") else "-"
        tok_s = f"{r['generate_tok_s_cpu']:.1f}" if "generate_tok_s_cpu" in r else "-"
        lines.append(f"| {r['scheme']} | {r['perplexity']:.3f} | {change} | {r['bytes_moved_per_token'] / 1e3:.1f} kB | "
                     f"{ratio} | {r['hit_rate']:.3f} | {r['slot_bytes']} / {r['host_expert_bytes']} | "
                     f"{b['slot_bytes']} / {b['host_expert_bytes']} ({b['ratio']:.2f}x) | {tok_s} |")
    lines += ["", NOTE, ""]
    md_path.write_text("\n".join(lines))


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

"""Runtime overhead: SpeculativeMoE at cache capacity 1.0 with no predictor vs the unwrapped model.

Both copies of the model (same weights) run interleaved in one process; after warm-up every expert is
resident, so the ratio measures what the wrapper's bookkeeping costs per token. Goal: >= 0.9 on CPU,
>= 0.97 on GPU.

    python benchmarks/wrapper_overhead.py --model specmoe/reference/checkpoint --threads 1   # what README shows
    python benchmarks/wrapper_overhead.py --model PATH --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from specmoe import SpeculativeMoE
from specmoe.measure import environment, time_generate
from specmoe.io import write_json, write_text

RESULTS = Path(__file__).parent / "results"


def qwen15_geometry_model(hidden: int, dtype: torch.dtype, layers: int = 24) -> torch.nn.Module:
    """Qwen2-MoE with Qwen1.5-MoE-A2.7B's routing geometry (24 layers, 60 experts, top-4, shared expert)."""
    cfg = Qwen2MoeConfig(
        vocab_size=8192, hidden_size=hidden, intermediate_size=4 * hidden, moe_intermediate_size=hidden // 2 * 2,
        shared_expert_intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, num_experts=60, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def markdown(r: dict) -> str:
    """The README table, from the result JSON."""
    env, st = r["environment"], r["settings"]
    d = r["decode_tok_s"]
    return "\n".join([
        "| | decode tok/s (median) | time to first token |",
        "|---|---:|---:|",
        f"| unwrapped | {d['unwrapped']:.1f} | {r['ttft_s']['unwrapped'] * 1e3:.0f} ms |",
        f"| SpeculativeMoE, capacity 1.0, no predictor | {d['wrapped']:.1f} | {r['ttft_s']['wrapped'] * 1e3:.0f} ms |",
        f"| **ratio** | **{r['ratio_wrapped_over_unwrapped']:.3f}** (goal >= {r['goal']}) | |",
        "",
        f"{r['model']}, {st['dtype']}, prompt {st['prompt_len']} tokens, {st['new_tokens']} new, medians of "
        f"{st['repeats']} interleaved repeats; {env['device_name']}, {env['torch_threads']} torch threads, torch "
        f"{env['torch']}, transformers {env['transformers']}, git {env['git_sha']}.",
    ]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a local save_pretrained directory (default: Qwen1.5 geometry, random weights)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the default model")
    ap.add_argument("--layers", type=int, default=24, help="decoder layers of the default model (24: Qwen1.5's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/wrapper_overhead_<device>.json)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.model:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True).eval()
        name = args.model
    else:
        base = qwen15_geometry_model(args.hidden, dtype, args.layers)
        name = f"qwen2_moe L={args.layers} E=60 k=4 H={args.hidden} (random weights)"
    base.generation_config.eos_token_id = None
    wrapped_model = copy.deepcopy(base)
    base.to(device)
    smoe = SpeculativeMoE(wrapped_model, None, cache_capacity=1.0, device=device)

    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, base.config.vocab_size, (1, args.prompt_len), generator=g).to(device)}
    runs = {"unwrapped": [], "wrapped": []}
    ttft = {"unwrapped": [], "wrapped": []}
    for r in range(args.repeats):  # interleaved, so drift hits both alike
        for key, fn in (("unwrapped", base.generate), ("wrapped", smoe.generate)):
            t = time_generate(fn, inputs, args.new_tokens, repeats=1, warmup=1 if r == 0 else 0, device=device)
            runs[key].append(t.decode_tok_s)
            ttft[key].append(t.ttft_s)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratios = [w / u for w, u in zip(runs["wrapped"], runs["unwrapped"])]
    stats = smoe.stats
    result = {
        "benchmark": "wrapper_overhead",
        "model": name,
        "settings": {"capacity": 1.0, "predictor": None, "dtype": str(dtype), "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "repeats": args.repeats},
        "environment": environment(device),
        "decode_tok_s": med,
        "ttft_s": {k: statistics.median(v) for k, v in ttft.items()},
        "ratio_wrapped_over_unwrapped": med["wrapped"] / med["unwrapped"],
        "ratio_median_of_pairs": statistics.median(ratios),
        "runs_decode_tok_s": runs,
        "wrapped_stats": {k: v for k, v in stats.to_dict().items() if k != "per_layer"},
        "goal": 0.97 if device.type == "cuda" else 0.9,
    }
    out = args.out or RESULTS / f"wrapper_overhead_{device.type}.json"
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(result))
    print(json.dumps({k: result[k] for k in ("model", "decode_tok_s", "ratio_wrapped_over_unwrapped", "goal")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

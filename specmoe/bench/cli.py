"""`specmoe bench`: the side-by-side benchmark (see `specmoe.bench.compare`), written as JSON + markdown + PNG."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from ..io import check_outputs, check_stem, write_json
from ..runtime.capacity import capacity_arg, capacity_fraction
from ..runtime.config import OffloadConfig
from .compare import BUILTIN_PREDICTORS, BenchSettings, run_benchmark
from .report import bench_table, write_bench_report

logger = logging.getLogger(__name__)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a save_pretrained directory or a hub id (default: the built-in reference model)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--capacities", type=capacity_arg, nargs="+", default=[0.25, 0.5, 1.0],
                   help="device caches: fractions of all experts in (0, 1], slot counts, or budgets like 8GiB "
                        "(each run as the fraction of all experts it comes to; default 0.25 0.5 1.0)")
    p.add_argument("--predictors", nargs="+", default=list(BUILTIN_PREDICTORS),
                   help=f"any of {', '.join(BUILTIN_PREDICTORS)}, or directories of saved predictors")
    p.add_argument("--prompts", type=int, default=3, help="number of prompts (medians are over prompts)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (text prompts: at most)")
    p.add_argument("--prompts-file", type=Path, help="text file; prompts are its blank-line-separated paragraphs "
                   "(default: the reference model's held-out prompts, or seeded random token ids with --model)")
    p.add_argument("--new-tokens", type=int, default=32, help="N, tokens per timed generate call (default 32)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generate calls per variant (default 1)")
    p.add_argument("--lookahead", type=int, default=1, help="lookahead of the pre-gate and oracle predictors")
    p.add_argument("--no-unwrapped", action="store_true", help="skip the all-on-device run (e.g. it does not fit)")
    p.add_argument("--no-accelerate", action="store_true", help="skip accelerate's offload")
    p.add_argument("--accelerate-capacity", type=float, default=0.5,
                   help="accelerate gets the device budget of the cache at this capacity")
    p.add_argument("--accelerate-tokens", type=int, default=8, help="new tokens for the (slow) accelerate row")
    p.add_argument("--misses", default="fetch", choices=["fetch", "host", "auto"],
                   help="where missed experts run: copied to the device (fetch), computed on the host from the host "
                        "store (host), or per miss by a cost model measured at start-up (auto)")
    p.add_argument("--host-threads", type=int, default=None,
                   help="host kernel threads for misses run on the host (default: physical cores - 1, at most 8)")
    p.add_argument("--policy", default="default", help="eviction policy: lru, lfu, hit-density, default, or a "
                   "learned policy's directory (specmoe train --policy learned)")
    p.add_argument("--compile", action="store_true", help="compiled decode of the SpeculativeMoE rows")
    p.add_argument("--out", type=Path, default=Path("specmoe-bench"), help="output directory")
    p.add_argument("--name", default=None, help="file stem (default: bench_<device type>)")
    p.add_argument("--overwrite", action="store_true", help="replace output files already in --out")


def _load(args, dtype):
    """The model, a tokenizer (or None), default prompt texts (or None) and a display name."""
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..hub import resolve_model
        from ..runtime.safetensors_header import check_model_dir

        path = resolve_model(args.model)
        check_model_dir(path)  # config.json and every shard's header, each a one-line error naming the file
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
        return model, tokenizer, None, str(args.model)
    try:
        from ..reference.model import load_reference_model, load_reference_prompts, load_reference_tokenizer
    except ImportError:
        raise SystemExit("this checkout has no reference model (specmoe.reference.model); pass --model PATH") from None
    return (load_reference_model(device="cpu", dtype=dtype).eval(), load_reference_tokenizer(),
            load_reference_prompts(), "specmoe reference model")


def make_prompts(model, tokenizer, count: int, length: int, texts: list[str] | None = None,
                 seed: int = 0) -> tuple[list[dict], str]:
    """`count` prompts of at most `length` tokens from `texts` (needs a tokenizer), else seeded random token
    ids. Returns the prompts and a description of their source."""
    if texts is not None:
        if tokenizer is None:
            raise SystemExit("text prompts need a tokenizer, and none was found next to the model")
        prompts = [tokenizer(t, return_tensors="pt")["input_ids"][:, :length] for t in texts if t.strip()][:count]
        if len(prompts) < count:
            raise SystemExit(f"only {len(prompts)} non-empty prompts were given; need {count}")
        source = "text"
    else:
        g = torch.Generator().manual_seed(seed)
        vocab = model.config.get_text_config().vocab_size
        prompts = [torch.randint(3, vocab, (1, length), generator=g) for _ in range(count)]
        source = "random token ids"
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in prompts], source


def run_bench(args: argparse.Namespace) -> int:
    check_stem(args.name)  # the files stay inside --out
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stem = args.name or f"bench_{device.type}"
    check_outputs(args.out, [f"{stem}.{ext}" for ext in ("json", "md", "png", "routing.safetensors", "routing.safetensors.calls.json")],
                  args.overwrite)  # before any work
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    settings = BenchSettings(
        capacities=tuple(c if isinstance(c, float) else 1.0 for c in args.capacities), predictors=tuple(args.predictors), new_tokens=args.new_tokens,
        warmup=args.warmup, lookahead=args.lookahead, unwrapped=not args.no_unwrapped,
        accelerate=not args.no_accelerate, accelerate_capacity=args.accelerate_capacity,
        accelerate_new_tokens=args.accelerate_tokens,
        offload=OffloadConfig(misses=args.misses, host_threads=args.host_threads, policy=args.policy,
                              compile=args.compile))
    model, tokenizer, texts, name = _load(args, dtype)
    if not all(isinstance(c, float) for c in args.capacities):  # slot counts and budgets: as fractions
        from ..runtime.adapters import find_moe_layers
        from ..runtime.store import ExpertLayout

        moe = find_moe_layers(model)
        geo, nbytes = moe.geometry, ExpertLayout(moe.specs).nbytes
        settings = dataclasses.replace(settings, capacities=tuple(
            c if isinstance(c, float) else capacity_fraction(c, geo.num_layers, geo.num_experts, nbytes)
            for c in args.capacities))
    model.generation_config.eos_token_id = None  # every call generates exactly N tokens
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or 0
    if args.prompts_file is not None:
        texts = [p for p in args.prompts_file.read_text().split("\n\n") if p.strip()]
    prompts, source = make_prompts(model, tokenizer, args.prompts, args.prompt_len, texts)
    json_path = args.out / f"{stem}.json"

    def save(partial):
        write_json(json_path, {k: v for k, v in partial.items() if k != "routing"})

    result = run_benchmark(model, prompts, settings, device, model_name=name, on_variant=save)
    result["settings"].update(prompts=args.prompts, prompt_len=args.prompt_len, dtype=str(dtype),
                              prompts_source=str(args.prompts_file) if args.prompts_file else
                              ("reference model's held-out prompts" if texts else source))
    try:  # lets `specmoe simulate --validate` replay this run
        from ..sim.compute import load_op_counts
        from ..sim.shapes import ModelShape

        dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        shape = ModelShape.from_config(model.config, name=name, dtype=dt, expert_dtype=dt)
        result.update(shape=shape.to_dict(), op_counts=load_op_counts(shape.model_type).to_dict())
    except ValueError as err:
        logger.info("no simulator shape for this model (%s); --validate will need one", err)
    routing = result.pop("routing")
    if routing is not None:
        from ..sim.stream import RoutingStream

        passes = [ids for call in routing for ids in call]
        calls = [{"prompt": i, "new_tokens": n, "timed": timed, "passes": len(r)}
                 for (i, n, timed), r in zip(result["schedule"], routing)]
        stream_path = args.out / f"{stem}.routing.safetensors"
        RoutingStream.from_passes(passes, calls=calls, num_experts=result["geometry"]["num_experts"]).save(stream_path)
        result["routing_file"] = stream_path.name
    save(result)
    md, png = write_bench_report(json_path)
    print(bench_table(result))
    print(f"\nwrote {json_path}, {md}, {png}")
    return 0

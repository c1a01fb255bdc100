"""`specmoe collect`: run a model over text and write routing traces (safetensors shards + manifest)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

REFERENCE = "reference"


def load_model_and_tokenizer(spec: str, device=None, dtype: str | None = None):
    """('reference' or a local save_pretrained directory) -> (model in eval mode on `device`, tokenizer, name).

    Raises:
        FileNotFoundError: the reference checkpoint or the directory is missing.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype) if dtype else None
    if spec == REFERENCE:
        try:
            from ..reference.model import load_reference_model, load_reference_tokenizer
        except ImportError as err:
            raise FileNotFoundError(f"the reference model is not part of this installation ({err}); "
                                    "pass --model PATH to a save_pretrained directory") from None
        return load_reference_model(device=device, dtype=torch_dtype), load_reference_tokenizer(), "specmoe-reference"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hub import has_tokenizer, resolve_model
    from ..runtime.safetensors_header import check_model_dir

    path = resolve_model(spec)
    check_model_dir(path)  # config.json and every shard's header, each a one-line error naming the file
    if not has_tokenizer(path):  # before loading the model or scanning any text
        raise FileNotFoundError(f"{path} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); "
                                "collect needs the model's tokenizer: save it there with tokenizer.save_pretrained")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or torch.float32, local_files_only=True)
    return model.to(device).eval(), tokenizer, str(path)


def default_text(spec: str, pattern: str = "*.py") -> tuple[list[Path], dict]:
    """Text to collect on when none is given: for the reference model the files its training held out (so the
    traces are of text it never saw), else the Python standard library's sources.

    Returns:
        (files, a description for the manifest).
    """
    from .collect import default_text_root, text_files

    if spec == REFERENCE:
        try:
            from ..reference.corpus import load_corpus
        except ImportError:
            load_corpus = None
        if load_corpus is not None:
            corpus = load_corpus()
            files = [corpus.root / p for p in corpus.val]
            return files, {"text": "the reference model's held-out corpus files", "paths": [str(corpus.root)],
                           "held_out_files": len(files)}
    root = default_text_root()
    return text_files([root], pattern), {"text": "Python standard library sources", "paths": [str(root)],
                                         "pattern": pattern}


def add_collect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=REFERENCE, help="'reference' (default), a save_pretrained directory or a hub id")
    p.add_argument("--out", type=Path, required=True, help="trace directory to write")
    p.add_argument("--text", nargs="+", type=Path, default=None,
                   help="text files or directories (default: the reference model's held-out corpus files, or for "
                        "other models the Python standard library's sources)")
    p.add_argument("--pattern", default="*.py", help="file pattern inside directories (default: *.py)")
    p.add_argument("--window", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--max-tokens", type=int, default=100_000, help="tokens to collect (default: 100000)")
    p.add_argument("--hidden-layers", default="all", help="'all' (default), 'none' or a list like 0,1,5")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--shard-tokens", type=int, default=1 << 16, help="tokens per shard file")
    p.add_argument("--seed", type=int, default=0, help="seed of the file order")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype (default: float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a trace already in --out")


def run_collect(args: argparse.Namespace) -> int:
    from ..io import check_out_dir
    from .collect import collect_traces, text_files, token_windows

    check_out_dir(args.out, args.overwrite)  # before any work
    model, tokenizer, name = load_model_and_tokenizer(args.model, args.device, args.dtype)
    if args.text:
        files, described = text_files(args.text, args.pattern), {"paths": [str(p) for p in args.text],
                                                                  "pattern": args.pattern}
    else:
        files, described = default_text(args.model, args.pattern)
    windows, source = token_windows(tokenizer, files, args.window, args.max_tokens, seed=args.seed)
    source = {**described, **source}
    manifest = collect_traces(model, windows, args.out, model_name=name, source=source,
                              hidden_layers=args.hidden_layers, batch_size=args.batch_size,
                              shard_tokens=args.shard_tokens, overwrite=args.overwrite)
    print(f"wrote {manifest.num_tokens} tokens in {manifest.num_sequences} sequences ({len(manifest.shards)} shards, "
          f"{manifest.geometry}) to {args.out}")
    return 0


def add_import_routing_arguments(p: argparse.ArgumentParser) -> None:
    from .importers import FORMATS, RAGGED

    p.add_argument("format", choices=sorted(FORMATS),
                   help="jsonl: the interchange format (see README); moe-beyond: MoE-Beyond's CSVs "
                        "(DeepSeek-V2-Lite-Chat); speculative-moe: the speculative-moe vLLM logger's JSONL (Mixtral)")
    p.add_argument("inputs", nargs="+", type=Path, help="files, or directories of *.csv / *.jsonl")
    p.add_argument("--out", type=Path, required=True, help="trace directory to write")
    p.add_argument("--model", default=None, help="model id for the manifest (default: the format's model, or the "
                   "JSONL header's)")
    p.add_argument("--num-experts", type=int, default=None,
                   help="E (default: the format's model's; for jsonl the header's, else the largest id + 1)")
    p.add_argument("--hidden-size", type=int, default=None, help="H of the model (default: the format's model's)")
    p.add_argument("--dtype", default="unknown", help="the dtype the model ran in, if known (manifest only)")
    p.add_argument("--max-sequences", type=int, default=None, help="import only the first N sequences")
    p.add_argument("--ragged", choices=RAGGED, default="truncate",
                   help="a sequence whose layers end at different tokens: keep the tokens all layers have "
                        "(default, with a warning) or refuse it")
    p.add_argument("--shard-tokens", type=int, default=1 << 16, help="tokens per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace a trace already in --out")


def run_import_routing(args: argparse.Namespace) -> int:
    from ..io import check_out_dir
    from .importers import import_routing

    check_out_dir(args.out, args.overwrite)  # before any work
    try:
        manifest = import_routing(args.format, args.inputs, args.out, model=args.model, num_experts=args.num_experts,
                                  hidden_size=args.hidden_size, dtype=args.dtype, max_sequences=args.max_sequences,
                                  ragged=args.ragged, shard_tokens=args.shard_tokens, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise SystemExit(str(err)) from None
    dropped = manifest.source["records_dropped"]
    print(f"wrote {manifest.num_tokens} tokens in {manifest.num_sequences} sequences ({manifest.geometry}, "
          f"{manifest.model}, no hidden states" + (f", {dropped} ragged records dropped" if dropped else "") +
          f") to {args.out}")
    return 0

"""`specmoe generate`: load a model with its experts offloaded, generate from a prompt, stream the tokens.

    specmoe generate --prompt "def fibonacci(n):"                      # the packaged reference model
    specmoe generate --model Qwen/Qwen1.5-MoE-A2.7B --chat --prompt "Why is the sky blue?" --capacity 0.25

The model loads through `specmoe.load_offloaded` (experts streamed from the safetensors into the host store,
never the whole model in memory); tokens are printed as they come through transformers' `TextStreamer`, and
one line of runtime figures ends the output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REFERENCE = "reference"
PREDICTORS = ("pregate", "none")
COMPRESSION = ("none", "int8", "int4", "int4-g128")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a command that loads one model with its experts offloaded (generate, serve)."""
    from .runtime.capacity import capacity_arg

    p.add_argument("--model", default=REFERENCE,
                   help="'reference' (default: the packaged reference model), a save_pretrained directory or a hub id")
    p.add_argument("--capacity", default=0.5, type=capacity_arg,
                   help="device cache: a fraction of all experts in (0, 1], a slot count, or a budget like 8GiB "
                        "(default 0.5)")
    p.add_argument("--predictor", default="pregate",
                   help="pregate (default), none (on demand), or a saved predictor directory")
    p.add_argument("--compression", default="none", choices=COMPRESSION,
                   help="keep the experts compressed on the host (changes numerics; default none)")
    p.add_argument("--host-store", default="ram", choices=("ram", "mmap"),
                   help="ram: experts copied into host memory (default); mmap: read from the checkpoint files")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype (default: the checkpoint's; float32 for the reference model on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="compiled decode: dense parts as torch.compile graphs, the MoE layer calls between them")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")


def _predictor(name: str, geometry=None):
    from .predictors import make_predictor

    if name not in PREDICTORS and not (Path(name) / "config.json").is_file():
        raise FileNotFoundError(f"--predictor {name!r}: not one of {', '.join(PREDICTORS)} nor a saved predictor "
                                "directory (config.json + model.safetensors)")
    return make_predictor(name, geometry=geometry)


def load_model(args: argparse.Namespace):
    """(the wrapped model, its tokenizer) for the options of `add_model_arguments`, checked in the order a user
    can act on: the predictor, the model directory (config.json, then every shard's header), the model itself
    (an MoE model of a supported kind), then its tokenizer files.

    Raises:
        FileNotFoundError / ValueError / TypeError: one line each (the command line prints it).
    """
    import torch

    from .runtime.loading import load_offloaded

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    predictor = _predictor(args.predictor)
    if args.model == REFERENCE:
        from .reference.model import CHECKPOINT_DIR, default_dtype

        path, dtype = CHECKPOINT_DIR, dtype or default_dtype(device)
    else:
        from .hub import resolve_model
        from .runtime.safetensors_header import check_model_dir

        path = resolve_model(args.model)
        check_model_dir(path)
    smoe = load_offloaded(path, device=device, cache_capacity=args.capacity, predictor=predictor, dtype=dtype,
                          host_store=args.host_store,
                          compression=None if args.compression == "none" else args.compression,
                          compile=getattr(args, "compile", False))
    try:
        if args.model == REFERENCE:
            from .reference.model import load_reference_tokenizer

            return smoe, load_reference_tokenizer()
        from transformers import AutoTokenizer

        from .hub import TOKENIZER_FILES, has_tokenizer

        if not has_tokenizer(path):
            raise FileNotFoundError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the model's "
                                    "tokenizer there with tokenizer.save_pretrained")
        return smoe, AutoTokenizer.from_pretrained(path, local_files_only=True)
    except BaseException:
        smoe.unwrap()
        raise


def _stream_clock(tokenizer, device):
    """A `FirstTokenClock` that also prints tokens as they come (transformers' TextStreamer)."""
    from transformers import TextStreamer

    from .measure import FirstTokenClock

    class StreamClock(FirstTokenClock):
        def __init__(self):
            super().__init__(device)
            self.text = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

        def put(self, value):
            super().put(value)
            self.text.put(value)

        def end(self):
            self.text.end()

    return StreamClock()


def run_generate(args: argparse.Namespace) -> int:
    import torch

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    smoe, tokenizer = load_model(args)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {args.model} has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise ValueError("the prompt is empty after tokenization")
    streamer = _stream_clock(tokenizer, smoe.device)
    sys.stdout.write(args.prompt if not args.chat else "")
    sys.stdout.flush()
    try:
        with torch.no_grad():
            out = smoe.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer,
                                pad_token_id=pad_token_id(smoe, tokenizer))
    except KeyboardInterrupt:
        sys.stdout.write("\n")  # the interruption notice goes on a line of its own, not after the streamed text
        sys.stdout.flush()
        raise
    end = streamer.stop()
    new = out.shape[1] - ids.shape[1]
    decode_s = end - streamer.first_s if streamer.puts >= 2 else 0.0
    compiled = smoe.compile_stats
    if compiled is not None:  # the steps that compiled are reported apart, not as decode speed
        decode_s -= compiled["compile_s"]
    tok_s = f"{(new - 1) / decode_s:.1f} tok/s decode" if new > 1 and decode_s > 0 else "no decode step"
    print(f"[{new} tokens, {tok_s}; {smoe.stats.summary()}]")
    if compiled is not None:
        print("[compiled decode: {graphs} graphs in {compile_s:.1f} s ({backend}), not in the tok/s above]".format(
            **compiled))
    return 0


def pad_token_id(smoe, tokenizer) -> int | None:
    """The id generate pads with: the model's, else the tokenizer's pad or end-of-sequence token."""
    return smoe.model.generation_config.pad_token_id or tokenizer.pad_token_id or tokenizer.eos_token_id

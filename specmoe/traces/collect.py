"""Collect routing traces: run a model over fixed-length windows of text and write them as shards.

Plain forward passes (prefill only) over windows of W tokens: each window is one sequence of the trace.
Routing comes from `capture_routing`, so what is recorded is what the model's routers chose.
"""

# Shape legend: S sequences (windows), W window length, L MoE layers, k top-k, H hidden

from __future__ import annotations

import logging
import random
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..runtime.adapters import find_moe_layers
from .capture import capture_routing
from .shards import ROUTERS_NAME, TraceManifest, TraceWriter, write_routers

logger = logging.getLogger(__name__)


def default_text_root() -> Path:
    """The Python standard library's sources: text every machine has."""
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(paths: Sequence, pattern: str = "*.py") -> list[Path]:
    """Files under `paths` (files, or directories searched recursively for `pattern`), sorted, deduplicated.

    Raises:
        FileNotFoundError: a path does not exist, or nothing matched.
    """
    found = set()
    for p in map(Path, paths):
        if p.is_file():
            found.add(p)
        elif p.is_dir():
            found.update(f for f in p.rglob(pattern) if f.is_file())
        else:
            raise FileNotFoundError(f"text source not found: {p}")
    if not found:
        raise FileNotFoundError(f"no files matching {pattern!r} under {[str(p) for p in paths]}")
    return sorted(found)


def token_windows(tokenizer, files: Sequence[Path], window: int, max_tokens: int, seed: int = 0,
                  progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Cut the files' tokens into non-overlapping windows of `window` tokens (a window never spans two files).

    Files are visited in a seeded shuffled order until `max_tokens` tokens are gathered.

    Returns:
        (windows [S, W] long, a description of the source for the manifest).

    Raises:
        ValueError: window or max_tokens < 1, or no file yields a whole window.
    """
    if window < 1 or max_tokens < window:
        raise ValueError(f"need window >= 1 and max_tokens >= window, got window={window}, max_tokens={max_tokens}")
    order = list(files)
    random.Random(seed).shuffle(order)
    windows, used, total = [], 0, 0
    bar = tqdm(total=max_tokens, desc="tokenize", unit="tok", disable=not progress)
    for f in order:
        text = f.read_text(encoding="utf-8", errors="replace")
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        n = min(ids.numel() // window, (max_tokens - total) // window)
        if n == 0:
            continue
        windows.append(ids[: n * window].view(n, window))
        used += 1
        total += n * window
        bar.update(n * window)
        if total + window > max_tokens:
            break
    bar.close()
    if not windows:
        raise ValueError(f"no file among {len(files)} has {window} tokens; use a shorter --window")
    source = {"files_available": len(files), "files_used": used, "window": window, "tokens": total,
              "seed": seed, "first_file": str(order[0]), "last_file": str(order[used - 1] if used else order[0])}
    return torch.cat(windows), source


def parse_hidden_layers(spec, num_layers: int) -> tuple[int, ...]:
    """'all' | 'none' | '0,3,5' | an iterable of ints -> sorted layer indices.

    Raises:
        ValueError: a layer outside 0..num_layers-1 or an unreadable spec.
    """
    if isinstance(spec, str):
        spec = spec.strip().lower()
        if spec == "all":
            return tuple(range(num_layers))
        if spec in ("none", ""):
            return ()
        try:
            spec = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(f"hidden layers {spec!r}: write 'all', 'none' or a comma list like '0,1,5'") from None
    layers = tuple(sorted(set(int(x) for x in spec)))
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise ValueError(f"hidden layers {bad} are not MoE layers (the model has 0..{num_layers - 1})")
    return layers


@torch.no_grad()
def collect_traces(model: nn.Module, windows: torch.Tensor | Iterable[torch.Tensor], out, *, model_name: str,
                   source: dict | None = None, hidden_layers="all", batch_size: int = 8,
                   shard_tokens: int = 1 << 16, overwrite: bool = False, progress: bool = True) -> TraceManifest:
    """Run `model` over token windows and write a trace directory.

    Args:
        model: a decoder-only transformers MoE model, on the device it should run on.
        windows: [S, W] token ids (or an iterable of [W] rows); each row is one sequence.
        out: the trace directory.
        model_name: recorded in the manifest.
        source: where the text came from, recorded in the manifest.
        hidden_layers: MoE layers whose entering hidden states are kept ('all', 'none', or layer indices).
        batch_size: windows per forward pass.
        shard_tokens: target tokens per shard.
        overwrite: replace a trace already in `out`.

    Returns:
        The manifest written.

    Raises:
        TypeError: an encoder-decoder model (collect runs decoder-only models).
        FileExistsError: `out` holds a trace and `overwrite` is False.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError("collect_traces runs decoder-only models; encoder-decoder traces are not supported")
    moe = find_moe_layers(model)
    geo = moe.geometry
    hidden_layers = parse_hidden_layers(hidden_layers, geo.num_layers)
    windows = windows if isinstance(windows, torch.Tensor) else torch.stack(list(windows))
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be [S, W] token ids with S >= 1, got shape {tuple(windows.shape)}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    manifest = TraceManifest(model=model_name, geometry=geo, dtype=str(dtype).removeprefix("torch."),
                             source=dict(source or {}), hidden_layers=hidden_layers, routers=ROUTERS_NAME)
    writer = TraceWriter(out, manifest, shard_tokens=shard_tokens, overwrite=overwrite)
    write_routers(Path(out) / ROUTERS_NAME, [layer.router for layer in moe.layers])
    W = windows.shape[1]
    with capture_routing(model, hidden_layers, moe=moe) as cap:
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="collect", unit="batch", disable=not progress):
            batch = windows[start : start + batch_size].to(device)  # [B, W]
            model(input_ids=batch, use_cache=False)
            if len(cap.passes) != 1:
                raise RuntimeError(f"expected one routed pass per forward, saw {len(cap.passes)}")
            routed = cap.passes.pop()
            cap.passes.clear()
            order = routed.weights.argsort(dim=-1, descending=True, stable=True)  # [B*W, L, k] primary first
            ids, weights = routed.ids.gather(-1, order), routed.weights.gather(-1, order)
            for b in range(batch.shape[0]):
                rows = slice(b * W, (b + 1) * W)
                writer.add(ids[rows], weights[rows], {layer: routed.hidden[layer][rows] for layer in hidden_layers})
    manifest = writer.close()
    logger.info("collected %d tokens in %d sequences into %s", manifest.num_tokens, manifest.num_sequences, out)
    return manifest

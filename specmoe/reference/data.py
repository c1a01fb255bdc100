"""Token streams from documents, random training batches, and fixed evaluation windows."""

# Shape legend: N windows, T tokens per window

from __future__ import annotations

import torch


def encode_documents(tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Tokenize documents into one stream, each document followed by EOS. Returns [n] int32."""
    eos = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: no length warnings, parallel batches
    ids: list[int] = []
    for i in range(0, len(texts), batch_size):
        for enc in backend.encode_batch(texts[i : i + batch_size], add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def random_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` windows of `length` tokens at random offsets of `stream`. Returns [batch, length] long."""
    if stream.numel() <= length:
        raise ValueError(f"a stream of {stream.numel()} tokens is too short for windows of {length}")
    starts = torch.randint(0, stream.numel() - length, (batch,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()]).long()


def eval_windows(stream: torch.Tensor, length: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows spread evenly over `stream` (the same every call). Returns [N, length] long.

    Raises:
        ValueError: the stream holds no full window.
    """
    available = stream.numel() // length
    if available < 1:
        raise ValueError(f"a stream of {stream.numel()} tokens holds no window of {length}")
    n = min(available, max_windows)
    starts = torch.linspace(0, (available - 1) * length, n).long() // length * length
    return torch.stack([stream[s : s + length] for s in starts.tolist()]).long()  # [N, T]

"""Timing generate calls: time to first token and decode tokens/s, medians over repeats, warm-up excluded.

Decode speed is (N - 1) / (t(N tokens) - t(1 token)): the prefill and first token cancel out.
On CUDA a call is timed with CUDA events recorded after a device sync, and the end event is waited on.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class GenerateTiming:
    ttft_s: float  # median time to first token (prefill + one step)
    decode_tok_s: float  # median decode tokens/s
    new_tokens: int
    ttft_runs: list[float] = field(default_factory=list)
    total_runs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return vars(self).copy()


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device) -> tuple[float, object]:
    """Seconds one call takes (CUDA events on a CUDA device, perf_counter elsewhere), and its result."""
    device = torch.device(device)
    sync_device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    return timed_call(fn, device)[0]


def time_generate(
    generate: Callable, inputs: dict, new_tokens: int, repeats: int = 5, warmup: int = 1, device="cpu",
    between: Callable[[], None] | None = None,
) -> GenerateTiming:
    """Time `generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)` for n = 1 and n = new_tokens.

    Args:
        between: called before every timed run (e.g. to reset a cache to a known state); not timed.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 to separate decode from prefill")
    device = torch.device(device)

    def run(n):
        with torch.no_grad():
            return generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    for _ in range(warmup):
        run(new_tokens)
    ttft, total = [], []
    for _ in range(repeats):
        if between:
            between()
        ttft.append(_timed(lambda: run(1), device))
        if between:
            between()
        total.append(_timed(lambda: run(new_tokens), device))
    decode = [(new_tokens - 1) / max(t - f, 1e-9) for t, f in zip(total, ttft)]
    return GenerateTiming(statistics.median(ttft), statistics.median(decode), new_tokens, ttft, total)

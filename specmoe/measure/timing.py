"""The one clock of specmoe's measurements: a call, a generate call, a kernel, the first token of a stream.

- `timed_call`: seconds of one call (CUDA events after a device sync on CUDA, perf_counter elsewhere).
- `time_generate`: time to first token and decode tokens/s, medians over repeats, warm-up excluded. Decode
  speed is (N - 1) / (t(N tokens) - t(1 token)): the prefill and first token cancel out.
- `time_fn`: median microseconds of a small function (kernels), the L2 cache flushed before each run.
- `FirstTokenClock`: a generate streamer that marks when the first new token exists.
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


def sync_device(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    device = torch.device(device)
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


class _L2Flush:
    def __init__(self, device: torch.device, nbytes: int = 256 * 2**20):
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self):
        if self.buf is not None:
            self.buf.zero_()


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, repeats: int = 20,
            flush_l2: bool = True) -> dict:
    """Median time of `fn` in microseconds (CUDA events on CUDA, perf_counter elsewhere).

    Args:
        flush_l2: on CUDA, overwrite 256 MiB before each run, so weights come from HBM as they do when a
            layer's experts are used once per token.

    Returns:
        {"median_us", "min_us", "repeats"}.
    """
    device = torch.device(device)
    flush = _L2Flush(device) if flush_l2 else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            flush()
            times.append(timed_call(fn, device)[0] * 1e6)
    return {"median_us": statistics.median(times), "min_us": min(times), "repeats": repeats}


class FirstTokenClock:
    """A generate streamer that marks the first new token: the time then, and `on_first()`'s value then.

    Example:
        clock = FirstTokenClock(device)
        t0 = clock.start()
        model.generate(..., streamer=clock)
        ttft, decode_s = clock.first_s - t0, clock.stop() - clock.first_s
    """

    def __init__(self, device, on_first: Callable[[], object] | None = None):
        self.device = torch.device(device)
        self.on_first = on_first
        self.puts, self.first_s, self.first_value = 0, 0.0, None

    def now(self) -> float:
        """perf_counter after the device's queued work is done."""
        sync_device(self.device)
        return time.perf_counter()

    def start(self) -> float:
        self.puts, self.first_s, self.first_value = 0, 0.0, None
        return self.now()

    def stop(self) -> float:
        return self.now()

    def put(self, value):
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt; the second, the prefill's token
            self.first_s = self.now()
            self.first_value = self.on_first() if self.on_first is not None else None

    def end(self):
        pass

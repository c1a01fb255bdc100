"""A bounded staging ring for host stores that read experts from files on demand (`host_store="mmap"`).

`FileStore` keeps the experts in the checkpoint files. A copy into a cache slot first reads the expert's
bytes into one of a few host buffers (pinned on CUDA, so the host->device copy is asynchronous), then the
copy engine moves that buffer into the slot. A buffer is reused only once the copy out of it has landed
(the scheduler never gives a slot a new copy while its last one is in flight, so waiting for the slot's
latest copy is enough). Prefetch candidates that wait behind the in-flight bound are read ahead from disk on
worker threads, into buffers of the same ring, so that their copies find the bytes ready.

Any buffer whose copy has landed is taken (not strictly the next in turn), so one slow copy does not hold up
the others; the host waits only when every free buffer's copy is still in flight. Host memory stays bounded:
`size` buffers of one expert each, whatever the number of experts touched; `sizes` says how many a scheduler
needs so that the host never waits on the ring in steady state (prefetches in flight + reads ahead + one
layer's demand copies).
"""

# Shape legend: N ring buffers, B bytes per expert

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

Key = tuple[int, int]  # (layer, expert)


def sizes(max_inflight: int, top_k: int) -> tuple[int, int]:
    """(ring size, buffers reads ahead may hold) for a scheduler with `max_inflight` prefetches in flight and
    `top_k` demand copies per layer call: each copy in flight holds its buffer until it lands, and as many reads
    ahead as prefetches may be in flight wait their turn."""
    ahead = max(1, max_inflight)
    return max(2, max_inflight + ahead + max(1, top_k)), ahead


class StagingRing:
    """`size` host buffers [N, B] between a file-backed store and the copy engine.

    Args:
        store: a store with `layout.nbytes` and `read_into(key, buffer)` (`runtime.store.FileStore`).
        engine: the copy engine (`ready(slot)`, `wait_host(slot)`).
        size: buffers in the ring (at least 2); at most `ahead_max` of them (default half) hold reads ahead.
            `sizes` gives what a scheduler with an in-flight bound needs.
        pinned: page-locked buffers (CUDA: asynchronous host->device copies).
        workers: threads reading ahead (0: no read-ahead).

    Raises:
        ValueError: size < 2 or workers < 0.
    """

    def __init__(self, store, engine, size: int = 8, pinned: bool = False, workers: int = 2):
        if size < 2 or workers < 0:
            raise ValueError(f"a staging ring needs size >= 2 and workers >= 0, got size={size}, workers={workers}")
        self.store, self.engine, self.size = store, engine, size
        self.buffers = torch.empty(size, store.layout.nbytes, dtype=torch.uint8, pin_memory=pinned)  # [N, B]
        self.fed: list[int | None] = [None] * size  # the slot each buffer was last copied into
        self.ahead: dict[Key, tuple[int, Future]] = {}  # key -> (buffer, its read), not yet copied
        self._next = 0
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="specmoe-read-ahead") if workers else None
        self.ahead_max = size // 2  # buffers reads ahead may hold (the owner may set it: `sizes`)
        self.reads = self.reads_ahead = self.used_ahead = self.waits = 0  # counters (tests, benchmarks)

    def _take(self) -> int:
        """A buffer that no read ahead holds and whose copy out has landed (any of them, looked for from the
        one after the last taken); when every such copy is still in flight, the host waits for the one taken
        longest ago (`engine.wait_host`, counted as host-side blocking)."""
        held = {i for i, _ in self.ahead.values()} if self.ahead else ()
        ready, fed, size = self.engine.ready, self.fed, self.size
        oldest = None
        for step in range(size):
            i = (self._next + step) % size
            if i in held:
                continue
            slot = fed[i]
            if slot is None or ready(slot):
                break
            if oldest is None:
                oldest = i
        else:
            if oldest is None:  # unreachable: read-aheads hold at most ahead_max < size buffers
                raise RuntimeError("every staging buffer is held by a read ahead")
            i = oldest
            self.engine.wait_host(fed[i])
            self.waits += 1
        self._next = (i + 1) % size
        fed[i] = None
        return i

    def source(self, key: Key) -> tuple[int, torch.Tensor]:
        """(buffer index, [B] bytes of `key`): read ahead already, or read now into the next free buffer."""
        got = self.ahead.pop(key, None)
        if got is not None:
            i, future = got
            future.result()
            self.used_ahead += 1
            return i, self.buffers[i]
        i = self._take()
        self.store.read_into(key, self.buffers[i])
        self.reads += 1
        return i, self.buffers[i]

    def copied(self, i: int, slot: int) -> None:
        """Buffer `i` was just copied into `slot`: reuse it once that copy has landed."""
        self.fed[i] = slot

    def read_ahead(self, keys: list[Key]) -> None:
        """Start reading `keys` (best first) on the workers; reads ahead of keys no longer wanted are dropped."""
        if self._pool is None:
            return
        wanted = set(keys)
        for key in [k for k in self.ahead if k not in wanted]:
            self.ahead.pop(key)[1].result()  # let the read finish before its buffer is reused
        for key in keys:
            if len(self.ahead) >= self.ahead_max:
                break
            if key in self.ahead:
                continue
            i = self._take()
            self.ahead[key] = (i, self._pool.submit(self.store.read_into, key, self.buffers[i]))
            self.reads_ahead += 1

    def close(self) -> None:
        for _, future in self.ahead.values():
            future.result()
        self.ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

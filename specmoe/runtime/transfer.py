"""Copy engines: move expert buffers from the host store into cache slots.

All engines share one interface, so the wrapper's logic is the same on CUDA and in CPU-only CI:

* ``copy_in(slot, dst, src, demand)`` starts a copy into a slot once the compute that last read the slot
  is done; demand copies go before queued prefetches.
* ``ready(slot)`` says, without waiting, whether the last copy into the slot has finished.
* ``wait(slots)`` makes compute wait for copies into those slots (on CUDA the compute *stream* waits on
  each slot's event; the host does not): counted as ``stall_s``;
* ``wait_host(slot)`` blocks the host until a copy has landed (a slot or staging buffer needed again):
  counted apart as ``host_wait_s``, with copies from pageable memory that block the host on CUDA.
* ``release(slots)`` marks that compute issued so far is the last to read those slots.

CUDA: a high-priority demand stream and a prefetch stream, so a demand copy never queues behind prefetches in
one stream's order; one ready event and one release event per slot; at most 2 * 64 event pairs of timed compute
waits held before the finished ones are read.
CPU: ``SyncCopyEngine`` copies at once; ``ThreadedCopyEngine`` copies on a worker thread with a priority queue.

With compressed experts (compression.py) the store and the slots share the compressed layout, so a copy is
the same single copy of fewer bytes; nothing here knows about compression.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time

import torch


class CopyEngine:
    kind = "base"

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.stall_s = 0.0  # time compute spent waiting for copies (resolved lazily on CUDA)
        self.waits = 0  # how many times compute had to wait
        self.host_wait_s = 0.0  # time the HOST spent blocked on copies (slot and staging waits, pageable copies)
        self.host_waits = 0

    def copy_in(self, slot: int, dst: torch.Tensor, src: torch.Tensor, demand: bool) -> None:
        raise NotImplementedError

    def ready(self, slot: int) -> bool:
        return True

    def wait(self, slots) -> None:
        pass

    def wait_host(self, slot: int) -> None:
        """Block the host until the copy into `slot` is done (only when no slot can be evicted otherwise)."""

    def release(self, slots) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def stall_seconds(self) -> float:
        return self.stall_s

    def reset_stall(self) -> None:
        self.synchronize()
        self.stall_s = 0.0
        self.waits = 0
        self.host_wait_s = 0.0
        self.host_waits = 0

    def close(self) -> None:
        pass


class SyncCopyEngine(CopyEngine):
    """Copies at once on the calling thread. Every copy is on compute's critical path and counts as stall."""

    kind = "sync"

    def copy_in(self, slot, dst, src, demand):
        t0 = time.perf_counter()
        dst.copy_(src)
        self.stall_s += time.perf_counter() - t0
        self.waits += 1


class ThreadedCopyEngine(CopyEngine):
    """Copies on one worker thread; demand copies jump the queue of prefetches. Compute waits on the host."""

    kind = "thread"

    def __init__(self, num_slots: int):
        super().__init__(num_slots)
        self._done = [threading.Event() for _ in range(num_slots)]
        for ev in self._done:
            ev.set()
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="specmoe-copy", daemon=True)
        self._worker.start()

    def _run(self):
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            slot, dst, src = job
            try:
                dst.copy_(src)
            except BaseException as err:  # surfaced on the next wait()
                self._error = err
            self._done[slot].set()

    def copy_in(self, slot, dst, src, demand):
        self._done[slot].clear()
        self._queue.put((0 if demand else 1, next(self._seq), (slot, dst, src)))

    def ready(self, slot):
        return self._done[slot].is_set()

    def _block(self, slot) -> float | None:
        """Wait until the copy into `slot` has landed: the seconds waited, None if it already had."""
        if self._done[slot].is_set():
            return None
        t0 = time.perf_counter()
        self._done[slot].wait()
        return time.perf_counter() - t0

    def wait(self, slots):
        for s in slots:
            waited = self._block(s)
            if waited is not None:
                self.stall_s += waited
                self.waits += 1
        self._raise()

    def wait_host(self, slot):
        waited = self._block(slot)
        if waited is not None:
            self.host_wait_s += waited
            self.host_waits += 1
        self._raise()

    def _raise(self):
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError("an expert copy failed on the copy thread") from err

    def synchronize(self):
        for ev in self._done:
            ev.wait()
        self._raise()

    def close(self):
        self._queue.put((-1, -1, None))
        self._worker.join(timeout=5)

    def __deepcopy__(self, memo):
        raise TypeError("a SpeculativeMoE with transfer='thread' cannot be deep-copied (its copy thread cannot); "
                        "deep-copy the model before wrapping, or after unwrap(), and wrap the copy")


class CudaCopyEngine(CopyEngine):
    """Copies on dedicated CUDA streams; compute waits on per-slot events, never the host."""

    kind = "cuda"

    def __init__(self, num_slots: int, device: torch.device):
        super().__init__(num_slots)
        self.device = device
        low, high = torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream, "priority_range") else (0, -1)
        self.demand_stream = torch.cuda.Stream(device, priority=high)
        self.prefetch_stream = torch.cuda.Stream(device, priority=low)
        self._ready = [torch.cuda.Event() for _ in range(num_slots)]  # recorded after a copy into the slot
        self._released = [torch.cuda.Event() for _ in range(num_slots)]  # recorded after compute read the slot
        self._recorded = [False] * num_slots
        self._timing: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def copy_in(self, slot, dst, src, demand):
        stream = self.demand_stream if demand else self.prefetch_stream
        stream.wait_event(self._released[slot])  # never overwrite a slot compute may still read
        pageable = src.device.type == "cpu" and not src.is_pinned()  # the host blocks until it is copied
        t0 = time.perf_counter() if pageable else 0.0
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            self._ready[slot].record(stream)
        self._recorded[slot] = True
        if pageable:
            self.host_wait_s += time.perf_counter() - t0
            self.host_waits += 1

    def ready(self, slot):
        return not self._recorded[slot] or self._ready[slot].query()

    def wait(self, slots):
        pending = [s for s in slots if not self.ready(s)]
        if not pending:
            return
        compute = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute)
        for s in pending:
            compute.wait_event(self._ready[s])
        end.record(compute)
        self._timing.append((start, end))
        self.waits += 1
        if len(self._timing) > self.MAX_TIMING:  # bounded: fold the waits that have finished into stall_s
            self._collect(block=len(self._timing) > 2 * self.MAX_TIMING)

    MAX_TIMING = 64  # event pairs of compute waits kept before the finished ones are read

    def _collect(self, block: bool) -> None:
        """Add the finished compute waits to stall_s (all of them, waiting for the last, when `block`)."""
        if block:
            self._timing[-1][1].synchronize()
        kept = []
        for a, b in self._timing:
            if b.query():
                self.stall_s += a.elapsed_time(b) / 1e3
            else:
                kept.append((a, b))
        self._timing = kept

    def wait_host(self, slot):
        if self._recorded[slot] and not self._ready[slot].query():
            t0 = time.perf_counter()
            self._ready[slot].synchronize()
            self.host_wait_s += time.perf_counter() - t0
            self.host_waits += 1

    def release(self, slots):
        compute = torch.cuda.current_stream(self.device)
        for s in slots:
            self._released[s].record(compute)

    def synchronize(self):
        self.demand_stream.synchronize()
        self.prefetch_stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()

    def stall_seconds(self):
        if self._timing:
            self._collect(block=True)
        return self.stall_s

    def reset_stall(self):
        super().reset_stall()
        self._timing.clear()


class StoreToPool:
    """A copy engine as the scheduler sees it (`scheduler.SlotEngine`): copies named by expert key, from the
    host store into the slot pool."""

    def __init__(self, engine: CopyEngine, store, pool_data: torch.Tensor, max_inflight: int | None = None,
                 top_k: int = 1):
        self.engine, self.store, self.pool_data = engine, store, pool_data  # pool_data [S, B]
        self.ready, self.wait, self.wait_host, self.release = engine.ready, engine.wait, engine.wait_host, engine.release
        staging = getattr(store, "staging", None)  # file-backed stores read through a bounded ring (staging.py)
        self.ring = None
        if staging is not None:
            pinned = pool_data.device.type == "cuda"
            if max_inflight is None:
                self.ring = staging(engine, pinned=pinned)
            else:  # sized so that copies in flight, reads ahead and one call's demand copies each have a buffer
                from .staging import sizes

                size, ahead = sizes(max_inflight, top_k)
                self.ring = staging(engine, pinned=pinned, size=size)
                self.ring.ahead_max = ahead
        if self.ring is not None:
            self.read_ahead = self.ring.read_ahead  # the scheduler hands it the prefetches waiting their turn

    def copy_in(self, slot: int, key: tuple[int, int], demand: bool) -> None:
        if self.ring is None:
            self.engine.copy_in(slot, self.pool_data[slot], self.store[key], demand=demand)
            return
        i, src = self.ring.source(key)
        self.engine.copy_in(slot, self.pool_data[slot], src, demand=demand)
        self.ring.copied(i, slot)


ENGINES = ("sync", "thread", "cuda")


def make_engine(kind: str | None, num_slots: int, device: torch.device) -> CopyEngine:
    """`kind` None picks "cuda" for a CUDA device and "sync" otherwise."""
    kind = kind or ("cuda" if device.type == "cuda" else "sync")
    if kind == "cuda":
        if device.type != "cuda":
            raise ValueError(f"transfer='cuda' needs a CUDA device, the cache is on {device}")
        return CudaCopyEngine(num_slots, device)
    if kind == "sync":
        return SyncCopyEngine(num_slots)
    if kind == "thread":
        if device.type == "cuda":
            raise ValueError("transfer='thread' is the CPU engine; on CUDA use 'cuda' (streams and events)")
        return ThreadedCopyEngine(num_slots)
    raise ValueError(f"unknown transfer engine {kind!r}; choose one of {ENGINES}")

import threading
import time

import pytest
import torch

from specmoe.runtime.transfer import SyncCopyEngine, ThreadedCopyEngine, make_engine


class RecordingEngine(ThreadedCopyEngine):
    """Blocks the worker on its first copy so that later copies queue up, and records the order."""

    def __init__(self, n):
        self.order, self.gate, self.started = [], threading.Event(), threading.Event()
        super().__init__(n)

    def _run(self):
        first = True
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            if first:
                self.started.set()
                self.gate.wait(5)
                first = False
            slot, dst, src = job
            dst.copy_(src)
            self.order.append(slot)
            self._done[slot].set()


def test_demand_copies_jump_queued_prefetches():
    eng = RecordingEngine(5)
    dst, src = torch.zeros(5, 4), torch.arange(20.0).view(5, 4)
    eng.copy_in(0, dst[0], src[0], demand=False)  # the worker takes this one and blocks
    assert eng.started.wait(5)
    for s in (1, 2, 3):
        eng.copy_in(s, dst[s], src[s], demand=False)
    eng.copy_in(4, dst[4], src[4], demand=True)
    assert not eng.ready(4)
    eng.gate.set()
    eng.wait([4])
    eng.synchronize()
    assert eng.order == [0, 4, 1, 2, 3]
    assert torch.equal(dst, src)
    assert eng.stall_seconds() > 0 and eng.waits >= 1
    eng.close()


def test_sync_engine_copies_at_once_and_counts_stall():
    eng = SyncCopyEngine(1)
    dst = torch.zeros(1 << 20)
    t0 = time.perf_counter()
    eng.copy_in(0, dst, torch.ones(1 << 20), demand=True)
    wall = time.perf_counter() - t0
    assert eng.ready(0) and torch.all(dst == 1) and eng.waits == 1
    first = eng.stall_seconds()
    assert 0 < first <= wall  # the copy itself is the stall: counted, and not more than the call took
    eng.copy_in(0, dst, torch.full((1 << 20,), 2.0), demand=False)  # a prefetch stalls too on this engine
    assert eng.stall_seconds() > first and eng.waits == 2 and torch.all(dst == 2)
    eng.reset_stall()
    assert eng.stall_seconds() == 0 and eng.waits == 0


def test_engine_choice():
    cpu = torch.device("cpu")
    assert make_engine(None, 2, cpu).kind == "sync"
    assert make_engine("thread", 2, cpu).kind == "thread"
    with pytest.raises(ValueError, match="CUDA"):
        make_engine("cuda", 2, cpu)
    with pytest.raises(ValueError, match="unknown"):
        make_engine("dma", 2, cpu)

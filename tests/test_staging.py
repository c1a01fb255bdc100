"""The staging ring between a file-backed store and the copy engine: bounded, reused only after its copy
landed, prefetches read ahead on worker threads."""

import threading

import pytest
import torch
from conftest import build_tiny, make_inputs

from specmoe import load_offloaded
from specmoe.predictors import PreGatePredictor
from specmoe.runtime.staging import StagingRing, sizes
from specmoe.runtime.store import ExpertLayout


class FakeStore:
    """Experts whose bytes name them; records which threads read."""

    def __init__(self, nbytes=16):
        self.layout = type("L", (), {"nbytes": nbytes})()
        self.threads = []

    def read_into(self, key, buffer):
        self.threads.append(threading.current_thread().name)
        buffer.fill_(key[0] * 16 + key[1])


class FakeEngine:
    """Copies land only when the host waits for them."""

    def __init__(self):
        self.landed, self.waited = set(), []

    def ready(self, slot):
        return slot in self.landed

    def wait_host(self, slot):
        self.waited.append(slot)
        self.landed.add(slot)


def test_a_buffer_is_reused_only_after_the_copy_out_of_it_landed():
    store, engine = FakeStore(), FakeEngine()
    ring = StagingRing(store, engine, size=2, workers=0)
    i, buf = ring.source((0, 1))
    assert int(buf[0]) == 1
    ring.copied(i, slot=5)
    j, _ = ring.source((0, 2))
    ring.copied(j, slot=6)
    assert engine.waited == []  # two buffers, two copies in flight: no wait yet
    k, buf = ring.source((1, 3))  # wraps onto the first buffer: its copy into slot 5 must land first
    assert k == i and engine.waited == [5] and int(buf[0]) == 19


def test_any_landed_buffer_is_taken_not_only_the_next_in_turn():
    store, engine = FakeStore(), FakeEngine()
    ring = StagingRing(store, engine, size=3, workers=0)
    for key, slot in (((0, 1), 5), ((0, 2), 6), ((0, 3), 7)):
        i, _ = ring.source(key)
        ring.copied(i, slot)
    engine.landed.add(7)  # the copy out of the LAST buffer landed first; the first two are in flight
    i, buf = ring.source((1, 1))
    assert i == 2 and engine.waited == [] and ring.waits == 0 and int(buf[0]) == 17
    ring.copied(i, 8)
    ring.source((1, 2))  # none landed now: the host waits for the one taken longest ago, counted
    assert engine.waited == [5] and ring.waits == 1


def test_reads_ahead_run_on_workers_are_used_once_and_dropped_when_no_longer_wanted():
    store, engine = FakeStore(), FakeEngine()
    ring = StagingRing(store, engine, size=4, workers=1)
    ring.read_ahead([(0, 1), (0, 2), (0, 3)])
    assert len(ring.ahead) == 2  # at most half the ring holds reads ahead
    i, buf = ring.source((0, 2))
    assert int(buf[0]) == 2 and ring.used_ahead == 1 and ring.reads == 0
    ring.copied(i, slot=0)
    ring.read_ahead([(0, 3)])  # (0, 1) is no longer wanted: its buffer goes back to the ring
    assert set(ring.ahead) == {(0, 3)}
    assert all(name.startswith("specmoe-read-ahead") for name in store.threads)
    ring.close()


def test_bad_ring_settings_are_refused():
    with pytest.raises(ValueError, match="size >= 2"):
        StagingRing(FakeStore(), FakeEngine(), size=1)


def test_mmap_store_copies_through_a_bounded_ring(tmp_path):
    model = build_tiny("qwen2_moe")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    inputs = make_inputs(model, batch=2, left_pad=True)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    smoe = load_offloaded(tmp_path, device="cpu", cache_capacity=0.3, predictor=PreGatePredictor(lookahead=2),
                          host_store="mmap", max_prefetch_inflight=1)
    (ring,) = smoe.store._rings
    size, ahead = sizes(max_inflight=1, top_k=2)  # sized from the in-flight bound, reads ahead and top-k
    assert (size, ahead) == (4, 1) and ring.ahead_max == ahead
    assert isinstance(smoe.store.layout, ExpertLayout) and ring.buffers.shape == (size, smoe.store.layout.nbytes)
    with torch.no_grad():
        out = smoe.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert ring.reads > 0  # every copy went through the ring's 8 buffers
    smoe.unwrap()
    assert smoe.store._rings == []  # closed with the store


class SlowPrefetches(FakeEngine):
    """A copy engine (transfer.CopyEngine's interface) whose prefetch copies land only when waited for."""

    def copy_in(self, slot, dst, src, demand):
        dst.copy_(src)
        (self.landed.add if demand else self.landed.discard)(slot)

    def wait(self, slots):
        pass

    def release(self, slots):
        pass


class RingedStore(FakeStore):
    def __init__(self):
        super().__init__()
        self.rings = []

    def staging(self, engine, pinned=False):
        self.rings.append(StagingRing(self, engine, size=4, workers=1))
        return self.rings[-1]


def test_the_scheduler_reads_ahead_the_prefetches_that_wait_behind_the_bound():
    from specmoe.runtime.cache import ExpertCache
    from specmoe.runtime.scheduler import Scheduler
    from specmoe.runtime.transfer import StoreToPool

    store, engine = RingedStore(), SlowPrefetches()
    pool = torch.zeros(6, 16, dtype=torch.uint8)  # [S, B]
    sched = Scheduler(ExpertCache(6, 2, 8, None, "lru"), StoreToPool(engine, store, pool), 2, 1, 16)
    (ring,) = store.rings
    candidates = [(1, 5), (1, 6), (1, 7)]  # best first; one copy may be in flight at a time
    plan = sched.plan(0, 0, [0, 1], candidates)  # pass 0, layer 0 routed to experts 0 and 1
    while sched.step(plan):  # acquire; then (compute issued) prefetch and release
        pass
    assert sched.stats[1].prefetch_issued == 1  # (1, 5) in flight, the other two wait their turn ...
    assert set(ring.ahead) == {(1, 6), (1, 7)}  # ... and are read from the store meanwhile
    assert int(pool[sched.cache.slot_of[(1, 5)], 0]) == 16 + 5
    ring.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_ring_is_pinned_on_cuda():
    ring = StagingRing(FakeStore(), FakeEngine(), size=2, pinned=True, workers=0)
    assert ring.buffers.is_pinned()

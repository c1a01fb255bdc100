"""One plan per MoE layer call (`Scheduler.plan` / `step`), in the order the hot path and the simulator carry it
out: demand copies, compute issued, prefetches pumped while it runs, release; and host-side blocking counted apart
from compute waits."""

import time

import torch

from specmoe.runtime.cache import ExpertCache
from specmoe.runtime.scheduler import Scheduler
from specmoe.runtime.transfer import ThreadedCopyEngine


class LogEngine:
    """Copies land at once; every call is logged."""

    def __init__(self, log):
        self.log = log

    def ready(self, slot):
        return True

    def copy_in(self, slot, key, demand):
        self.log.append(("demand" if demand else "prefetch", key))

    def wait(self, slots):
        pass

    def wait_host(self, slot):
        pass

    def release(self, slots):
        self.log.append(("release", tuple(slots)))


def scheduler(slots, log, policy="lru", layers=2, experts=8):
    return Scheduler(ExpertCache(slots, layers, experts, None, policy), LogEngine(log), layers, 4, 16)


def test_compute_is_issued_before_the_prefetches_and_the_release():
    log = []
    sched = scheduler(6, log)
    plan = sched.plan(0, 0, [1, 2], [(1, 3), (1, 4)])
    assert plan.device == [1, 2] and not plan.host
    steps = 0
    while sched.step(plan):
        steps += 1
        log.append(("compute", tuple(plan.chunk)))
    assert steps == 1
    kinds = [entry[0] for entry in log]
    assert kinds == ["demand", "demand", "compute", "prefetch", "prefetch", "release"]
    assert not sched.step(plan)  # a finished plan stays finished


def test_a_routed_expert_is_never_evicted_by_another_of_the_same_call():
    log = []
    sched = scheduler(2, log)
    for key in ((0, 2), (1, 5)):  # (0, 2) is the least recently used
        plan = sched.plan(0, key[0], [key[1]])
        while sched.step(plan):
            pass
    plan = sched.plan(1, 0, [1, 2])  # expert 1 misses first; LRU's victim would be expert 2, routed here too
    while sched.step(plan):
        assert sorted(sched.cache.key_of[s] for s in plan.slots) == [(0, 1), (0, 2)]
    assert sched.stats[0].hits == 1 and sched.stats[0].misses == 2  # (0, 2) once before, (0, 1) now
    assert (1, 5) not in sched.cache.slot_of


def test_more_experts_than_slots_run_in_chunks_and_prefetch_after_the_last():
    log = []
    sched = scheduler(2, log)
    plan = sched.plan(0, 0, [0, 1, 2], [(1, 7)])
    chunks = []
    while sched.step(plan):
        chunks.append(list(plan.chunk))
        log.append(("compute", tuple(plan.chunk)))
    assert chunks == [[0, 1], [2]] and sched.chunked_calls == 1
    kinds = [entry[0] for entry in log]
    assert kinds.index("prefetch") > max(i for i, k in enumerate(kinds) if k == "compute")


def test_host_blocking_on_copies_is_counted_apart_from_compute_waits():
    engine = ThreadedCopyEngine(2)
    try:
        src, dst = torch.ones(1 << 16), torch.zeros(1 << 16)
        slow = type("Slow", (), {})()
        orig = dst.copy_

        def slow_copy(x):
            time.sleep(0.05)
            return orig(x)

        slow.copy_ = slow_copy
        engine.copy_in(0, slow, src, demand=False)
        engine.wait_host(0)  # the host needs the slot: it blocks, and says so
        assert engine.host_waits == 1 and engine.host_wait_s >= 0.03
        assert engine.waits == 0 and engine.stall_s == 0.0  # compute did not wait
        engine.copy_in(1, slow, src, demand=True)
        engine.wait([1])
        assert engine.waits == 1 and engine.stall_s >= 0.03 and engine.host_waits == 1
        engine.reset_stall()
        assert engine.host_wait_s == 0.0 and engine.stall_s == 0.0
    finally:
        engine.close()

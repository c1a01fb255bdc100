"""Races between copies and compute (issue 21 deliverable 2): a copy engine whose copies land after random delays
and in random order (seeded), driven through the real scheduler and hot path, must give the unwrapped model's
tokens for every seed; engines that break the contract (compute not waiting for its copy; a slot reused before
its copy has landed) must be caught by the same check.

The engine plugs in where the wrapper builds its engine (`runtime.wrapper.make_engine`), as a `CopyEngine`
subclass: a copy is queued, its destination is poisoned at once (an in-flight DMA leaves it undefined), and the
source is read only when the copy lands, as a device reads pinned host memory when the copy runs (so a staging
buffer reused too early is caught too). Copies land at random on every engine call, in random order; `wait`,
`wait_host` and `synchronize` land what they wait for (also in random order among themselves).
"""

import random

import pytest
import torch
from conftest import build_tiny, make_inputs

import specmoe.runtime.wrapper as wrapper_module
from specmoe import SpeculativeMoE, load_offloaded
from specmoe.predictors import make_predictor
from specmoe.runtime.transfer import CopyEngine

POISON = 0x7F  # every byte: a huge float in fp32/bf16/fp16, so a premature read shows in the tokens


class RandomLatencyEngine(CopyEngine):
    """Copies land after random delays, in random order (seeded); waiting lands the copies waited for."""

    kind = "random-latency"

    def __init__(self, num_slots: int, seed: int, p_land: float = 0.3):
        super().__init__(num_slots)
        self.rng, self.p_land = random.Random(seed), p_land
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (slot, dst, src), issue order
        self.max_pending = 0
        self.landed_late = 0  # copies that landed after one issued later (out of order)
        self._issued = 0

    def _land(self, copies) -> None:
        copies = list(copies)
        self.rng.shuffle(copies)
        for c in copies:
            self.landed_late += any(p[3] > c[3] for p in self.pending if p is not c)
            self.pending = [p for p in self.pending if p is not c]
            c[1].copy_(c[2])  # the source is read now, not when the copy was issued

    def _tick(self) -> None:
        self._land([c for c in self.pending if self.rng.random() < self.p_land])

    def copy_in(self, slot, dst, src, demand):
        self._tick()
        dst.fill_(POISON)
        self._issued += 1
        self.pending.append((slot, dst, src, self._issued))
        self.max_pending = max(self.max_pending, len(self.pending))

    def ready(self, slot):
        self._tick()
        return all(c[0] != slot for c in self.pending)

    def wait(self, slots):
        self._tick()
        slots = set(slots)
        mine = [c for c in self.pending if c[0] in slots]
        if mine:
            self.waits += 1
        self._land(mine)

    def wait_host(self, slot):
        self.wait([slot])

    def release(self, slots):
        self._tick()

    def synchronize(self):
        self._land(list(self.pending))


class ComputeDoesNotWait(RandomLatencyEngine):
    """Broken: `wait` returns without landing the copies (compute reads a slot whose copy is in flight)."""

    def wait(self, slots):
        self._tick()

    def wait_host(self, slot):  # the host still waits when it asks to (only compute's wait is broken)
        super().wait([slot])


class SlotReusedInFlight(RandomLatencyEngine):
    """Broken: `ready` says yes while a copy is in flight, so the scheduler reuses a slot before its copy has
    landed (and the old copy may land after the new one)."""

    def ready(self, slot):
        self._tick()
        return True


@pytest.fixture
def engines(monkeypatch):
    """Build every wrapper's engine as `engines.cls(num_slots, seed, p_land)`; `engines.made` lists them."""

    class Factory:
        cls, seed, made = RandomLatencyEngine, 0, []

        def __call__(self, *args, **kwargs):  # make_engine(kind, num_slots, device, ...)
            num_slots = kwargs.get("num_slots", args[1] if len(args) > 1 else None)
            # odd seeds keep copies in flight long (5% land per engine call), even ones land them sooner (30%)
            engine = self.cls(num_slots, self.seed, p_land=0.05 if self.seed % 2 else 0.3)
            self.made.append(engine)
            return engine

    factory = Factory()
    monkeypatch.setattr(wrapper_module, "make_engine", factory)
    return factory


def _greedy(model, inputs, new=6):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new, do_sample=False)


CASES = [("qwen2_moe", 4), ("qwen2_moe", 0.5), ("mixtral", 3), ("deepseek_v3", 4)]
SEEDS = range(6)


def _runs(engines, cls, family="qwen2_moe", capacity=4, seeds=SEEDS):
    """(mismatching seeds, engines) for wraps whose engines are `cls`."""
    engines.cls = cls
    bad = []
    model = build_tiny(family)
    inputs = make_inputs(model, length=8)
    expected = _greedy(model, inputs)
    for seed in seeds:
        engines.seed = seed
        smoe = SpeculativeMoE(model, make_predictor("pregate"), cache_capacity=capacity)
        got = smoe.generate(**inputs, max_new_tokens=6, do_sample=False)
        smoe.unwrap()
        if not torch.equal(got, expected):
            bad.append(seed)
    return bad


@pytest.mark.parametrize("family, capacity", CASES)
def test_random_copy_latency_gives_the_unwrapped_tokens_for_every_seed(engines, family, capacity):
    assert _runs(engines, RandomLatencyEngine, family, capacity) == []
    assert len(engines.made) == len(SEEDS) and all(type(e) is RandomLatencyEngine for e in engines.made)
    # copies really were in flight together and landed out of order
    assert all(e.max_pending > 1 for e in engines.made) and sum(e.landed_late > 0 for e in engines.made) >= 3


@pytest.mark.parametrize("broken", [ComputeDoesNotWait, SlotReusedInFlight])
def test_a_broken_engine_is_caught(engines, broken):
    bad = _runs(engines, broken, seeds=range(1, 12, 2))  # copies long in flight: slots are wanted while they are
    assert bad, f"{broken.__name__} gave the unwrapped tokens for every seed: the check would not catch it"


def test_random_latency_through_the_mmap_staging_ring(engines, tmp_path):
    """host_store='mmap': copies read from a bounded staging ring that is reused only after its copy landed."""
    model = build_tiny("qwen2_moe")
    model.save_pretrained(tmp_path / "m")
    inputs = make_inputs(model, length=8)
    expected = _greedy(model, inputs)
    for seed in range(3):
        engines.seed = seed
        smoe = load_offloaded(tmp_path / "m", device="cpu", cache_capacity=4, predictor=make_predictor("pregate"),
                              host_store="mmap", dtype=torch.float32)
        assert "mmap" in str(smoe.store_path), smoe.store_path
        got = smoe.generate(**inputs, max_new_tokens=6, do_sample=False)
        smoe.unwrap()
        assert torch.equal(got, expected), seed
    assert all(e.max_pending > 1 for e in engines.made)

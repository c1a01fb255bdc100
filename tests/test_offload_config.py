"""One frozen OffloadConfig, validated once, taken by SpeculativeMoE, load_offloaded and simulate alike."""

import dataclasses

import pytest

from conftest import build_tiny
from specmoe import OffloadConfig, SpeculativeMoE
from specmoe.sim.compute import OpCounts
from specmoe.sim.engine import simulate
from specmoe.sim.hardware import PROFILES
from specmoe.sim.shapes import ModelShape
from specmoe.sim.sweep import synthetic_stream


@pytest.mark.parametrize("settings, error, match", [
    (dict(capacity=0), ValueError, ">= 1"),
    (dict(capacity=1.5), ValueError, r"\(0, 1\]"),
    (dict(capacity="lots"), ValueError, "memory size"),
    (dict(capacity=True), TypeError, "cache_capacity"),
    (dict(misses="gpu"), ValueError, "misses must be one of"),
    (dict(policy="fifo"), ValueError, "unknown eviction policy"),
    (dict(policy=object()), TypeError, "touch"),
    (dict(compression="int3"), ValueError, "int8"),
    (dict(host_store="disk"), ValueError, "host_store"),
    (dict(max_prefetch_inflight=0), ValueError, "positive integer"),
    (dict(host_threads=-1), ValueError, "positive integer"),
    (dict(transfer="stream"), ValueError, "transfer must be one of"),
    (dict(compute="fast"), ValueError, "compute must be one of"),
])
def test_bad_settings_say_what_to_change(settings, error, match):
    with pytest.raises(error, match=match):
        OffloadConfig(**settings)


def test_frozen_with_derived_values_computed_once():
    cfg = OffloadConfig(capacity=0.25, misses="auto")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.capacity = 0.5
    assert cfg.inflight(top_k=2, lookahead=3) == 12 and cfg.replace(max_prefetch_inflight=3).inflight(2, 3) == 3
    assert cfg.width(6) == 6 and OffloadConfig(prefetch_width=2).width(6) == 2
    assert OffloadConfig.build(cfg, policy="lru", transfer=None) == cfg.replace(policy="lru")  # None: the default
    with pytest.raises(TypeError, match="unknown offloading setting"):
        OffloadConfig.build(cfg, capcity=0.5)


def test_wrapper_takes_a_config_or_the_same_keywords():
    by_config = SpeculativeMoE(build_tiny("mixtral"), None,
                               config=OffloadConfig(capacity=4, policy="lru", transfer="thread", max_prefetch_inflight=3))
    by_keywords = SpeculativeMoE(build_tiny("mixtral"), None, 4, policy="lru", transfer="thread",
                                 max_prefetch_inflight=3)
    for smoe in (by_config, by_keywords):
        assert smoe.num_slots == 4 and smoe.engine.kind == "thread" and smoe.max_prefetch_inflight == 3
        assert type(smoe.cache.policy).__name__ == "LRUPolicy"
    assert by_config.config == by_keywords.config
    over = SpeculativeMoE(build_tiny("mixtral"), None, 2, config=by_config.config, policy="lfu")  # keywords win
    assert over.num_slots == 2 and over.config.policy == "lfu" and over.config.transfer == "thread"
    for smoe in (by_config, by_keywords, over):
        smoe.unwrap()
    with pytest.raises(TypeError, match="unknown offloading setting"):
        SpeculativeMoE(build_tiny("mixtral"), None, 0.5, polcy="lru")


def test_simulate_takes_the_same_config():
    shape = ModelShape.from_name("mixtral-8x7b")
    stream = synthetic_stream(shape, passes=12)
    ops = OpCounts(layer=80, experts=24, per_pass=60, wrapper=12, predictor=12)
    cfg = OffloadConfig(capacity=0.3, policy="lru", transfer="sync")
    a = simulate(stream, shape, PROFILES["rtx3090"], config=cfg, ops=ops)
    b = simulate(stream, shape, PROFILES["rtx3090"], 0.3, policy="lru", transfer="sync", ops=ops)
    assert a.to_dict() == b.to_dict() and a.misses > 0
    with pytest.raises(ValueError, match="misses must be one of"):
        simulate(stream, shape, PROFILES["rtx3090"], 0.3, misses="gpu", ops=ops)

"""Eviction policies (specmoe.runtime.policies): cycle-aware hit density, aged LFU, and the default's wiring."""


import pytest
import numpy as np
import torch

from specmoe.runtime.config import OffloadConfig
from specmoe.runtime.cache import ExpertCache
from specmoe.runtime.policies import DEFAULT_POLICY, HitDensityPolicy, LFUPolicy, LRUPolicy, make_policy
from specmoe.sim.bounds import demand_misses
from specmoe.sim.policies import make_sim_policy
from specmoe.sim.stream import RoutingStream
from specmoe.sim.sweep import SweepSettings


def cyclic_stream(tokens=60, layers=6, experts=8, noise=0.0, seed=0) -> RoutingStream:
    """Decoding where every token routes expert 0 at every layer (with probability `noise` a random one)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(tokens, layers, 1, dtype=torch.long)
    flip = torch.rand(tokens, layers, generator=g) < noise
    ids[flip] = torch.randint(0, experts, (int(flip.sum()), 1), generator=g)
    return RoutingStream.from_sequences(ids, num_experts=experts)


def test_layer_cycle_defeats_lru_but_not_hit_density():
    stream = cyclic_stream()  # a token needs 6 experts, the cache holds 4
    accesses = stream.num_tokens * stream.num_layers
    assert demand_misses(stream, 8, 4, "lru") == accesses  # LRU evicts exactly what the next layer needs
    hd = demand_misses(stream, 8, 4, "hit-density")
    assert hd <= accesses - 3 * (stream.num_tokens - 2)  # keeps 3 of the 6 (the 4th slot takes the misses)
    assert hd >= demand_misses(stream, 8, 4, "belady")


@pytest.mark.parametrize("seed", range(2))
def test_hit_density_beats_lru_on_noisy_cycles(seed):
    stream = cyclic_stream(tokens=80, noise=0.3, seed=seed)
    assert demand_misses(stream, 8, 4, "hit-density", 10) < 0.8 * demand_misses(stream, 8, 4, "lru", 10)


def bound_policy(policy, slots=4, layers=2, experts=8):
    cache = ExpertCache(slots, layers, experts, "cpu", policy)  # the cache binds its policy
    return cache


def test_hit_density_victim_respects_allowed_and_keeps_predicted():
    policy = HitDensityPolicy()
    cache = bound_policy(policy)
    for e in range(4):
        cache.assign((1, e), lambda s: True)
    policy.observe(0, set(), routed=[0])
    slots = [cache.slot_of[(1, e)] for e in range(4)]
    first = policy.victim(lambda s: True)
    assert first in slots
    second = policy.victim(lambda s: s != first)
    assert second in slots and second != first
    assert policy.victim(lambda s: False) is None
    policy.observe(0, {cache.key_of[first]}, routed=[1])  # now the predictor wants `first`
    assert policy.victim(lambda s: True) != first
    everything = {(1, e) for e in range(4)}
    policy.observe(0, everything, routed=[2])  # all predicted: still a victim when one must go (the oldest)
    assert policy.victim(lambda s: True) == slots[0]


def test_hit_density_prefers_the_expert_whose_layer_comes_round_later():
    policy = HitDensityPolicy()
    cache = bound_policy(policy, slots=2, layers=4)
    a, _ = cache.assign((1, 0), lambda s: True)
    b, _ = cache.assign((3, 0), lambda s: True)
    policy.observe(0, set(), routed=[5])  # at layer 0: layer 1 comes in 1 step, layer 3 in 3; same odds
    assert policy.victim(lambda s: True) == b
    policy.observe(2, set(), routed=[5])  # at layer 2: layer 3 is next, layer 1 a whole cycle away
    assert policy.victim(lambda s: True) == a


def test_hit_density_is_lru_until_it_observes():
    policy = make_policy("hit-density")
    for s in (0, 1, 2, 0):
        policy.touch(s)
    assert policy.victim(lambda s: True) == 1 and policy.victim(lambda s: s != 1) == 2


def test_lfu_ages():
    def victim(halflife):
        p = LFUPolicy(halflife=halflife)
        for s in [0] * 10 + [1] * 6 + [2] * 8:
            p.touch(s)
        return p.victim(lambda s: True)

    assert victim(10**9) == 1  # plain counts: 10, 6, 8
    assert victim(2) == 0  # halving every 2 uses: the old favourite goes first


def test_lfu_counts_survive_eviction_per_expert():
    policy = LFUPolicy(halflife=10**6)
    cache = bound_policy(policy, slots=2)
    slot, _ = cache.assign((0, 0), lambda s: True)
    for _ in range(5):
        cache.touch(slot)
    cache.assign((0, 1), lambda s: True)
    _, evicted = cache.assign((0, 2), lambda s: True)
    assert evicted == (0, 1)  # (0, 0) has 6 uses
    _, evicted = cache.assign((0, 3), lambda s: s != cache.slot_of[(0, 2)])
    assert evicted == (0, 0)
    _, evicted = cache.assign((0, 0), lambda s: True)  # back, with its 6 earlier uses still counted
    assert evicted in {(0, 2), (0, 3)}
    _, evicted = cache.assign((1, 0), lambda s: True)
    assert evicted != (0, 0)


def test_default_policy_wiring():
    assert OffloadConfig().policy == DEFAULT_POLICY  # SpeculativeMoE's, load_offloaded's and simulate's default
    assert type(make_policy("default")).name == DEFAULT_POLICY == type(make_sim_policy("default")).name
    assert DEFAULT_POLICY in SweepSettings().policies and DEFAULT_POLICY in SweepSettings().prefetch_policies
    assert isinstance(make_policy("lru"), LRUPolicy)
    with pytest.raises(ValueError, match="default"):
        make_policy("prediction-aware")
    with pytest.raises(ValueError, match="belady"):
        SweepSettings(prefetch_policies=("belady",))


def test_hit_density_counts_batched_or_one_by_one_alike():
    """observe() defers its counting to the next victim (or the layer's next visit); a batch of calls on distinct
    layers gives the state counting each call at once gives."""
    from specmoe.runtime.cache import ExpertCache
    from specmoe.runtime.policies import HitDensityPolicy

    g = torch.Generator().manual_seed(0)
    eager, lazy = HitDensityPolicy(), HitDensityPolicy()
    for p in (eager, lazy):
        ExpertCache(6, 3, 8, None, p)
    for t in range(40):
        layer = t % 3
        routed = sorted(set(torch.randint(0, 8, (2 + t % 3,), generator=g).tolist()))
        for p in (eager, lazy):
            p.observe(layer, frozenset(), routed)
        eager._count()
        assert len(lazy._pending) == layer + 1  # a pass's calls wait: one per layer
    lazy._count()
    for name in ("visits", "last", "bucket", "trials"):
        assert np.array_equal(getattr(eager, name), getattr(lazy, name)), name
    for name in ("freq", "freq_sum", "hits"):
        assert np.allclose(getattr(eager, name), getattr(lazy, name), rtol=1e-12, atol=0), name

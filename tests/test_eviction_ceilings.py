"""The ceilings of learned eviction (`specmoe.sim.rate_policies`, benchmarks/eviction_ceilings.py): the rate oracles
read the true future, the history fit recovers a rate, and policy objects run in the simulator (Belady's MIN with
a predictor's candidates included)."""

import numpy as np
import pytest
import torch

from specmoe.runtime.cache import ExpertCache
from specmoe.sim.bounds import demand_misses
from specmoe.sim.compute import OpCounts
from specmoe.sim.engine import simulate
from specmoe.sim.hardware import HardwareProfile
from specmoe.sim.policies import BeladyPolicy, future_uses, make_sim_policy
from specmoe.sim.predictions import oracle_candidates
from specmoe.sim.rate_policies import (
    BlendedRatePolicy, FutureRates, HistoryRatePolicy, RateOraclePolicy, fit_history_rates, history_error,
    routed_array, sequence_ends,
)
from specmoe.sim.shapes import ModelShape
from specmoe.sim.stream import RoutingStream


def zipf_stream(tokens=300, L=3, E=8, k=2, seed=0, cut=None) -> RoutingStream:
    """Each layer draws k experts from its own fixed Zipf order: a stationary rate per (layer, expert)."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, E + 1).float() ** 1.2
    order = torch.stack([torch.randperm(E, generator=g) for _ in range(L)])
    ids = torch.stack([torch.stack([order[layer][torch.multinomial(weights, k, generator=g)] for layer in range(L)])
                       for _ in range(tokens)])  # [N, L, k]
    offsets = torch.tensor([0, cut, tokens]) if cut else None
    return RoutingStream.from_sequences(ids, offsets, num_experts=E)


def test_future_rates_are_the_true_window_rates():
    stream = zipf_stream(cut=120)
    used = routed_array(stream, 8)  # [P, L, E]
    P, L, E = used.shape
    assert used.sum() == P * L * 2
    ends = sequence_ends(stream)
    assert ends[0] == 120 and ends[119] == 120 and ends[120] == P and ends[-1] == P
    flat = np.arange(L * E)
    layers = flat // E
    for W in (1, 4, None):
        future = FutureRates(used, W, ends)
        for t, c in ((5, 0), (119, 2), (200, 1), (P - 1, 2)):
            got = future.rates(t * L + c, flat, layers)
            for layer in range(L):
                a = min(t + (layer <= c), P)  # the layer's next visit
                b = ends[a] if W is None and a < P else (P if W is None else min(a + W, P))
                want = used[a:b, layer].sum(0) / max(b - a, 1)
                assert np.allclose(got[layer * E:(layer + 1) * E], want)
    with pytest.raises(ValueError, match="sequences' ends"):
        FutureRates(used, None)


def test_rate_oracle_runs_in_the_simulator_and_beats_lru():
    stream = zipf_stream()
    used = routed_array(stream, 8)
    lru = demand_misses(stream, 8, 6, "lru")
    oracle = demand_misses(stream, 8, 6, RateOraclePolicy(used, 16))
    belady = demand_misses(stream, 8, 6, "belady")
    assert belady <= oracle < lru


def test_history_fit_recovers_the_stationary_rate():
    train, test = routed_array(zipf_stream(2000, seed=1), 8), routed_array(zipf_stream(800, seed=1), 8)
    assert np.allclose(fit_history_rates(train, 8, chunk=150), fit_history_rates(train, 8, chunk=5000))
    weights = fit_history_rates(train, 8)  # [L, J + 1]
    err = history_error(test, weights, 8)
    assert err["rmse"] < 0.9 * err["rmse_mean"]  # the fixed orders are learnt from the counts
    single = fit_history_rates(train, 8, single=True)
    assert np.all((single[:, :-1] != 0).sum(1) == 1)  # one decay per layer, and an offset
    policy = HistoryRatePolicy(weights)
    ExpertCache(6, 3, 8, None, policy)
    policy.observe(0, frozenset(), [1, 2])
    want = policy.counts[0] @ weights[0, :-1] + weights[0, -1]
    assert np.allclose(policy.rate[:8], want)
    with pytest.raises(ValueError, match="history weights are"):
        ExpertCache(6, 4, 8, None, HistoryRatePolicy(weights))
    future = FutureRates(test, 8)
    full = BlendedRatePolicy(future, weights, 1.0)
    lru = demand_misses(zipf_stream(800, seed=1), 8, 6, "lru")
    assert demand_misses(zipf_stream(800, seed=1), 8, 6, full) == demand_misses(
        zipf_stream(800, seed=1), 8, 6, RateOraclePolicy(test, 8)) < lru  # share 1: the oracle's ranking


def test_a_belady_object_runs_with_candidates(governor_judges_at_once):  # this run: shorter than its calibration
    """Belady's MIN by name is refused beside a predictor; as an object it runs (the ceilings' oracle + Belady)
    and without candidates gives the named one's misses."""
    stream = zipf_stream(120)
    passes = stream.passes()
    obj = BeladyPolicy(future_uses(passes, 3))
    assert make_sim_policy(obj) is obj
    assert demand_misses(stream, 8, 6, BeladyPolicy(future_uses(passes, 3))) == demand_misses(stream, 8, 6, "belady")
    shape = ModelShape.from_config(dict(model_type="mixtral", vocab_size=8, hidden_size=8, intermediate_size=8,
                                   num_hidden_layers=3, num_attention_heads=1, num_key_value_heads=1,
                                   num_local_experts=8, num_experts_per_tok=2), name="proxy")
    cands = oracle_candidates(stream, 8)
    run = simulate(stream, shape, HardwareProfile("proxy", 2**40, 1e9, 1e12, 1e12), 6,
                   ops=OpCounts(layer=0, experts=0, per_pass=0), policy=BeladyPolicy(future_uses(passes, 3)),
                   candidates=cands)
    assert run.hits + run.misses > 0 and run.prefetch_issued > 0

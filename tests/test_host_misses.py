"""Experts computed where they live (misses="host" / "auto"): the same tokens and logits as the unwrapped model,
for every family, capacities from one slot per layer to 1.0, predictors none / pre-gate / oracle, a left-padded
batch; host compute forced although the device here is the CPU."""

import pytest
import torch
from conftest import build_tiny, make_inputs
from test_wrapper import greedy, logits_of, one_slot_per_layer

from specmoe import SpeculativeMoE
from specmoe.predictors import OraclePredictor, PreGatePredictor
from specmoe.runtime.misses import MissCosts, hottest, split_misses
from specmoe.traces import capture_routing

CAPACITIES = {"one_per_layer": one_slot_per_layer, "quarter": lambda m: 0.25, "full": lambda m: 1.0}
ALWAYS_HOST = MissCosts(copy_s=1.0, host_s=0.0, source="test: the host always wins")


def _predictor(name):
    return {"none": None, "pregate": PreGatePredictor(lookahead=2)}[name]


@pytest.mark.parametrize("capacity", sorted(CAPACITIES))
@pytest.mark.parametrize("predictor", ["none", "pregate"])
def test_host_misses_same_tokens_and_logits(family, capacity, predictor):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=3, length=7, left_pad=True)
    ref_tokens = greedy(model.generate, inputs)
    ref_logits = logits_of(model, model, inputs)

    smoe = SpeculativeMoE(model, _predictor(predictor), cache_capacity=CAPACITIES[capacity](model),
                          misses="host")
    tokens = greedy(smoe.generate, inputs)
    logits = logits_of(smoe, model, inputs)
    stats = smoe.stats
    smoe.unwrap()

    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    t = stats.total
    assert t.host_computed == t.misses  # "host": no miss is fetched ...
    if predictor == "none":
        assert t.bytes_moved == 0 and t.hits == 0  # ... so without prefetches nothing ever moves
    if capacity != "full" or predictor == "none":
        assert t.host_computed > 0


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "switch_transformers"])
def test_oracle_prefetches_to_device_misses_to_host(family):
    """The predictor's prefetches still go to the device; the host takes only what was not predicted."""
    model = build_tiny(family)
    inputs = make_inputs(model, batch=3, left_pad=True)
    with capture_routing(model) as cap:
        ref = greedy(model.generate, inputs)
    smoe = SpeculativeMoE(model, OraclePredictor([p.ids for p in cap.passes]), cache_capacity=0.5, misses="host")
    assert torch.equal(greedy(smoe.generate, inputs), ref)
    t = smoe.stats.total
    smoe.unwrap()
    assert t.prefetch_used > 0 and t.host_computed == t.misses
    assert t.bytes_moved == t.prefetch_issued * smoe.store.layout.nbytes  # only prefetches crossed


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_host_misses_compressed_store(family):
    """A compressed store: the host decodes the expert itself; the same tokens as fetching it."""
    model = build_tiny(family)
    inputs = make_inputs(model, batch=2, left_pad=True)
    fetched = SpeculativeMoE(model, None, cache_capacity=0.25, compression="int8")
    ref_tokens, ref_logits = greedy(fetched.generate, inputs), logits_of(fetched, model, inputs)
    fetched.unwrap()
    model = build_tiny(family)
    smoe = SpeculativeMoE(model, None, cache_capacity=0.25, compression="int8", misses="host")
    tokens, logits = greedy(smoe.generate, inputs), logits_of(smoe, model, inputs)
    assert smoe.stats.total.host_computed > 0 and smoe.stats.total.bytes_moved == 0
    smoe.unwrap()
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["olmoe", "switch_transformers"])
def test_auto_measures_costs_and_keeps_tokens(family):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=2, left_pad=True)
    ref = greedy(model.generate, inputs)
    smoe = SpeculativeMoE(model, PreGatePredictor(lookahead=1), cache_capacity=0.25, misses="auto")
    costs = smoe.miss_costs
    assert costs.copy_s > 0 and costs.host_s > 0 and "measured" in costs.source
    assert torch.equal(greedy(smoe.generate, inputs), ref)
    smoe.unwrap()
    model = build_tiny(family)  # given costs where the host always wins: every miss runs there
    smoe = SpeculativeMoE(model, None, cache_capacity=0.25, misses="auto", miss_costs=ALWAYS_HOST)
    assert torch.equal(greedy(smoe.generate, inputs), ref)
    assert smoe.stats.total.host_computed == smoe.stats.total.misses > 0
    smoe.unwrap()


def test_static_placement_never_copies_after_start():
    model = build_tiny("qwen3_moe")
    inputs = make_inputs(model, batch=2, left_pad=True)
    ref = greedy(model.generate, inputs)
    with capture_routing(model) as cap:
        greedy(model.generate, inputs)
    counts = torch.zeros(2, 8, dtype=torch.long)  # [L, E] routing frequencies
    for p in cap.passes:
        for layer in range(2):
            ids = p.ids[:, layer].flatten()
            counts[layer] += torch.bincount(ids[ids >= 0], minlength=8)
    smoe = SpeculativeMoE(model, None, cache_capacity=0.5, misses="host", placement=counts)
    assert len(smoe.cache.slot_of) == smoe.num_slots  # loaded at start-up
    assert torch.equal(greedy(smoe.generate, inputs), ref)
    t = smoe.stats.total
    assert t.bytes_moved == 0 and t.hits > 0 and t.host_computed == t.misses
    smoe.unwrap()


def test_bad_misses_and_placement_say_what_to_change():
    model = build_tiny("mixtral")
    with pytest.raises(ValueError, match="misses must be one of"):
        SpeculativeMoE(model, None, misses="cpu")
    with pytest.raises(ValueError, match=r"placement must be routing frequencies \[L, E\]"):
        SpeculativeMoE(model, None, misses="host", placement=torch.zeros(3, 3))
    assert model._specmoe_wrapper is None


def test_split_misses_goes_where_it_finishes_first():
    costs = MissCosts(copy_s=1.0, host_s=0.4, host_token_s=0.5)
    tokens = {1: 1, 2: 1, 3: 4, 4: 1}
    fetched, host = split_misses([1, 2, 3, 4], tokens, "auto", costs)
    # expert 3 (4 tokens: 1.9 s on the host) is copied first; the 1-token ones fill the host (0.4, 0.8, 1.2 s)
    # until a second copy (2.0 s) would finish later than... the host at 1.2 s: all three stay on the host.
    assert fetched == [3] and host == [1, 2, 4]
    assert split_misses([1, 2], tokens, "fetch") == ([1, 2], [])
    assert split_misses([1, 2], tokens, "host") == ([], [1, 2])
    assert split_misses([1], tokens, "auto", costs, copy_backlog_s=5.0) == ([], [1])
    with pytest.raises(ValueError, match="needs MissCosts"):
        split_misses([1], tokens, "auto")
    with pytest.raises(ValueError, match="seconds >= 0"):
        MissCosts(copy_s=-1, host_s=0)
    assert hottest([[5, 1], [0, 9]], 2) == [(1, 1), (0, 0)]

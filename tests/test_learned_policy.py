"""The learned eviction policy (runtime/learned_policy.py, training/eviction.py): training on synthetic routing,
the policy directory, geometry checks, the scheduler's pins, and the runtime and the simulator agreeing on it."""

import json

import numpy as np
import pytest
import torch

from conftest import build_tiny, make_inputs
from test_scheduler_parity import COUNTERS, NEW_TOKENS, OPS, proxy_shape, record
from specmoe import SpeculativeMoE
from specmoe.cli import main
from specmoe.io import read_safetensors, write_safetensors
from specmoe.runtime.adapters import find_moe_layers
from specmoe.runtime.cache import ExpertCache
from specmoe.runtime.learned_policy import (
    CELLS, HORIZON, HORIZONS, LayerState, LearnedPolicy, OnlineLabels, OnlineRule, load_learned_policy,
)
from specmoe.runtime.policies import make_policy
from specmoe.sim.bounds import demand_misses
from specmoe.sim.engine import simulate
from specmoe.sim.hardware import PROFILES
from specmoe.sim.stream import RoutingStream
from specmoe.training.eviction import (
    EvictionTrainConfig, count_lift, next_use, replay_demand, train_learned_policy,
)

QUICK = EvictionTrainConfig(choice_calls=2000, cost_calls=500)


def hot_stream(tokens=400, L=4, E=16, k=2, seed=0) -> RoutingStream:
    """Decode routing where each layer prefers a few experts (Zipf weights over a per-layer order) that change
    every 100 tokens: history predicts reuse, and the layer cycle defeats LRU."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, E + 1).float() ** 1.5
    ids = torch.zeros(tokens, L, k, dtype=torch.long)
    for start in range(0, tokens, 100):
        order = torch.stack([torch.randperm(E, generator=g) for _ in range(L)])  # [L, E]
        for t in range(start, min(start + 100, tokens)):
            for layer in range(L):
                ids[t, layer] = order[layer][torch.multinomial(weights, k, generator=g)]
    return RoutingStream.from_sequences(ids, torch.tensor([0, tokens // 2, tokens]), num_experts=E)


def geometry_of(stream):
    return {"num_layers": stream.num_layers, "num_experts": stream.num_experts, "top_k": stream.top_k}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    stream = hot_stream()
    out = tmp_path_factory.mktemp("policy") / "learned"
    policy, record_ = train_learned_policy(stream, geometry_of(stream), out, QUICK)
    return out, policy, record_


def test_training_learns_and_beats_lru_on_held_out_routing(trained):
    out, policy, rec = trained
    table = policy.table  # [B, H + 1]: P(n = j) per cell
    hot, cold = CELLS - 1, 0  # routed at every visit of every horizon / at none
    assert np.allclose(table.sum(1), 1) and table[hot, 0] > table[cold, 0]  # more often routed: sooner again
    test = hot_stream(seed=1)  # other hot sets
    slots = 16  # a quarter of the experts
    learned = demand_misses(test, 16, slots, str(out))
    lru = demand_misses(test, 16, slots, "lru")
    hit_density = demand_misses(test, 16, slots, "hit-density")
    assert learned < 0.85 * lru and learned < 1.05 * hit_density  # measured here: 1071, 1317, 1092
    cost = rec["cost"]
    assert cost["per_call_s"] > 0 and cost["charged_s"] == max(0.0, cost["per_call_s"] - cost["hit_density_per_call_s"])
    assert policy.host_s_per_call == cost["charged_s"]


def test_round_trip_and_atomic_overwrite(trained, tmp_path):
    out, policy, _ = trained
    again = load_learned_policy(out)
    assert np.array_equal(again.table, policy.table) and again.horizon == policy.horizon
    assert again.horizon in HORIZONS and str(again.horizon) in json.loads((out / "config.json").read_text())[
        "training"]["horizon_choice"]["hit_rates"]
    config = json.loads((out / "config.json").read_text())
    assert config["specmoe_policy"] == "learned-eviction" and config["geometry"]["num_experts"] == 16
    stream = hot_stream(tokens=100)
    target = tmp_path / "p"
    train_learned_policy(stream, geometry_of(stream), target, QUICK)
    first = (target / "model.safetensors").read_bytes()
    train_learned_policy(stream, geometry_of(stream), target, EvictionTrainConfig(smoothing=500.0, choice_calls=500,
                                                                                  cost_calls=100))
    assert (target / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # nothing left beside it
    assert isinstance(make_policy(str(target)), LearnedPolicy) and isinstance(make_policy(target), LearnedPolicy)


def test_geometry_mismatch_is_one_line(trained):
    out, _, _ = trained
    with pytest.raises(ValueError, match="trained for another routing geometry") as err:
        load_learned_policy(out, geometry={"num_layers": 4, "num_experts": 8, "top_k": 2})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="L=4 E=16, the model has L=5 E=16") as err:
        ExpertCache(8, 5, 16, None, str(out))
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="eviction policy config not found"):
        make_policy(str(out.parent))  # a directory that holds no policy


def test_older_format_is_refused_in_one_line(trained, tmp_path):
    out, _, _ = trained
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((out / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "format_version": 1}))
    with pytest.raises(ValueError, match="has format 1, this specmoe reads 2 or 3: train it again") as err:
        load_learned_policy(old)
    assert "\n" not in str(err.value)


def test_layer_state_cells_follow_the_routing():
    """A layer's cells move only when that layer is visited: an expert routed at every visit climbs to the top
    bucket of every horizon, one never routed falls to cell 0; frequencies are in units of k / E."""
    state = LayerState(3, 8, 2)
    start = state.cell.copy()
    for _ in range(200):
        state.observe(1, [2, 5])
    assert np.array_equal(state.cell[[0, 2]], start[[0, 2]])
    assert state.cell[1, 2] == state.cell[1, 5] == CELLS - 1  # the last bucket of every horizon
    assert np.all(np.delete(state.cell[1], [2, 5]) == 0)


def test_victim_only_among_allowed_and_keeps_predicted(trained):
    out, _, _ = trained
    cache = ExpertCache(6, 4, 16, None, str(out))
    policy = cache.policy
    for e in range(6):
        cache.assign((e % 4, e), lambda s: True)
    policy.observe(1, frozenset({(2, 2)}), [1])
    pinned = {0, 3, 5}
    for _ in range(2):
        slot = policy.victim(lambda s: s not in pinned)
        assert slot not in pinned and cache.key_of[slot] != (2, 2)
        pinned.add(slot)
    assert cache.key_of[policy.victim(lambda s: s not in pinned)] == (2, 2)  # only a kept one is left: it may go
    assert policy.victim(lambda s: False) is None


def test_scheduler_never_evicts_in_use_or_in_flight(trained, governor_judges_at_once):
    """Replayed through the simulator's scheduler with oracle prefetches, no slot the scheduler refuses (in use,
    in flight, predicted) is ever chosen: the policy only ever sees `allowed` and picks among what it accepts."""
    out, _, _ = trained
    from specmoe.sim.predictions import oracle_candidates

    stream = hot_stream(tokens=120, seed=2)
    refused = []
    original = LearnedPolicy.victim

    def checked(self, allowed):
        slot = original(self, allowed)
        if slot is not None and not allowed(slot):
            refused.append(slot)
        return slot

    LearnedPolicy.victim = checked
    try:  # the governor judges the oracle at once (its dry calibration is longer than this run): it prefetches
        run = simulate(stream, proxy_shape(_geo(stream)), PROFILES["rtx3090"], 10, ops=OPS, policy=str(out),
                       candidates=oracle_candidates(stream, 16, lookahead=1))
    finally:
        LearnedPolicy.victim = original
    assert run.hits + run.misses > 0 and run.prefetch_issued > 0 and not refused


def _geo(stream):
    return type("G", (), {"num_layers": stream.num_layers, "num_experts": stream.num_experts,
                          "top_k": stream.top_k})()


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """A learned policy for the tiny Qwen2-MoE's geometry, trained on synthetic routing of that geometry."""
    geo = find_moe_layers(build_tiny("qwen2_moe")).geometry
    stream = hot_stream(tokens=200, L=geo.num_layers, E=geo.num_experts, k=geo.top_k)
    out = tmp_path_factory.mktemp("tiny") / "learned"
    train_learned_policy(stream, geometry_of(stream), out, QUICK)
    return out


def test_runtime_tokens_equal_with_learned_policy(tiny_policy):
    model = build_tiny("qwen2_moe")
    inputs = make_inputs(model, length=6)
    expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    smoe = SpeculativeMoE(model, None, 0.3, transfer="sync", policy=str(tiny_policy))
    assert isinstance(smoe.cache.policy, LearnedPolicy)
    got = smoe.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(got, expected) and smoe.stats.total.misses > 0
    smoe.unwrap()


@pytest.fixture(scope="module")
def tiny_online_policy(tiny_policy, tmp_path_factory):
    """`tiny_policy` with an online rule that refreshes the table every pass and weighs it little: the served
    routing moves its decisions within a short generate call."""
    out = tmp_path_factory.mktemp("tiny_online") / "learned"
    out.mkdir()
    config = json.loads((tiny_policy / "config.json").read_text())
    config["rule"]["online"] = {"prior": 1.0, "decay": 1.0, "period": 1}
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").write_bytes((tiny_policy / "model.safetensors").read_bytes())
    return out


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("capacity", [0.3, 0.6])
def test_runtime_counters_equal_the_simulators_with_learned_policy(tiny_policy, tiny_online_policy, capacity,
                                                                    online):
    tiny_policy = tiny_online_policy if online else tiny_policy
    model = build_tiny("qwen2_moe")
    inputs = make_inputs(model, length=6)
    smoe = SpeculativeMoE(model, None, capacity, transfer="sync", policy=str(tiny_policy))
    with record(smoe) as rec:  # online: long enough for labels (HORIZON visits later) to move the table
        model_out = smoe.generate(**inputs, max_new_tokens=3 * HORIZON if online else NEW_TOKENS, do_sample=False)
    stats, slots, geo = smoe.stats.total, smoe.num_slots, smoe.geometry
    if online:
        assert smoe.cache.policy._labels.counts.sum() > 0
    smoe.unwrap()
    assert model_out.shape[1] > inputs["input_ids"].shape[1]
    sim = simulate(rec.stream(), proxy_shape(geo), PROFILES["rtx3090"], slots, ops=OPS, policy=str(tiny_policy),
                   transfer="sync")
    assert {n: getattr(stats, n) for n in COUNTERS} == {n: getattr(sim, n) for n in COUNTERS}
    assert stats.misses > 0


def test_replay_demand_counts_like_the_simulator(trained):
    out, _, _ = trained
    stream = hot_stream(tokens=150, seed=4)
    hits, misses, _ = replay_demand(lambda: load_learned_policy(out), stream, 16, 0.25)
    assert misses == demand_misses(stream, 16, 16, str(out)) and hits + misses == stream.num_tokens * 4 * 2


def test_train_and_simulate_cli(tmp_path, trained):
    from routing_synth import synthetic_trace
    from specmoe.traces.shards import TraceManifest, TraceWriter

    trace = synthetic_trace(L=24, E=60, k=4, sequences=6, length=12)  # qwen1.5-moe-a2.7b's routing geometry
    manifest = TraceManifest(model="synthetic", geometry=trace.geometry, dtype="float32", source={})
    with TraceWriter(tmp_path / "traces", manifest) as w:  # routing only, as import-routing writes
        for s, e in zip(trace.offsets[:-1].tolist(), trace.offsets[1:].tolist()):
            w.add(trace.ids[s:e], trace.weights[s:e], {})
    assert main(["train", str(tmp_path / "traces"), "--policy", "learned", "--sequences", "0:4",
                 "--out", str(tmp_path / "pol")]) == 0
    config = json.loads((tmp_path / "pol" / "config.json").read_text())
    assert config["training"]["sequences"] == "sequences 0:4 of 6"
    assert main(["simulate", "--trace", str(tmp_path / "traces"), "--policies", "lru", str(tmp_path / "pol"),
                 "--prefetch-policies", str(tmp_path / "pol"), "--capacities", "0.5", "--warmup", "4",
                 "--out", str(tmp_path / "sim")]) == 0
    runs = json.loads((tmp_path / "sim" / "simulate.json").read_text())["runs"]
    assert {r["policy"] for r in runs} >= {"lru", str(tmp_path / "pol")}
    assert main(["train", str(tmp_path / "traces"), "--out", str(tmp_path / "x")]) == 2  # no --predictor / --policy


def test_online_labels_are_belady_next_use_in_any_refresh_order():
    """The served routing's labels are the offline ones (`next_use`, what training counts) for every visit with
    HORIZON visits after it, however the refreshes fall; later visits wait."""
    rng = np.random.default_rng(0)
    V, E, k = 120, 12, 3
    used = np.zeros((V, E), dtype=bool)
    cells = rng.integers(0, CELLS, (V, E))
    once, often = OnlineLabels(1, E, OnlineRule(period=10**6)), OnlineLabels(1, E, OnlineRule(period=1))
    flat = np.full((CELLS, HORIZON + 1), 1.0 / (HORIZON + 1))
    for v in range(V):
        ids = sorted(rng.choice(E, k, replace=False).tolist())
        used[v, ids] = True
        once.add(0, ids, cells[v])
        if often.add(0, ids, cells[v]):
            often.table(flat)
    once.table(flat)
    known = V - HORIZON
    expected = np.bincount((cells[:known] * (HORIZON + 1) + next_use(used)[:known] - 1).ravel(),
                           minlength=CELLS * (HORIZON + 1)).reshape(CELLS, HORIZON + 1)
    assert np.array_equal(once.counts, expected) and np.array_equal(often.counts, expected)
    assert once.waiting[0] == HORIZON  # the last HORIZON visits wait for their labels


def test_online_rule_moves_a_wrong_table_toward_the_served_routing():
    """A table that says nothing is ever reused soon, serving routing that reuses two experts at every visit: the
    online policy's chance of reuse for them rises, the offline one's stays."""
    L, E, k = 2, 8, 2
    wrong = np.zeros((CELLS, HORIZON + 1))
    wrong[:, HORIZON] = 1.0  # n > HORIZON everywhere
    geo = {"num_layers": L, "num_experts": E, "top_k": k}
    policies = [LearnedPolicy(wrong, geo, 1), LearnedPolicy(wrong, geo, 1, online={"prior": 5.0, "period": 2})]
    for policy in policies:
        ExpertCache(4, L, E, None, policy)  # binds it
        for _ in range(300):  # enough visits for the slowest frequency to reach its top bucket and stay
            for layer in range(L):
                policy.observe(layer, frozenset(), [1, 6])
    offline, online = (p.hit[: L * E].reshape(L, E) for p in policies)
    assert np.all(offline == 0) and np.all(online[:, [1, 6]] > 0.5)
    with pytest.raises(ValueError, match="online rule needs"):
        OnlineRule(prior=0)


def alternating_stream(tokens=120, L=2, E=8) -> RoutingStream:
    """Layer 0 routes {0, 1} and {2, 3} at alternate visits (each pair says the other comes next); layer 1 hot
    on {4, 5}."""
    ids = torch.zeros(tokens, L, 2, dtype=torch.long)
    for t in range(tokens):
        ids[t, 0] = torch.tensor([0, 1]) if t % 2 == 0 else torch.tensor([2, 3])
        ids[t, 1] = torch.tensor([4, 5])
    return RoutingStream.from_sequences(ids, num_experts=E)


def test_transition_lift_counts_what_follows_and_moves_the_visited_layer():
    stream = alternating_stream()
    lift = count_lift(stream, 8, smoothing=0.0)  # [L, E, E]
    assert lift.shape == (2, 8, 8)
    assert np.allclose(lift[0, 0, [2, 3]], 2.0) and np.allclose(lift[0, 0, [0, 1]], 0.0)  # P = 1 / rate 0.5, 0
    assert np.allclose(lift[0, :, 6], 1.0)  # never routed: no lift
    lift = count_lift(stream, 8)  # smoothed: positive, ordered the same way
    assert np.all(lift > 0) and lift[0, 0, 2] > 1 > lift[0, 0, 0]
    geo = {"num_layers": 2, "num_experts": 8, "top_k": 2}
    table = np.full((CELLS, HORIZON + 1), 1.0 / (HORIZON + 1))
    plain, lifted = LearnedPolicy(table, geo, 1), LearnedPolicy(table, geo, 1, lift=lift, lift_rule={"power": 1.0})
    for p in (plain, lifted):
        ExpertCache(4, 2, 8, None, p)
        p.observe(0, frozenset(), [0, 1])
    assert np.all(lifted.hit[2:4] > plain.hit[2:4]) and np.all(lifted.hit[:2] < plain.hit[:2])
    assert np.array_equal(lifted.hit[8:], plain.hit[8:])  # layer 1 not visited yet: unmoved
    with pytest.raises(ValueError, match="transition lift must be"):
        LearnedPolicy(table, geo, 1, lift=lift[:1])


def test_lift_is_saved_loaded_and_survives_online_refresh(tmp_path):
    stream = alternating_stream()
    geo = geometry_of(stream)
    config = EvictionTrainConfig(choice_calls=300, cost_calls=100, lift_powers=(0.5,), lift_min_gain=-1.0)
    policy, rec = train_learned_policy(stream, geo, tmp_path / "p", config)  # the lift kept whatever it gains
    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    assert saved["format_version"] == 3 and saved["rule"]["lift"] == {"power": 0.5}
    assert "lift_gain" in rec["horizon_choice"]
    assert np.allclose(policy.lift, count_lift(stream, 8, config.lift_smoothing) ** 0.5, rtol=1e-6)
    online = LearnedPolicy(policy.table, geo, 1, online={"prior": 1.0, "period": 1}, lift=count_lift(stream, 8),
                           lift_rule={"power": 0.5})
    ExpertCache(4, 2, 8, None, online)
    for t in range(3 * HORIZON):
        for layer in range(2):
            online.observe(layer, frozenset(), stream.ids[t, layer].tolist())
    cells = online.state.cell.ravel()
    assert np.allclose(online.hit[:-1], online._hit_of[cells] * online._lifted)  # a refresh kept the lift
    # a version-2 policy (no lift) still loads
    (tmp_path / "p" / "config.json").write_text(json.dumps({**saved, "format_version": 2, "rule": {
        **saved["rule"], "lift": None}}))
    assert load_learned_policy(tmp_path / "p").lift is None
    (tmp_path / "p" / "config.json").write_text(json.dumps(saved))
    tensors = read_safetensors(tmp_path / "p" / "model.safetensors")
    write_safetensors(tmp_path / "p" / "model.safetensors", {"table": tensors["table"]})
    with pytest.raises(ValueError, match="names a transition lift"):
        load_learned_policy(tmp_path / "p")

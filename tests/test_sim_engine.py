"""The simulator: Belady's MIN is optimal, runs are monotonic in capacity and bandwidth, the bound holds."""

import functools

import pytest
import torch

from specmoe.sim.bounds import demand_bound
from specmoe.sim.compute import ComputeModel, OpCounts
from specmoe.sim.engine import simulate
from specmoe.sim.hardware import PROFILES
from specmoe.sim.predictions import oracle_candidates, predictor_candidates
from specmoe.sim.shapes import ModelShape
from specmoe.sim.stream import RoutingStream

OPS = OpCounts(layer=80, experts=24, per_pass=60, wrapper=12, predictor=12)


def tiny_shape(layers=3, experts=6, top_k=1, hidden=256):
    cfg = dict(model_type="mixtral", vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=4, num_local_experts=experts, num_experts_per_tok=top_k)
    return ModelShape.from_config(cfg, name="tiny")


def random_stream(passes, layers, experts, top_k, seed, skew=1.0):
    g = torch.Generator().manual_seed(seed)
    popularity = torch.arange(1, experts + 1).float().pow(-skew)
    rows = []
    for _ in range(passes):
        rows.append(torch.stack([popularity[torch.randperm(experts, generator=g)].multinomial(top_k, generator=g)
                                 for _ in range(layers)]))
    return RoutingStream.from_sequences(torch.stack(rows))  # [N, L, k], one token per pass


def brute_force_min_misses(stream: RoutingStream, slots: int) -> int:
    """Fewest misses of any demand cache of `slots` entries, experts of the current layer pinned as acquired."""
    groups = [(layer, sorted({e for e in ids[:, layer].flatten().tolist() if e >= 0}))
              for ids in stream.passes() for layer in range(stream.num_layers)]
    requests = [((layer, e), i) for i, (layer, experts) in enumerate(groups) for e in experts]

    @functools.lru_cache(maxsize=None)
    def best(pos: int, resident: frozenset, pinned: frozenset) -> int:
        if pos == len(requests):
            return 0
        key, group = requests[pos]
        nxt = requests[pos + 1][1] if pos + 1 < len(requests) else None
        def go(res, pin):
            return best(pos + 1, res, pin | {key} if nxt == group else frozenset())
        if key in resident:
            return go(resident, pinned)
        if len(resident) < slots:
            return 1 + go(resident | {key}, pinned)
        return 1 + min(go((resident - {v}) | {key}, pinned) for v in resident if v not in pinned)

    return best(0, frozenset(), frozenset())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("top_k", [1, 2])
def test_belady_equals_brute_force_optimum(seed, top_k):
    shape = tiny_shape(layers=2, experts=4, top_k=top_k)
    stream = random_stream(passes=6, layers=2, experts=4, top_k=top_k, seed=seed, skew=0.3)
    for slots in (2, 3):
        run = simulate(stream, shape, PROFILES["rtx3090"], slots, ops=OPS, policy="belady")
        assert run.misses == brute_force_min_misses(stream, slots)


@pytest.mark.parametrize("seed", range(3))
def test_belady_never_misses_more_than_the_deployable_policies(seed):
    shape = tiny_shape(layers=4, experts=16, top_k=2)
    stream = random_stream(passes=150, layers=4, experts=16, top_k=2, seed=seed)
    for cap in (0.25, 0.5):
        minimum = simulate(stream, shape, PROFILES["rtx3090"], cap, ops=OPS, policy="belady").misses
        for policy in ("lru", "lfu", "hit-density"):
            assert minimum <= simulate(stream, shape, PROFILES["rtx3090"], cap, ops=OPS, policy=policy).misses
        assert minimum < simulate(stream, shape, PROFILES["rtx3090"], cap, ops=OPS, policy="lru").misses


def test_monotonic_in_capacity_and_bandwidth():
    shape = tiny_shape(layers=4, experts=16, top_k=2)
    stream = random_stream(passes=120, layers=4, experts=16, top_k=2, seed=7)
    base = PROFILES["rtx3090"]
    for policy in ("lru", "belady"):
        runs = [simulate(stream, shape, base, cap, ops=OPS, policy=policy, warmup_passes=20)
                for cap in (4, 8, 16, 32, 64)]
        assert all(a.misses >= b.misses for a, b in zip(runs, runs[1:]))
        assert all(a.tok_s <= b.tok_s * (1 + 1e-9) for a, b in zip(runs, runs[1:]))
        assert runs[0].tok_s < runs[-1].tok_s
        for compute in ("hf-eager", "roofline"):  # with host overhead, short copies can hide behind launches
            speeds = [simulate(stream, shape, base.with_(h2d_bytes_per_s=bw), 8, ops=OPS, policy=policy,
                               compute=ComputeModel.from_name(compute)).tok_s for bw in (4e9, 12e9, 24e9, 64e9)]
            assert all(a <= b * (1 + 1e-9) for a, b in zip(speeds, speeds[1:]))
        assert speeds[0] < speeds[-1]


def test_bound_holds_and_oracle_prefetch_beats_demand():
    shape = tiny_shape(layers=4, experts=16, top_k=2, hidden=1024)  # 12 MiB experts: copies cost more than launches
    stream = random_stream(passes=100, layers=4, experts=16, top_k=2, seed=3)
    profile = PROFILES["rtx3090"]
    oracle = oracle_candidates(stream, 16, lookahead=1)
    for cap in (8, 24):
        bound = demand_bound(stream, shape, profile, cap, ops=OPS)
        runs = {policy: simulate(stream, shape, profile, cap, ops=OPS, policy=policy)
                for policy in ("lru", "lfu", "hit-density", "belady")}
        runs["oracle"] = simulate(stream, shape, profile, cap, ops=OPS, candidates=oracle, policy="lru")
        runs["oracle-hd"] = simulate(stream, shape, profile, cap, ops=OPS, candidates=oracle, policy="hit-density")
        for name, run in runs.items():
            assert run.time_s >= bound.time_s * (1 - 1e-9), name
            assert run.bytes_moved >= bound.min_bytes, name
            assert 0 < bound.fraction(run) <= 1 + 1e-9
        assert runs["oracle"].stall_s < runs["lru"].stall_s and runs["oracle"].tok_s > runs["lru"].tok_s
        assert runs["oracle"].prefetch_precision == 1.0  # it only fetches what is routed
    roofline = ComputeModel.from_name("roofline")
    fast = simulate(stream, shape, profile, None, ops=OPS, compute=roofline)
    assert fast.tok_s > simulate(stream, shape, profile, None, ops=OPS).tok_s  # host overhead costs time


def test_unwrapped_and_full_capacity_have_no_misses_after_warmup():
    shape = tiny_shape(layers=3, experts=8, top_k=2)
    stream = random_stream(passes=80, layers=3, experts=8, top_k=2, seed=1, skew=0.0)
    full = simulate(stream, shape, PROFILES["h100"], 1.0, ops=OPS, warmup_passes=40)
    assert full.misses == 0 and full.stall_s == 0 and full.hit_rate == 1.0
    unwrapped = simulate(stream, shape, PROFILES["h100"], None, ops=OPS, warmup_passes=40)
    assert unwrapped.tok_s > full.tok_s  # the runtime's own bookkeeping is not free
    assert unwrapped.device_bytes == shape.total_bytes
    assert full.tokens == unwrapped.tokens == 40


def test_pregate_candidates_through_the_predictor_protocol():
    from specmoe.predictors import PreGatePredictor
    from specmoe.runtime.adapters import RouterWeights

    L, E, H, k = 3, 8, 16, 2
    torch.manual_seed(0)
    routers = [torch.nn.Linear(H, E, bias=False) for _ in range(L)]
    hidden = {layer: torch.randn(40, H) for layer in range(L)}
    ids = torch.stack([routers[layer](hidden[layer]).topk(k).indices for layer in range(L)], dim=1)  # [40, L, k]
    stream = RoutingStream.from_sequences(ids, hidden=hidden)
    from specmoe.geometry import MoEGeometry

    cands = predictor_candidates(stream, PreGatePredictor(lookahead=1), MoEGeometry(L, E, k, H),
                                 [RouterWeights(r, "weight") for r in routers], progress=False)
    assert len(cands) == 40 and all(len(c) == L for c in cands)
    # the next layer's router on this layer's hidden: its top-k for the *same* hidden is the routed set there
    assert cands[0][0][0][0] == 1 and len(cands[0][0]) == k and cands[0][L - 1] == []
    with pytest.raises(ValueError, match="hidden"):
        predictor_candidates(RoutingStream.from_sequences(ids), PreGatePredictor(), MoEGeometry(L, E, k, H), routers)


def test_errors_name_the_problem(tmp_path):
    shape = tiny_shape(layers=3, experts=8, top_k=2)
    stream = random_stream(passes=10, layers=4, experts=8, top_k=2, seed=0)
    with pytest.raises(ValueError, match="L=4"):
        simulate(stream, shape, PROFILES["h100"], 0.5, ops=OPS)
    stream = random_stream(passes=10, layers=3, experts=8, top_k=2, seed=0)
    with pytest.raises(ValueError, match="E=16"):  # same L and k, another number of experts
        simulate(RoutingStream.from_sequences(stream.ids, num_experts=16), shape, PROFILES["h100"], 0.5, ops=OPS)
    with pytest.raises(ValueError, match="experts up to"):
        simulate(stream, tiny_shape(layers=3, experts=4, top_k=2), PROFILES["h100"], 0.5, ops=OPS)
    with pytest.raises(ValueError, match="demand"):
        simulate(stream, shape, PROFILES["h100"], 0.5, ops=OPS, policy="belady", candidates=oracle_candidates(stream, 8))
    with pytest.raises(ValueError, match="eviction policy"):
        simulate(stream, shape, PROFILES["h100"], 0.5, ops=OPS, policy="fifo")
    stream.num_experts = 8
    stream.save(tmp_path / "s.safetensors")
    again = RoutingStream.load(tmp_path / "s.safetensors")
    assert torch.equal(again.ids, stream.ids) and torch.equal(again.pass_offsets, stream.pass_offsets)
    assert again.num_experts == 8
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "s.safetensors").read_bytes()[:50])
    with pytest.raises(ValueError, match="bad.safetensors"):
        RoutingStream.load(tmp_path / "bad.safetensors")


def test_from_passes_keeps_pass_structure():
    prefill, step = torch.randint(0, 8, (5, 3, 2)), torch.randint(0, 8, (1, 3, 2))
    stream = RoutingStream.from_passes([prefill, step, step], calls=[{"passes": 1}, {"passes": 2}])
    assert stream.pass_tokens() == [5, 1, 1] and stream.num_tokens == 7
    with pytest.raises(ValueError, match="calls"):
        RoutingStream.from_passes([prefill, step], calls=[{"passes": 3}])
    shape = tiny_shape(layers=3, experts=8, top_k=2)
    run = simulate(stream, shape, PROFILES["h100"], 2, ops=OPS)  # 2 slots: the prefill layer needs chunks
    assert run.tokens == 7 and len(run.pass_times) == 3 and run.pass_times[0] > run.pass_times[1]


def test_compressed_experts_move_fewer_bytes_and_same_misses():
    shape = tiny_shape(layers=4, experts=8, top_k=2, hidden=512)
    stream = random_stream(60, 4, 8, 2, seed=3)
    plain = simulate(stream, shape, PROFILES["rtx3090"], 0.5, ops=OPS, policy="lru")
    int4 = simulate(stream, shape.compressed("int4-g128"), PROFILES["rtx3090"], 0.5, ops=OPS, policy="lru")
    assert int4.misses == plain.misses > 0  # routing and cache behaviour do not change
    ratio = shape.slot_bytes / shape.compressed("int4-g128").transfer_bytes
    assert 3 < ratio < 4
    assert int4.bytes_moved * ratio == pytest.approx(plain.bytes_moved)
    assert int4.stall_s < plain.stall_s  # copies are shorter even with the dequantization added

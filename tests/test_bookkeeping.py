"""The simulator charges each eviction policy, predictor and copy the runtime's measured bookkeeping
(`sim/calibration/bookkeeping.json`, written by benchmarks/hot_path_cost.py), scaled by the compute model's
`wrapper_s` (what validation fits)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from specmoe.sim import compute as compute_mod
from specmoe.sim.compute import Bookkeeping, ComputeModel, OpCounts, bookkeeping_charges, load_bookkeeping
from specmoe.sim.engine import simulate
from specmoe.sim.hardware import PROFILES
from specmoe.sim.predictions import oracle_candidates
from specmoe.sim.shapes import ModelShape
from specmoe.sim.stream import RoutingStream

ROOT = Path(__file__).resolve().parent.parent
OPS = OpCounts(layer=80, experts=24, per_pass=60, wrapper=12, predictor=12)
BOOK = Bookkeeping("hit-density", {"hit-density": 10e-6, "lru": 4e-6}, {"hit-density": 20e-6, "lru": 5e-6},
                   {"oracle": 30e-6, "history": 50e-6})


def stream_and_shape(passes=80, layers=4, experts=8, top_k=2, seed=0):
    cfg = dict(model_type="mixtral", vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=4, num_local_experts=experts, num_experts_per_tok=top_k)
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(layers)])
                       for _ in range(passes)])  # [N, L, k]
    return RoutingStream.from_sequences(ids), ModelShape.from_config(cfg, name="tiny")


def test_charges_scale_with_wrapper_s_and_fall_back_to_the_default():
    assert BOOK.charges("hit-density", None, 10e-6) == pytest.approx((10e-6, 20e-6, 40e-6))  # mean predictor
    assert BOOK.charges("lru", "oracle", 10e-6) == pytest.approx((4e-6, 5e-6, 30e-6))
    assert BOOK.charges("lru", "oracle", 20e-6) == pytest.approx((8e-6, 10e-6, 60e-6))  # a fitted wrapper_s scales all
    # ... unless the host's own scale is given: then a fitted wrapper_s moves the per-call figures only
    assert BOOK.charges("lru", "oracle", 20e-6, host_scale=1.0) == pytest.approx((8e-6, 5e-6, 30e-6))
    assert BOOK.charges("belady", "unknown", 10e-6) == pytest.approx((10e-6, 20e-6, 40e-6))
    assert BOOK.charges("lru", "oracle", 0.0) == (0.0, 0.0, 0.0)  # roofline: no host overhead


def test_the_shipped_calibration_is_what_hf_eager_charges():
    book = load_bookkeeping()
    model = ComputeModel.from_name("hf-eager")
    if book is None:
        assert model.wrapper_s == compute_mod.ASSUMED_WRAPPER_S and "assumed" in model.source
        return
    assert model.wrapper_s == pytest.approx(book.per_call_s[book.default] * compute_mod.HOST_PYTHON_SCALE)
    assert "measured" in model.source and "was an assumed" in model.source
    for policy in ("hit-density", "lru", "lfu"):
        assert policy in book.per_call_s and book.per_copy_s[policy] >= 0
    assert bookkeeping_charges(model, book.default, None)[0] == pytest.approx(model.wrapper_s)


def test_simulator_charges_each_policy_and_copy_its_measured_bookkeeping(monkeypatch):
    stream, shape = stream_and_shape()
    model = ComputeModel("test", wrapper_s=10e-6)
    profile = PROFILES["rtx3090"]

    def run(book, policy, capacity, **kw):
        monkeypatch.setattr(compute_mod, "load_bookkeeping", lambda: book)
        return simulate(stream, shape, profile, capacity, ops=OPS, compute=model, policy=policy, warmup_passes=30,
                        **kw)

    slow = Bookkeeping("hit-density", {"hit-density": 10e-6, "lru": 1e-3}, BOOK.per_copy_s, BOOK.predictor_s)
    base, dear = run(BOOK, "lru", 1.0), run(slow, "lru", 1.0)
    calls = base.layer_calls
    assert dear.hits == base.hits and dear.misses == base.misses == 0  # the same decisions, every expert resident
    extra = dear.time_s - base.time_s
    assert 0.9 * calls * (1e-3 - 4e-6) <= extra <= 1.01 * calls * (1e-3 - 4e-6)  # host-bound: almost all of it shows
    # the default policy's figure is wrapper_s itself; the others' replace it
    same = Bookkeeping("hit-density", {"hit-density": 10e-6, "lru": 10e-6}, BOOK.per_copy_s, BOOK.predictor_s)
    assert run(same, "lru", 1.0).time_s > base.time_s  # lru measured cheaper than the default: charged less
    # per copy: nothing once every expert is resident, more where experts are copied
    copies = Bookkeeping("hit-density", BOOK.per_call_s, {"hit-density": 20e-6, "lru": 2e-3}, BOOK.predictor_s)
    assert run(copies, "lru", 1.0).time_s == pytest.approx(base.time_s)
    low, low_dear = run(BOOK, "lru", 3), run(copies, "lru", 3)
    assert low.misses == low_dear.misses > 0 and low_dear.time_s > low.time_s
    # per predicted call: the named predictor's figure
    cands = oracle_candidates(stream, 8)
    a = run(BOOK, "lru", 1.0, candidates=cands, predictor="oracle")
    b = run(BOOK, "lru", 1.0, candidates=cands, predictor="history")
    assert a.hits == b.hits and b.time_s > a.time_s


def test_hot_path_cost_writes_the_calibration_from_its_rows():
    spec = importlib.util.spec_from_file_location("hot_path_cost_mod", ROOT / "benchmarks" / "hot_path_cost.py")
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = [dict(policy=p, predictor=q, copies_per_call=c, bookkeeping_us=us) for p, q, c, us in [
        ("hit-density", "none", 0.0, 9.0), ("hit-density", "none", 2.0, 49.0),  # 9 + 20 per copy
        ("lru", "none", 0.0, 5.0), ("lru", "none", 4.0, 45.0),  # 5 + 10 per copy
        ("hit-density", "oracle", 0.0, 39.0), ("hit-density", "oracle", 1.0, 59.0)]]  # 30 beyond the line
    cal = mod.calibration(rows, "hit-density", "cmd", {"device_name": "cpu"})
    assert cal["policies"]["hit-density"]["per_call_s"] == pytest.approx(9e-6)
    assert cal["policies"]["hit-density"]["per_copy_s"] == pytest.approx(20e-6)
    assert cal["policies"]["lru"]["per_copy_s"] == pytest.approx(10e-6)
    assert cal["predictors"]["oracle"]["per_call_s"] == pytest.approx(30e-6)
    assert mod.calibration([r for r in rows if r["policy"] != "lru" or r["predictor"] != "none"] +
                           [dict(policy="lfu", predictor="oracle", copies_per_call=0.0, bookkeeping_us=1.0)],
                           "hit-density", "cmd", {}) is None  # lfu has no row without a predictor
    json.dumps(cal)  # JSON as it is

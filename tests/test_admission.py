"""Prefetch admission: calibrated online, a copy is admitted only when it should pay for itself, and a predictor
that is always wrong costs decode (almost) nothing."""

from specmoe.runtime.admission import PrefetchAdmission
from specmoe.sim.compute import OpCounts
from specmoe.sim.engine import simulate
from specmoe.sim.hardware import PROFILES
from specmoe.sim.shapes import ModelShape
from specmoe.sim.sweep import synthetic_stream

OPS = OpCounts(layer=80, experts=24, per_pass=60, wrapper=12, predictor=12)


def calibrated(p_used: float, late_ok=True, n=400):
    adm = PrefetchAdmission(num_layers=4, copy_s=1.0, layer_s=0.5, late_ok=late_ok)
    for i in range(n):  # rank 0 names expert 1 at layer 1, routed there with frequency p_used
        adm.watch([(1, 1)])
        adm.routed(1, [1] if i % 20 < round(p_used * 20) else [2])
    return adm


def test_calibration_counts_every_candidate_at_its_target():
    good, bad = calibrated(0.9), calibrated(0.1)
    assert abs(good.p(0) - 0.9) < 0.02 and abs(bad.p(0) - 0.1) < 0.02
    assert good.p(5) == 0.5  # an uncalibrated rank: the prior


def test_late_copies_need_a_high_probability_and_none_go_under_auto():
    good, bad = calibrated(0.95), calibrated(0.2)
    # due in 1 period (0.5 s) but a copy takes 1 s: late
    assert good.admit(0, (1, 1), 0, 0, backlog_s=0.0) and not bad.admit(0, (1, 1), 0, 0, backlog_s=0.0)
    auto = calibrated(0.95, late_ok=False)
    assert not auto.admit(0, (1, 1), 0, 0, backlog_s=0.0)  # the host computes it meanwhile
    assert auto.admit(0, (1, 1), 0, 0, backlog_s=0.0) is False and auto.refused == 2
    far = calibrated(0.95, late_ok=False)
    assert far.admit(1, (0, 1), 0, 0, backlog_s=0.0)  # 3 layer calls ahead: 1.5 s, it lands in time


def test_a_useless_predictor_runs_only_at_probe_calls():
    bad = calibrated(0.05)
    probe = PrefetchAdmission.PROBE
    calls = [bad.worth_predicting() for _ in range(7 * probe)]
    assert [i + 1 for i, run in enumerate(calls) if run] == [probe, 3 * probe, 7 * probe]  # backing off
    assert calibrated(0.95).worth_predicting()


def test_an_always_wrong_predictor_costs_decode_almost_nothing():
    shape = ModelShape.from_name("mixtral-8x7b")
    stream = synthetic_stream(shape, passes=80)
    L, E = shape.moe_layers, shape.num_experts
    ids = stream.ids.tolist()  # [P][L][k]
    wrong = [[[((layer + 1) % L, e) for e in range(E) if e not in ids[min(p + (layer + 1) // L, len(ids) - 1)]
               [(layer + 1) % L]][:2] for layer in range(L)] for p in range(stream.num_passes)]
    kw = dict(ops=OPS, policy="lru", warmup_passes=8)
    none = simulate(stream, shape, PROFILES["rtx3090"], 0.3, **kw)
    guessed = simulate(stream, shape, PROFILES["rtx3090"], 0.3, candidates=wrong, **kw)
    assert guessed.prefetch_refused > 0 and guessed.prefetch_used == 0
    assert guessed.tok_s >= 0.99 * none.tok_s  # probes only: the predictor's host time at 1 call in 32

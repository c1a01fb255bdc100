"""Prefetch admission: calibrated online, a copy is admitted only when it should pay for itself, and a predictor
that is always wrong costs decode (almost) nothing."""

from specmoe.runtime.admission import PrefetchAdmission
from specmoe.sim.compute import OpCounts
from specmoe.sim.engine import simulate
from specmoe.sim.hardware import PROFILES
from specmoe.sim.shapes import ModelShape
from specmoe.sim.sweep import synthetic_stream

OPS = OpCounts(layer=80, experts=24, per_pass=60, wrapper=12, predictor=12)


def calibrated(p_used: float, late_ok=True, n=400, host_s=None):
    adm = PrefetchAdmission(num_layers=4, copy_s=1.0, layer_s=0.5, late_ok=late_ok, host_s=host_s)
    for i in range(n):  # rank 0 names expert 1 at layer 1, routed there with frequency p_used
        adm.watch([(1, 1)])
        adm.routed(1, [1] if i % 20 < round(p_used * 20) else [2])
    return adm


def test_calibration_counts_every_candidate_at_its_target():
    good, bad = calibrated(0.9), calibrated(0.1)
    assert abs(good.p(0) - 0.9) < 0.02 and abs(bad.p(0) - 0.1) < 0.02
    assert good.p(5) == 0.5  # an uncalibrated rank: the prior


def test_late_copies_need_a_high_probability_and_under_auto_must_beat_the_host():
    good, bad = calibrated(0.95), calibrated(0.2)
    # due in 1 period (0.5 s) but a copy takes 1 s: late
    assert good.admit(0, (1, 1), 0, 0, backlog_s=0.0) and not bad.admit(0, (1, 1), 0, 0, backlog_s=0.0)
    auto = calibrated(0.95, late_ok=False)
    assert not auto.admit(0, (1, 1), 0, 0, backlog_s=0.0)  # the host computes it meanwhile
    assert auto.admit(0, (1, 1), 0, 0, backlog_s=0.0) is False and auto.refused == 2
    far = calibrated(0.95, late_ok=False)
    assert far.admit(1, (0, 1), 0, 0, backlog_s=0.0)  # 3 layer calls ahead: 1.5 s, it lands in time
    # lands 0.5 s after its use: admitted where the host would take longer than that for the expert, not where less
    slow, fast = calibrated(0.95, late_ok=False, host_s=0.6), calibrated(0.95, late_ok=False, host_s=0.4)
    assert slow.admit(0, (1, 1), 0, 0, backlog_s=0.0) and not fast.admit(0, (1, 1), 0, 0, backlog_s=0.0)
    assert not slow.admit(0, (1, 1), 0, 0, backlog_s=0.2)  # behind 0.2 s of copies it lands after the host


def test_a_useless_predictor_runs_dry_while_calibrating_then_at_probe_calls_only():
    bad = calibrated(0.05)
    bad.predict_s = 100 * PrefetchAdmission.PROBE_SHARE * bad.period  # probes every 100 calls: at most the share
    for _ in range(PrefetchAdmission.WARM):  # calibrating: at every call, copying nothing
        assert bad.worth_predicting() and bad.dry
        bad.call_done(0, 0, predicted=True)
    calls = [bad.worth_predicting() and bad.dry for _ in range(350)]
    assert [i + 1 for i, run in enumerate(calls) if run] == [100, 200, 300]  # dry probes, PROBE_SHARE apart
    cheap = calibrated(0.05)  # a predictor that costs nothing: probes every PROBE calls at most
    for _ in range(PrefetchAdmission.WARM):
        cheap.worth_predicting(), cheap.call_done(0, 0, predicted=True)
    assert sum(cheap.worth_predicting() for _ in range(3 * PrefetchAdmission.PROBE)) == 3


def test_a_dry_call_is_credited_what_its_copies_would_have_saved():
    adm = calibrated(0.95, late_ok=False, host_s=0.6)  # copy 1 s, a layer call 0.5 s
    adm.call_done(0, 0)
    adm.dry_run(0, [(0, (1, 1))])  # lands 0.5 s late (the host would take 0.6 s): admitted, in flight at its use
    adm.dry_run(1, [(0, (3, 2))])  # 2 layer calls ahead (1 s): it lands in time
    before = adm._dry_credit
    adm.routed(1, [1])  # used: a layer call's device time (in flight)
    assert abs(adm._dry_credit - before - 0.5) < 1e-9
    adm.routed(3, [5])  # not used: the link time it would have taken, x rho
    assert abs(adm._dry_credit - before - 0.5 + adm.copy_s * adm.link_load()) < 1e-9
    adm.call_done(0, 0, predicted=True)  # the sample: dry credit (no live call since the last)
    assert adm._dry_credit == 0.0 and adm._samples == 1


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
    assert guessed.prefetch_issued == 0  # calibrated dry, probed dry: it never earns a live call
    assert guessed.predict_skipped > 10 * guessed.predict_calls > 0  # the governor's counters
    assert (guessed.hits, guessed.misses) == (none.hits, none.misses)  # the cache went as without it
    assert guessed.tok_s >= 0.999 * none.tok_s  # probes only: the predictor's host time at a few calls


# ---- misses="auto": copies of host-computed experts (REUSE) ----------------------------------------------------
from specmoe.runtime.admission import ReuseByRecency  # noqa: E402
from specmoe.sim.host import HostProfile  # noqa: E402
from specmoe.sim.stream import RoutingStream  # noqa: E402
import torch  # noqa: E402

REUSE = PrefetchAdmission.REUSE


def test_reuse_by_recency_is_the_hazard_of_the_gap():
    rec = ReuseByRecency()
    for v in range(200):  # expert 1 at odd visits, expert 2 at even ones: every gap is 2
        rec.routed(0, [1] if v % 2 else [2])
    rec.routed(0, [2])  # expert 2 again at once: one gap of 1
    assert rec.p((0, 2)) < 0.05  # just routed: a gap of 1 is rare
    assert rec.p((0, 1)) > 0.9  # routed one visit ago: the gap of 2 ends now
    assert rec.p((0, 7)) < 0.05  # never routed: as long a gap as counted, which never ends


def auto_admission(every: int, p_reuse: float = 0.4, calls: int = 200):
    """misses="auto" admission where a REUSE copy lands in time (1 s, 4 layer calls of 0.5 s ahead), the host's
    experts are reused at their next visit with frequency p_reuse, and one demand copy (1 s) would take the link
    at every `every`-th call."""
    adm = PrefetchAdmission(num_layers=4, copy_s=1.0, layer_s=0.5, late_ok=False, host_s=0.4)
    for i in range(calls):
        adm.watch((), [(0, 1)])
        adm.routed(0, [1] if i % 20 < round(p_reuse * 20) else [2])
        adm.call_done(0, 1, wanted=1 if i % every == 0 else 0)
    return adm


def test_a_reuse_copy_is_charged_its_victim_and_the_demand_copies_it_delays():
    idle, busy = auto_admission(every=40), auto_admission(every=1)
    assert idle.link_load() < 0.1 and busy.link_load() > 0.6
    assert idle.admit(0, (0, 1), REUSE, 0, 0.0, victim=lambda: None)  # a free slot, an idle link: worth it
    assert not busy.admit(0, (0, 1), REUSE, 0, 0.0, victim=lambda: None)  # it would push demand copies to the host
    assert not idle.admit(0, (0, 1), REUSE, 0, 0.0, victim=lambda: False)  # no slot may go
    hot = idle.recency
    for _ in range(50):
        hot.routed(3, [5])  # expert 5 of layer 3: routed at every visit
    assert not idle.admit(0, (0, 1), REUSE, 0, 0.0, victim=lambda: (3, 5))  # its victim is needed more often
    assert not idle.admit(0, (0, 1), REUSE, 0, 4.0, victim=lambda: None)  # behind 4 s of copies: lands too late


def sticky_stream(shape, passes: int, stay: float, seed: int = 0) -> RoutingStream:
    """Decode routing where each layer keeps its previous experts with probability `stay` per slot of top-k."""
    g = torch.Generator().manual_seed(seed)
    L, E, k = shape.moe_layers, shape.num_experts, shape.top_k
    cur = [torch.randperm(E, generator=g)[:k].tolist() for _ in range(L)]
    ids = []
    for _ in range(passes):
        for layer in range(L):
            keep = [e for e in cur[layer] if torch.rand(1, generator=g).item() < stay]
            rest = [e for e in torch.randperm(E, generator=g).tolist() if e not in keep]
            cur[layer] = keep + rest[: k - len(keep)]
        ids.append([list(row) for row in cur])
    return RoutingStream.from_sequences(torch.tensor(ids), num_experts=E)  # one sequence, [N, L, k]


def test_auto_keeps_what_the_host_computed_where_the_link_idles():
    """Mixtral int4 at a capacity near its fit: the host computes the few misses, their copies land in time on a
    link that idles, and the cache learns (before, admission refused them all and auto fell below fetch)."""
    shape = ModelShape.from_name("mixtral-8x7b").compressed("int4-g128")
    stream = sticky_stream(shape, passes=60, stay=0.8)
    kw = dict(ops=OPS, policy="lru", warmup_passes=10)
    host = HostProfile.from_name("3090-box")
    fetch = simulate(stream, shape, PROFILES["rtx3090"], 0.85, **kw)
    auto = simulate(stream, shape, PROFILES["rtx3090"], 0.85, misses="auto", host=host, **kw)
    assert auto.reuse_issued > 0 and auto.reuse_issued == auto.prefetch_issued  # no predictor: all are REUSE
    assert 0 < auto.reuse_used <= auto.prefetch_used
    assert auto.tok_s >= fetch.tok_s


def test_reuse_copies_that_would_crowd_demand_copies_are_refused(monkeypatch):
    """DeepSeek-V2-Lite at 0.1: demand copies keep the link busy; admitting every REUSE copy that lands in time
    (the rule's link and victim terms at 0) is slower than the rule."""
    shape = ModelShape.from_name("deepseek-v2-lite")
    stream = sticky_stream(shape, passes=40, stay=0.3)
    kw = dict(ops=OPS, policy="lru", warmup_passes=8, misses="auto", host=HostProfile.from_name("3090-box"))
    rule = simulate(stream, shape, PROFILES["rtx3090"], 0.1, **kw)
    monkeypatch.setattr(PrefetchAdmission, "link_load", lambda self: 0.0)
    monkeypatch.setattr(ReuseByRecency, "p", lambda self, key: 0.0)
    every = simulate(stream, shape, PROFILES["rtx3090"], 0.1, **kw)
    assert every.reuse_issued > 10 * max(rule.reuse_issued, 1)
    assert rule.tok_s > every.tok_s


# ---- the governor: the predictor runs while what its copies save pays for its calls -------------------------------
def governed(to_copy: bool, predict_s: float, calls: int = 600):
    """A calibrated good predictor (p 0.95) whose candidate at each call is used at its target: not resident
    (`to_copy`: a copy would save a miss) or resident already (nothing to copy)."""
    adm = calibrated(0.95)
    adm.predict_s = predict_s
    ran = []
    for _ in range(calls):
        run = adm.worth_predicting()
        ran.append(run and not adm.dry)
        if run and adm.dry:
            adm.dry_run(0, [(0, (1, 1))] if to_copy else [])
        elif run and to_copy:
            adm.copies_used(1)
        adm.routed(1, [1])  # settles the dry copies
        adm.call_done(0, 0, predicted=run)
    return adm, ran


def test_the_governor_stops_a_predictor_whose_copies_do_not_pay_for_its_calls():
    paying, ran = governed(to_copy=True, predict_s=0.1)  # each call saves a miss (1 s): it goes live, stays live
    assert not any(ran[:PrefetchAdmission.WARM]) and all(ran[PrefetchAdmission.WARM:])  # dry while calibrating
    assert paying.gain > paying.predict_s
    idle, ran = governed(to_copy=False, predict_s=0.1)  # nothing to copy (all resident): its calls are waste
    assert idle.gain < idle.predict_s
    assert sum(ran) == 0  # never live: dry while calibrating, then dry probes only
    every = idle._probe_every()  # a probe's host time is PROBE_SHARE of the calls between two probes
    assert every == int(idle.predict_s / (PrefetchAdmission.PROBE_SHARE * idle.period)) > PrefetchAdmission.PROBE
    probes = [idle.dry for _ in range(3 * every) if idle.worth_predicting()]
    assert len(probes) == 3 and all(probes)  # each a dry run


def test_the_oracle_never_slows_the_reference_routing():
    """benchmarks/results/simulate_host.md had the oracle + fetch at 0.5 slower than no predictor (141.0 vs 158.8
    tok/s): its candidates were mostly resident, so its calls cost 165 us each and saved little; the governor had
    averaged its expected saving over the calls that had something to copy only."""
    from pathlib import Path

    from specmoe.sim.compute import count_ops
    from specmoe.sim.predictions import replay_oracle
    from specmoe.sim.stream import load_stream

    stream = load_stream(Path(__file__).parent.parent / "benchmarks/results/bench_reference_cpu.routing.safetensors")
    shape = ModelShape.from_name("qwen1.5-moe-a2.7b")
    ops = count_ops(shape.model_type)
    oracle = replay_oracle(stream, shape.num_experts, 1)
    kw = dict(warmup_passes=stream.num_passes // 4)
    none = simulate(stream, shape, PROFILES["rtx3090"], 0.5, ops=ops, **kw)
    guessed = simulate(stream, shape, PROFILES["rtx3090"], 0.5, ops=ops.for_predictor(oracle.predict_ops),
                       candidates=oracle.candidates, **kw)
    assert guessed.predict_skipped > 10 * guessed.predict_calls
    assert guessed.tok_s >= 0.995 * none.tok_s


def test_the_predictor_waits_while_a_slot_is_free():
    adm = calibrated(0.95)
    assert not any(adm.worth_predicting(full=False) for _ in range(100))  # nothing run, nothing calibrated
    assert adm._samples == 0 and adm.worth_predicting(full=True) and adm.dry  # then it calibrates, dry


def test_governor_floor_prices_a_dry_predictor_by_its_calls():
    """benchmarks/governor_floor.py: a row whose cache went as none's lost the predictor's host time alone, and a
    two-decimal tie allows only what keeps tok/s rounding to none's."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("governor_floor_mod",
                                                  Path(__file__).parent.parent / "benchmarks" / "governor_floor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert abs(mod.tie_allowance(10.004) - 0.009 / 10.004) < 1e-12  # 9.995 still rounds to 10.00
    assert mod.tie_allowance(23.1651) < 5e-6  # at the rounding edge (23.17) almost nothing is allowed
    same = dict(hits=5, misses=3, prefetch_issued=0, host_computed=0, reuse_issued=0, layer_calls=1000)
    runs = [dict(same, predictor="none", capacity=0.5, misses_mode="fetch", policy="lru", tok_s=10.0, time_s=10.0),
            dict(same, predictor="history", capacity=0.5, misses_mode="fetch", policy="lru", tok_s=10.0 / 1.001,
                 time_s=10.01, predict_calls=40)]
    (row,) = mod.rows_of({"traces": [{"model": "m", "sweep": {"runs": runs}}]})
    assert row["same_cache"] and abs(row["predict_s"] - 0.01 / 40) < 1e-12  # 250 us per call
    assert abs(row["loss"] - 0.001 / 1.001) < 1e-9 and row["loss"] > row["tie_allowance"]


def test_with_misses_on_the_host_the_predictor_fills_the_cache():
    """misses="host": only prefetches fill the cache, so the governor does not wait for a full one (it would never
    come: before, the oracle then never ran and decode was host-only)."""
    from specmoe.sim.predictions import oracle_candidates

    shape = ModelShape.from_name("deepseek-v2-lite")
    stream = sticky_stream(shape, passes=60, stay=0.7)
    kw = dict(ops=OPS, policy="lru", warmup_passes=8, misses="host", host=HostProfile.from_name("3090-box"))
    none = simulate(stream, shape, PROFILES["rtx3090"], 0.3, **kw)
    oracle = simulate(stream, shape, PROFILES["rtx3090"], 0.3, candidates=oracle_candidates(stream, shape.num_experts),
                      **kw)
    assert none.hits == 0 and oracle.predict_calls > 0 and oracle.prefetch_issued > 0 and oracle.hits > 0
    assert oracle.tok_s > none.tok_s


def test_with_misses_on_the_host_the_copies_kept_pay_again():
    """misses="host": only predicted copies fill the cache, so a hit on one after its first use still saves the
    host's compute of the expert; the governor counts it, and the oracle runs at every call (none dry)."""
    adm = PrefetchAdmission(num_layers=4, copy_s=1.0, layer_s=0.5, late_ok=False, host_s=0.6, copies_fill=True)
    adm.copies_kept(3)
    assert abs(adm._credit - 3 * adm.saving) < 1e-12 and adm.saving == 0.6
    assert adm.worth_predicting() and not adm.dry  # calibrating, but live: dry, every miss would stay on the host
    from specmoe.sim.predictions import oracle_candidates

    shape = ModelShape.from_name("deepseek-v2-lite")
    stream = sticky_stream(shape, passes=60, stay=0.7)
    kw = dict(ops=OPS, policy="lru", warmup_passes=8, misses="host", host=HostProfile.from_name("3090-box"))
    oracle = simulate(stream, shape, PROFILES["rtx3090"], 0.3, candidates=oracle_candidates(stream, shape.num_experts),
                      **kw)
    assert oracle.predict_skipped == 0 and oracle.prefetch_issued > 0

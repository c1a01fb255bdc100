"""benchmarks/predictor_quality.py's degraded oracles: recall and precision as set (measured the benchmark's way),
the oracle's candidates at r = p = 1, seeded and deterministic, ranked as asked; the new-expert share and the
interpolated recall a goal needs."""

import importlib.util
from pathlib import Path

import pytest
from routing_synth import synthetic_trace

from specmoe.measure.results import first_crossing
from specmoe.sim.predictions import oracle_candidates
from specmoe.sim.stream import RoutingStream

path = Path(__file__).parent.parent / "benchmarks" / "predictor_quality.py"
spec = importlib.util.spec_from_file_location("predictor_quality", path)
pq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pq)


@pytest.fixture(scope="module")
def stream():
    return RoutingStream.from_trace(synthetic_trace(L=4, E=16, k=2, sequences=30, length=20))


def test_perfect_degraded_oracle_is_the_oracle(stream):
    for la in (1, 2):
        got = pq.degraded_candidates(stream, 16, 1.0, 1.0, la)
        want = oracle_candidates(stream, 16, la)
        assert [[sorted(k) for k in p] for p in got] == [[sorted(k) for k in p] for p in want]


@pytest.mark.parametrize("r,p", [(0.5, 0.5), (0.8, 0.3)])
def test_recall_and_precision_as_set(stream, r, p):
    cands = pq.degraded_candidates(stream, 16, r, p, 1, seed=3)
    q = pq.quality(stream, cands, pq.recent_experts(stream, 2))
    assert abs(q["recall"] - r) < 0.04 and abs(q["precision"] - p) < 0.04
    assert abs(q["new_recall"] - r) < 0.06  # the draws do not look at residency
    assert cands == pq.degraded_candidates(stream, 16, r, p, 1, seed=3)  # seeded: the same every time
    assert cands != pq.degraded_candidates(stream, 16, r, p, 1, seed=4)


def test_true_first_ranks_the_routed_experts_first(stream):
    passes = [ids.tolist() for ids in stream.passes()]
    cands = pq.degraded_candidates(stream, 16, 0.7, 0.5, 1, order="true-first")
    shuffled = pq.degraded_candidates(stream, 16, 0.7, 0.5, 1, order="shuffled")
    out_of_order = 0
    for p, per_layer in enumerate(cands[:-1]):
        for layer, keys in enumerate(per_layer):
            q, t = (p, layer + 1) if layer + 1 < 4 else (p + 1, 0)
            hit = [e in passes[q][0][t] for _, e in keys]
            assert hit == sorted(hit, reverse=True)
            assert sorted(keys) == sorted(shuffled[p][layer])
            h2 = [e in passes[q][0][t] for _, e in shuffled[p][layer]]
            out_of_order += h2 != sorted(h2, reverse=True)
    assert out_of_order > 0


def test_new_experts_and_needed_recall(stream):
    passes = [ids.tolist() for ids in stream.passes()]
    recent = pq.recent_experts(stream, 2)
    for p in range(2, 20):  # the first sequence: pass 0 has no token before
        for t in range(4):
            assert recent[p][t] == set(passes[p - 1][0][t]) | set(passes[p - 2][0][t])
    assert recent[0][0] == set() and recent[1][2] == set(passes[0][0][2])
    assert recent[20][1] == set()  # a new sequence knows nothing before it
    q = pq.quality(stream, pq.degraded_candidates(stream, 16, 1.0, 1.0), recent)
    assert q["new_recall"] == q["new_precision"] == 1.0
    assert first_crossing([(0.2, 0.0), (0.6, 0.05), (1.0, 0.15)], 0.10) == pytest.approx(0.8)
    assert first_crossing([(0.2, 0.0), (1.0, 0.05)], 0.10) is None
    with pytest.raises(ValueError, match="precision"):
        pq.degraded_candidates(stream, 16, 0.5, 0.0)


def test_rank_precision_and_the_script_end_to_end(stream, tmp_path):
    """True-first ranks the routed ones first (precision falls with rank, as a trained predictor's); and the
    script on a tiny imported Mixtral-geometry trace with a saved affinity predictor: JSON, table, answer."""
    import json

    from test_import_routing import make_routing, write_jsonl

    from specmoe.predictors import AffinityPredictor
    from specmoe.traces import load_traces
    from specmoe.traces.importers import import_routing

    recent = pq.recent_experts(stream, 2)
    ranked = pq.quality(stream, pq.degraded_candidates(stream, 16, 0.7, 0.5, order="true-first"), recent)
    flat = pq.quality(stream, pq.degraded_candidates(stream, 16, 0.7, 0.5), recent)
    assert ranked["precision_at_rank"][0] > 0.9 > 0.6 > flat["precision_at_rank"][0]
    names = ("problem_id", "token_idx", "layer", "experts", "gating_probs")
    routing = make_routing(sequences=2, tokens=6, layers=32, experts=8, k=2, seed=1)
    import_routing("speculative-moe", [write_jsonl(tmp_path / "t.jsonl", routing, shuffle=False, names=names)],
                   tmp_path / "test", progress=False)
    AffinityPredictor(load_traces(tmp_path / "test").geometry, context=2, tokens=1).save(tmp_path / "p" / "tr-aff")
    assert pq.main([str(tmp_path / "test"), "--load-predictors", str(tmp_path / "p"), "--train-name", "tr",
                    "--trained", "aff", "--recalls", "0.5", "1.0", "--precisions", "1.0", "--oracle-lookaheads", "1",
                    "--warmup", "1", "--quiet", "--out", str(tmp_path), "--name", "q"]) == 0
    res = json.loads((tmp_path / "q.json").read_text())["result"]
    assert res["oracles"][0]["recall"] == 1.0 and [t["predictor"] for t in res["trained"]] == ["aff"]
    assert len(res["grid"]) == 2 and {"fetch", "auto"} <= set(res["summary"])
    md = (tmp_path / "q.md").read_text()
    assert "| aff |" in md and "Answer, per misses mode" in md and "Why: `runtime/admission.py`" in md
    (tmp_path / "q.md").unlink()
    assert pq.main(["--report-only", "--out", str(tmp_path), "--name", "q"]) == 0
    assert (tmp_path / "q.md").read_text() == md

"""The affinity predictor's `new` option (issue 18: rank only the experts a copy can bring): its targets and its
ranking leave out the experts routed at the target layer in the tokens before, decode-time scores equal the
training features, it is learned by the one training loop, saved and loaded (that a wrapped tiny model gives the
unwrapped model's tokens with it: test_predictor_affinity's same-tokens test, run with new=0 and 1)."""

import torch
from routing_synth import synthetic_trace
from test_predictor_affinity import QUICK, random_predictor, repeating_trace

from specmoe.predictors import load_predictor
from specmoe.training.evaluate import decode_replay
from specmoe.training.loop import train_predictor


def recent(trace, token: int, layer: int, n: int) -> set[int]:
    """Experts routed at `layer` in the n tokens before `token` (same sequence)."""
    first = int(trace.offsets[trace.sequence_of()[token]])
    return {int(e) for i in range(max(first, token - n), token) for e in trace.ids[i, layer]}


def test_targets_and_scores_leave_out_the_recent_experts():
    trace = repeating_trace(sequences=4, length=12, stay=0.5)
    geo = trace.geometry
    L = geo.num_layers
    pred = random_predictor(geo, lookahead=2, context=2, tokens=2, new=2)
    plain = random_predictor(geo, lookahead=2, context=2, tokens=2)
    tokens = torch.arange(trace.num_tokens)
    for layer in range(L):
        lay = torch.full((trace.num_tokens,), layer)
        ids, valid = pred.train_targets(trace, lay, tokens)
        all_ids, all_valid = plain.train_targets(trace, lay, tokens)
        with torch.no_grad():
            logits = pred.train_logits(trace, lay, tokens)
            assert torch.equal(plain.train_logits(trace, lay, tokens) != logits, logits == pred.MASKED)
        for i in range(trace.num_tokens):
            for d in range(2):
                t, tok = (layer + d + 1) % L, i + (layer + d + 1 >= L)
                if not all_valid[i, d] or tok >= trace.num_tokens:
                    continue
                gone = recent(trace, tok, t, 2)
                assert {int(e) for e in ids[i, d] if e >= 0} == {int(e) for e in all_ids[i, d]} - gone
                assert bool(valid[i, d]) == bool({int(e) for e in all_ids[i, d]} - gone)
                masked = {int(e) for e in torch.nonzero(logits[i, d] == pred.MASKED).flatten()}
                assert masked == gone
    a, b = int(trace.offsets[1]), int(trace.offsets[2])
    _, decoded = decode_replay(pred, trace, a, b)  # the runtime's state across passes gives the same scores
    for layer in range(L):
        with torch.no_grad():
            train = pred.train_logits(trace, torch.full((b - a,), layer), torch.arange(a, b))
        for t, scores in decoded[layer].items():
            torch.testing.assert_close(scores, train[:, t - layer - 1])


def test_learns_new_experts_and_saves(tmp_path):  # wrapped: test_predictor_affinity's same-tokens test
    splits = synthetic_trace(sequences=40, length=16, noise=0.3).split(seed=0)
    geo = splits["train"].geometry
    torch.manual_seed(0)
    from specmoe.predictors import AffinityPredictor

    pred = AffinityPredictor(geo, lookahead=1, context=2, tokens=1, new=1)
    res = train_predictor(pred, splits["train"], splits["val"], QUICK, progress=False)
    assert res.best_val_recall > res.initial_val_recall + 0.2  # recall of the new experts, learned
    pred.save(tmp_path / "new")
    back = load_predictor(tmp_path / "new", geometry=geo)
    assert back.config() == pred.config() and back.new == 1


def test_confident_names_only_the_likely_experts(tmp_path):
    """`confident`: decode scores are the training logits raised to logit(c), so only experts of probability above
    c are named (rank_by_votes of top_candidates), and training is unchanged."""
    from specmoe.predictors.base import top_candidates

    trace = repeating_trace(sequences=3, length=10, stay=0.5)
    geo = trace.geometry
    plain = random_predictor(geo, lookahead=1, context=2, tokens=2, new=1)
    sure = random_predictor(geo, lookahead=1, context=2, tokens=2, new=1, confident=0.9)
    tokens = torch.arange(trace.num_tokens)
    with torch.no_grad():
        for layer in range(geo.num_layers):
            lay = torch.full((trace.num_tokens,), layer)
            assert torch.equal(plain.train_logits(trace, lay, tokens), sure.train_logits(trace, lay, tokens))
    _, a = decode_replay(plain, trace, 0, 10)
    _, b = decode_replay(sure, trace, 0, 10)
    floor = torch.logit(torch.tensor(0.9)).item()
    fewer = 0
    for layer in range(geo.num_layers):
        for t in a[layer]:
            torch.testing.assert_close(b[layer][t], a[layer][t].clamp(min=floor))
            named = top_candidates(b[layer][t], geo.top_k)  # [T, k]
            probs = torch.sigmoid(a[layer][t]).gather(1, named.clamp(min=0))
            assert bool((probs[named >= 0] > 0.9).all())
            fewer += int((named < 0).sum())
    assert fewer > 0
    sure.save(tmp_path / "sure")
    assert load_predictor(tmp_path / "sure", geometry=geo).config()["confident"] == 0.9

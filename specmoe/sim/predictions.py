"""What a predictor would prefetch at each MoE layer of a routing stream, for the simulator to replay.

The result, `candidates[p][l]`, is the ranked list of (layer, expert) keys the runtime would queue for
prefetch after routing layer l of pass p: the same ranking as `SpeculativeMoE` (per target layer, each
token's top-`width` experts vote with rank weights, rows that carry no information name none; targets past
the last layer name the next pass's layers). Both use `specmoe.predictors.base.top_candidates` and
`rank_by_votes`.
"""

# Shape legend: N tokens, T tokens of one pass, E experts, L MoE layers, k top-k, H hidden, m prefetch width

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..geometry import MoEGeometry
from ..predictors.base import READS_HIDDEN, rank_by_votes, top_candidates
from ..predictors.replay import replay_stateful
from ..runtime.cache import Key
from .stream import RoutingStream
Candidates = list[list[list[Key]]]  # [pass][layer] -> ranked keys


def predictor_candidates(stream: RoutingStream, predictor, geometry: MoEGeometry, routers=(),
                         width: int | None = None, chunk: int = 4096, progress: bool = True,
                         wrap: bool = True) -> Candidates:
    """Run a `specmoe.predictors.Predictor` over a stream's hidden states and routing history.

    Scores are computed for many tokens per call (each token with its own hidden state and history, which
    is all the protocol gives a predictor), so predictors with state across passes (the oracle) should use
    `oracle_candidates` instead.

    Args:
        stream: the routing stream, with hidden states of every layer if the predictor reads them.
        predictor: the predictor; it is bound to `geometry` and `routers` here.
        geometry: the model's routing geometry.
        routers: the model's RouterWeights per MoE layer (for the pre-gate).
        width: experts per token per target layer (default: top-k, as the runtime).
        wrap: keep targets past the last layer (the next pass's first layers); False for encoder-decoder
            models, whose next pass starts elsewhere (as the runtime does).

    Raises:
        ValueError: the stream lacks the hidden states the predictor needs, or its geometry differs.
    """
    L, E, k = geometry.num_layers, geometry.num_experts, geometry.top_k
    stream.check_geometry(L, k, E, what="predictor's geometry")
    missing = [layer for layer in range(L) if layer not in stream.hidden]
    if missing and getattr(predictor, "kind", None) in READS_HIDDEN:
        raise ValueError(f"the stream has no hidden states for MoE layers {missing}; record it with "
                         "capture_routing(model, hidden_layers=range(L)) to replay a predictor")
    predictor.bind(geometry, list(routers))
    m = min(width or k, E)
    if getattr(predictor, "stateful", False):  # it reads the passes before: called pass by pass, as the runtime does
        return _stateful_candidates(stream, predictor, geometry, m, progress, wrap)
    N = stream.num_tokens
    parts: list[dict[int, list[torch.Tensor]]] = [dict() for _ in range(L)]  # layer -> target -> chunks [n, m]
    with torch.no_grad():
        for a in tqdm(range(0, N, chunk), desc="predict", unit="chunk", disable=not progress):
            predictor.reset()  # each chunk is called like one forward pass: layers in order, same tokens
            if hasattr(predictor, "start_pass"):
                predictor.start_pass(0)
            for layer in range(L):
                n = min(chunk, N - a)
                hidden = stream.hidden[layer][a : a + chunk].float() if layer in stream.hidden else \
                    torch.zeros(1, geometry.hidden_size).expand(n, -1)  # [n, H] (read by none of them)
                scores = predictor.predict(layer, hidden, stream.ids[a : a + chunk, : layer + 1])
                for target, s in scores.items():
                    if wrap or target < L:
                        parts[layer].setdefault(target, []).append(top_candidates(s, m).cpu())  # [n, m]
    top = [{t: torch.cat(v) for t, v in per.items()} for per in parts]  # layer -> target -> [N, m]
    off = stream.pass_offsets.tolist()
    out: Candidates = []
    for p in range(stream.num_passes):
        a, b = off[p], off[p + 1]
        per_layer = []
        for layer in range(L):
            keys: list[Key] = []
            for target, best in sorted(top[layer].items()):  # best [N, m]
                keys.extend((target % L, e) for e in rank_by_votes(best[a:b].flatten().tolist(), best.shape[1]))
            per_layer.append(keys)
        out.append(per_layer)
    return out


@torch.no_grad()
def _stateful_candidates(stream: RoutingStream, predictor, geometry: MoEGeometry, m: int, progress: bool,
                         wrap: bool) -> Candidates:
    """`predictor_candidates` of a `Predictor.stateful` predictor, replayed pass by pass as `SpeculativeMoE` runs it
    (`predictors.replay.replay_stateful`: reset at each sequence's first pass, `start_pass`, one `predict` per MoE
    layer with the pass's routing so far)."""
    L = geometry.num_layers
    passes = replay_stateful(predictor, stream.ids, stream.hidden, stream.pass_offsets.tolist(),
                             set(stream.seq_offsets.tolist()), geometry.hidden_size, dtype=torch.float32)
    out: Candidates = []
    for _, scores in tqdm(passes, total=stream.num_passes, desc="predict", unit="pass", disable=not progress):
        per_layer = []
        for per_target in scores:
            keys: list[Key] = []
            for target in sorted(t for t in per_target if wrap or t < L):
                best = top_candidates(per_target[target], m).flatten().tolist()
                keys.extend((target % L, e) for e in rank_by_votes(best, m))
            per_layer.append(keys)
        out.append(per_layer)
    return out


def oracle_candidates(stream: RoutingStream, num_experts: int, lookahead: int = 1, width: int | None = None,
                      wrap: bool = True) -> Candidates:
    """The oracle: at layer l of pass p, the experts actually routed at layers l+1..l+lookahead (past the last
    layer: the next pass's first layers), exactly as the runtime ranks `OraclePredictor`'s scores: token t of
    the current pass scores 1 for the experts of the target pass's tokens t, t + T, ... (0 elsewhere), so a
    row with nothing routed names none, and ties go to the lower id.

    Args:
        width: experts per token per target layer (default: top-k, as the runtime).
        wrap: keep targets past the last layer; False for encoder-decoder models (as the runtime does).
    """
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")
    from .engine import gc_paused

    with gc_paused():  # plain lists, no cycles
        return _oracle_candidates(stream, num_experts, lookahead, width, wrap)


def _oracle_candidates(stream: RoutingStream, num_experts: int, lookahead: int, width: int | None,
                       wrap: bool) -> Candidates:
    L, E = stream.num_layers, num_experts
    m = min(width or stream.top_k, E)
    passes = [ids.tolist() for ids in stream.passes()]  # [P][T][L][k]
    memo: dict[tuple[int, int, int], list[int]] = {}  # (source pass, target layer, tokens now) -> ranked ids

    def ranked(src: int, tl: int, T: int) -> list[int]:
        if T == 1 and len(passes[src]) == 1:  # one token scoring its own experts: they rank ascending
            row = sorted({e for e in passes[src][0][tl] if e >= 0})
            return row[:m] if len(row) < E else []
        got = memo.get((src, tl, T))
        if got is None:
            rows: list[set[int]] = [set() for _ in range(T)]  # the experts scoring 1 in each row
            for j, token in enumerate(passes[src]):
                rows[j % T].update(e for e in token[tl] if e >= 0)
            top: list[int] = []
            for row in rows:  # top_candidates of a 0/1 row: its ones, ascending; none if it is constant
                best = sorted(row)[:m] if len(row) < E else []
                top += best + [-1] * (m - len(best))
            got = memo[(src, tl, T)] = rank_by_votes(top, m)
        return got

    key = [[(layer, e) for e in range(E)] for layer in range(L)]  # made once
    last = 2 * L if wrap else L
    out: Candidates = []
    for p, routed in enumerate(passes):
        T = len(routed)
        per_layer = []
        for layer in range(L):
            keys: list[Key] = []
            stop = layer + 1 + lookahead
            for target in range(layer + 1, stop if stop < last else last):
                src, tl = (p, target) if target < L else (p + 1, target - L)
                if src < len(passes):
                    row = key[tl]
                    keys += [row[e] for e in ranked(src, tl, T)]
            per_layer.append(keys)
        out.append(per_layer)
    return out


@dataclass
class PredictorReplay:
    """What the simulator needs of a predictor: its candidates on a stream, its lookahead (the runtime's bound on
    prefetches in flight is 2 * k * lookahead) and the aten ops of one `predict` call per MoE layer (host cost;
    None: the pre-gate's)."""

    name: str
    candidates: Candidates
    lookahead: int = 1
    predict_ops: float | None = None


def replay_predictor(stream: RoutingStream, predictor, geometry: MoEGeometry, routers=(), name: str | None = None,
                     progress: bool = True) -> PredictorReplay:
    """Candidates and host cost of a `specmoe.predictors.Predictor` on `stream` (see `predictor_candidates`)."""
    from .compute import count_predictor_ops

    candidates = predictor_candidates(stream, predictor, geometry, routers, progress=progress)
    return PredictorReplay(name or getattr(predictor, "kind", type(predictor).__name__), candidates,
                           getattr(predictor, "lookahead", 1), count_predictor_ops(predictor, geometry, routers))


def replay_oracle(stream: RoutingStream, num_experts: int, lookahead: int = 1) -> PredictorReplay:
    """The oracle's candidates (`oracle_candidates`) and the host cost of `OraclePredictor.predict`."""
    from ..predictors import OraclePredictor
    from .compute import count_predictor_ops

    probe = OraclePredictor([stream.ids[:1]] * 2, lookahead=lookahead)
    ops = count_predictor_ops(probe, MoEGeometry(stream.num_layers, num_experts, stream.top_k, 8))
    return PredictorReplay("oracle", oracle_candidates(stream, num_experts, lookahead), lookahead, ops)

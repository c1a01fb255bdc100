"""What a predictor would prefetch at each MoE layer of a routing stream, for the simulator to replay.

The result, `candidates[p][l]`, is the ranked list of (layer, expert) keys the runtime would queue for
prefetch after routing layer l of pass p: the same ranking as `SpeculativeMoE` (per target layer, each
token's top-`width` experts vote with rank weights; targets past the last layer name the next pass's layers).
Both use `specmoe.predictors.base.rank_by_votes`.
"""

# Shape legend: N tokens, T tokens of one pass, E experts, L MoE layers, k top-k, H hidden, m prefetch width

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..geometry import MoEGeometry
from ..predictors.base import READS_HIDDEN, rank_by_votes
from ..runtime.cache import Key
from .stream import RoutingStream
Candidates = list[list[list[Key]]]  # [pass][layer] -> ranked keys


def predictor_candidates(stream: RoutingStream, predictor, geometry: MoEGeometry, routers=(),
                         width: int | None = None, chunk: int = 4096, progress: bool = True) -> Candidates:
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
    N = stream.num_tokens
    parts: list[dict[int, list[torch.Tensor]]] = [dict() for _ in range(L)]  # layer -> target -> chunks [n, m]
    with torch.no_grad():
        for a in tqdm(range(0, N, chunk), desc="predict", unit="chunk", disable=not progress):
            predictor.reset()  # each chunk is called like one forward pass: layers in order, same tokens
            for layer in range(L):
                n = min(chunk, N - a)
                hidden = stream.hidden[layer][a : a + chunk].float() if layer in stream.hidden else \
                    torch.zeros(1, geometry.hidden_size).expand(n, -1)  # [n, H] (read by none of them)
                scores = predictor.predict(layer, hidden, stream.ids[a : a + chunk, : layer + 1])
                for target, s in scores.items():
                    parts[layer].setdefault(target, []).append(s.float().topk(m, dim=-1).indices.cpu())  # [n, m]
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


def oracle_candidates(stream: RoutingStream, num_experts: int, lookahead: int = 1) -> Candidates:
    """The oracle: at layer l of pass p, the experts actually routed at layers l+1..l+lookahead (past the last
    layer: the next pass's first layers), ranked by how many tokens use them. Equivalent to
    `OraclePredictor` with the runtime's default prefetch width (top-k)."""
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")
    L, E = stream.num_layers, num_experts
    passes = stream.passes()
    out: Candidates = []
    for p, ids in enumerate(passes):
        per_layer = []
        for layer in range(L):
            keys: list[Key] = []
            for target in range(layer + 1, layer + 1 + lookahead):
                src, tl = (p, target) if target < L else (p + 1, target - L)
                if src >= len(passes):
                    continue
                routed = passes[src][:, tl]  # [T', k]
                routed = routed[routed >= 0]
                counts = torch.bincount(routed, minlength=E)
                keys.extend((tl, e) for e in sorted(counts.nonzero().flatten().tolist(), key=lambda e: (-int(counts[e]), e)))
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

"""Evaluate predictors on held-out traces exactly as the runtime calls them.

Whole sequences are replayed as forward passes: at each MoE layer l every predictor gets the hidden state
entering l and the routing of layers 0..l, as `SpeculativeMoE` gives them (a stateful predictor, which keeps the
previous tokens' routing, token by token: `decode_replay`), and its scores for target layer
t = l + d are compared with what was routed at t (t >= L: layer t - L of the next token of the sequence).
Metrics are kept per lookahead d and per source layer l, within the token and across the token boundary.
"""

# Shape legend: T tokens in a pass, E experts, H hidden, L MoE layers, k top-k, D lookahead

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..measure import timed_call
from ..predictors.base import READS_HIDDEN, Predictor
from ..predictors.replay import replay_stateful
from ..traces.dataset import RoutingTrace
from .metrics import RECALL_MULTIPLES, TOP_N, PredictionMetrics

logger = logging.getLogger(__name__)

NEEDS_ROUTERS = frozenset({"pregate"})  # ... and the model's routers (a trained `hidden` carries its own)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings.

    Args:
        lookahead: D, lookaheads 1..D are reported (a predictor reports those it scores).
        multiples: m / k values for recall@m and precision@m.
        top_n: n values for top-n accuracy of the primary expert.
        pass_tokens: tokens per replayed forward pass (whole sequences are packed up to this).
        latency_calls: timed single-token predict calls per predictor (spread over layers and tokens).
        device: where predictors run ("cpu" default).
    """

    lookahead: int = 2
    multiples: tuple[int, ...] = RECALL_MULTIPLES
    top_n: tuple[int, ...] = TOP_N
    pass_tokens: int = 2048
    latency_calls: int = 480
    device: str = "cpu"

    def __post_init__(self):
        if self.lookahead < 1 or self.pass_tokens < 1 or self.latency_calls < 0:
            raise ValueError(f"EvalConfig needs lookahead >= 1, pass_tokens >= 1, latency_calls >= 0; got {self}")
        if not self.multiples or not self.top_n or min(self.multiples) < 1 or min(self.top_n) < 1:
            raise ValueError("EvalConfig.multiples and top_n must be non-empty lists of positive ints")


def _passes(trace: RoutingTrace, pass_tokens: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) of whole consecutive sequences, each about pass_tokens long (at least one)."""
    out, off = [], trace.offsets.tolist()
    start = 0
    for s in range(1, len(off)):
        if off[s] - off[start] >= pass_tokens or s == len(off) - 1:
            out.append((off[start], off[s]))
            start = s
    return out


@torch.no_grad()
def decode_latency_us(predictor: Predictor, trace: RoutingTrace, calls: int = 480, device="cpu") -> float:
    """Median wall time (µs) of one `predict` call for one token (a decode step), over layers and tokens.

    Timed with `specmoe.measure.timed_call` (after a device sync; CUDA events on CUDA, so this is the time until
    the scores exist).
    """
    device = torch.device(device)
    L = trace.geometry.num_layers
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(trace.num_tokens, (max(calls, 1),), generator=g)
    hidden = {layer: h.to(device) for layer, h in trace.hidden.items()}
    ids = trace.ids.to(device)
    times = []
    start_pass = getattr(predictor, "start_pass", None)
    for i, tok in enumerate(tokens.tolist()):
        layer = i % L
        if layer == 0 and start_pass is not None:  # each round of layers is a decode pass of its own
            start_pass(i // L)
        h = hidden[layer][tok : tok + 1] if layer in hidden else torch.zeros(1, trace.geometry.hidden_size, device=device)
        hist = ids[tok : tok + 1, : layer + 1]
        times.append(timed_call(lambda: predictor.predict(layer, h, hist), device)[0])
    warm = times[L:] if len(times) > 2 * L else times  # the first round of layers warms caches up
    return statistics.median(warm) * 1e6


@torch.no_grad()
def decode_replay(predictor: Predictor, trace: RoutingTrace, start: int, end: int,
                  device="cpu") -> tuple[float, list[dict[int, torch.Tensor]]]:
    """Tokens start..end of one sequence decoded one pass per token, as the runtime runs a stateful predictor
    (`Predictor.stateful`, replayed by `predictors.replay.replay_stateful`): reset, then `start_pass(i)` and one
    `predict` per MoE layer for token i.

    Returns:
        (seconds spent in `predict`, per layer {target: scores [end - start, E]}).
    """
    L = trace.geometry.num_layers
    rows: list[dict[int, list[torch.Tensor]]] = [dict() for _ in range(L)]
    hidden = {layer: h[start:end] for layer, h in trace.hidden.items()}  # [T, H] views
    passes = replay_stateful(predictor, trace.ids[start:end], hidden, range(end - start + 1), {0},
                             trace.geometry.hidden_size, device)
    t0 = time.perf_counter()
    for _, scores in passes:
        for layer, per_target in enumerate(scores):
            for t, s in per_target.items():
                rows[layer].setdefault(t, []).append(s)
    seconds = time.perf_counter() - t0
    return seconds, [{t: torch.cat(v) for t, v in per.items()} for per in rows]


@torch.no_grad()
def evaluate_predictors(predictors: Mapping[str, Predictor], trace: RoutingTrace,
                        config: EvalConfig = EvalConfig(), progress: bool = True) -> dict:
    """Metrics of every predictor on `trace` (held-out sequences).

    Predictors must already be bound (`bind(geometry, routers)`); each is reset before its replay.

    Returns:
        {name: {"lookahead": {d: {"within": metrics, "cross": metrics | None, "per_layer": [metrics per
        source layer]}}, "latency_us": {"decode": median µs per single-token call, "batched_per_token":
        µs per token per layer in the replay}}}; metrics are `PredictionMetrics.result()` dicts.

    Raises:
        ValueError: the trace lacks hidden states at some MoE layer and a predictor reads them, or is empty.
    """
    geo = trace.geometry
    L, E, k = geo.num_layers, geo.num_experts, geo.top_k
    missing = sorted(set(range(L)) - set(trace.hidden))
    readers = [name for name, p in predictors.items() if p.kind in READS_HIDDEN]
    if missing and readers:
        raise ValueError(f"{readers} read the hidden states of every MoE layer; the trace lacks layers "
                         f"{missing[:8]}{'...' if len(missing) > 8 else ''} (collect with --hidden-layers all, or "
                         "leave those predictors out: see `unavailable`)")
    if trace.num_tokens == 0:
        raise ValueError("the evaluation trace is empty")
    device = torch.device(config.device)
    D = config.lookahead
    has_next = trace.has_next
    passes = _passes(trace, config.pass_tokens)
    results = {}
    for name, predictor in predictors.items():
        new = lambda: PredictionMetrics(k, E, config.multiples, config.top_n)  # noqa: E731
        per = {(d, layer): new() for d in range(1, D + 1) for layer in range(L)}
        predictor.reset()
        spent = 0.0
        start_pass = getattr(predictor, "start_pass", None)
        stateful = getattr(predictor, "stateful", False)  # decoded token by token, one sequence at a time
        units = list(zip(trace.offsets[:-1].tolist(), trace.offsets[1:].tolist())) if stateful else passes
        for p, (start, end) in enumerate(tqdm(units, desc=f"eval {name}", unit="seq" if stateful else "pass",
                                              disable=not progress)):
            if start_pass is not None and not stateful:  # the pass index, handed on as the runtime does (never guessed)
                start_pass(p)
            ids = trace.ids[start:end]  # [T, L, k]
            ids_dev = ids.to(device)
            nxt = has_next[start:end]  # [T]
            nxt_ids = torch.cat([ids[1:], ids[-1:]])  # [T, L, k] the next token's routing
            if stateful:
                seconds, decoded = decode_replay(predictor, trace, start, end, device)
                spent += seconds
            for layer in range(L):
                if stateful:
                    scores = decoded[layer]
                else:
                    hidden = trace.hidden[layer][start:end].to(device) if layer in trace.hidden else \
                        torch.zeros(1, geo.hidden_size, device=device).expand(end - start, -1)  # read by none of them
                    seconds, scores = timed_call(lambda: predictor.predict(layer, hidden, ids_dev[:, : layer + 1]),
                                                 device)
                    spent += seconds
                for t, s in scores.items():
                    d = t - layer
                    if d > D:
                        continue
                    if t < L:
                        per[(d, layer)].add(s, ids[:, t])
                    elif t < 2 * L:
                        per[(d, layer)].add(s[nxt], nxt_ids[nxt, t - L])
        lookahead = {}
        for d in range(1, D + 1):
            within, cross = new(), new()
            for layer in range(L):
                (within if layer + d < L else cross).merge(per[(d, layer)])
            lookahead[d] = {
                "within": within.result(),
                "cross": cross.result() if cross.count else None,
                "per_layer": [per[(d, layer)].result() for layer in range(L)],
            }
        latency = {"batched_per_token": spent / (trace.num_tokens * L) * 1e6}
        if config.latency_calls:
            latency["decode"] = decode_latency_us(predictor, trace, config.latency_calls, device)
        results[name] = {"lookahead": lookahead, "latency_us": latency}
        logger.info("%s: recall@k at d=1 %.4f", name, lookahead[1]["within"]["recall@k"])
    return results


def describe(predictor: Predictor) -> dict:
    """The kind, config and parameter count of a predictor, for reports."""
    params = predictor.num_parameters() if hasattr(predictor, "num_parameters") else \
        sum(t.numel() for t in predictor.state_tensors().values())
    return {"kind": predictor.kind, "config": predictor.config(), "parameters": int(params)}


def eval_settings(config: EvalConfig, trace: RoutingTrace, extra: Mapping | None = None) -> dict:
    """Settings block of an evaluation report."""
    out = {"eval": asdict(config), "test_tokens": trace.num_tokens, "test_sequences": trace.num_sequences,
           "geometry": trace.geometry.to_dict()}
    if trace.manifest is not None:
        out["model"] = trace.manifest.model
        out["source"] = trace.manifest.source
    out.update(extra or {})
    return out


def unavailable(kind: str, trace: RoutingTrace) -> str | None:
    """Why a predictor of `kind` cannot run on `trace` (a routing-only trace, e.g. from `specmoe
    import-routing`, has no hidden states and no routers), or None when it can."""
    lacks = []
    if kind in READS_HIDDEN and set(trace.hidden) != set(range(trace.geometry.num_layers)):
        lacks.append("the hidden states of every MoE layer")
    if kind in NEEDS_ROUTERS and trace.routers is None:
        lacks.append("the model's routers")
    return f"{kind} needs {' and '.join(lacks)}, which the trace does not hold" if lacks else None


def baseline_predictors(train: RoutingTrace, lookahead: int, seed: int = 0,
                        progress: bool = True) -> dict[str, Predictor]:
    """The baselines every evaluation shows: pre-gate (with wrap), history (counted on `train`), random.

    The pre-gate is left out of traces without routers or hidden states (`unavailable` says why).
    """
    from ..predictors import HistoryPredictor, make_predictor

    out: dict[str, Predictor] = {}
    if unavailable("pregate", train) is None:
        # evaluation scores the next token's first layers too, so the pre-gate guesses them as well
        out["pregate"] = make_predictor("pregate", lookahead=lookahead, wrap=True)
    out["history"] = HistoryPredictor.fit(train, lookahead=lookahead, progress=progress)
    out["random"] = make_predictor("random", seed=seed, lookahead=lookahead)
    return out


def bind_all(predictors: Mapping[str, Predictor], trace: RoutingTrace) -> None:
    """Bind every predictor to the trace's geometry and routers (geometry mismatches raise ValueError)."""
    routers: Sequence = trace.routers or [None] * trace.geometry.num_layers
    for predictor in predictors.values():
        predictor.bind(trace.geometry, routers)

"""Training the learned eviction policy (`specmoe.runtime.learned_policy`) on a user's routing.

Belady's MIN keys every cached expert by its next use. Replaying the training routing visit by visit, the
policy's own state (`LayerState`, the code the runtime runs) puts every expert of the visited layer in a table
cell, and the routing's future gives the label: n, the visits of that layer until the expert is routed there
again (1: the next; past HORIZON: one column). Counting the labels per cell gives the table (smoothed towards
the routing's overall distribution of n); the rule's horizon is chosen by replaying the held-out tail of the
training passes. The transition lift (what the other experts routed at a layer's latest visit say of its next,
`count_lift`) is kept, at the power of the best held-out hit rate, only where it gains on the same folds. Its cost
per MoE layer call is measured here, on this CPU, and written into the policy directory, where the simulator
reads it.

    specmoe train TRACES --policy learned --out DIR
"""

# Shape legend: L MoE layers, E experts, V visits of a layer, B table cells, H visits the table resolves

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..runtime.learned_policy import (
    CELLS, FEATURES, FREQ_BUCKETS, HORIZON, HORIZONS, LayerState, LearnedPolicy, LiftRule, OnlineRule,
    pass_routing, save_learned_policy,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvictionTrainConfig:
    """How the table is counted and its rule chosen.

    Args:
        smoothing: weight (in samples) of the cell's recency bucket's distribution of n added to every cell
            (see `smooth_table`).
        val_fraction: the last share of the training passes held out to choose the horizon (then counted too).
        max_passes: count at most this many passes (the first ones; None: all).
        choice_calls / cost_calls: MoE layer calls replayed per choice of horizon / to time the policy.
        min_choice_passes: a held-out tail shorter than this chooses on two halves instead (`choice_folds`).
        online: how the policy goes on counting labels on the routing it serves (`OnlineRule`; None: never).
        online_min_gain: the policy learns online only where that gains this much mean hit rate on the folds
            that choose the horizon (it costs a few us per layer call).
        lift_powers: the powers of the transition lift tried on those folds (empty: no lift).
        lift_smoothing: samples of the layer's routing rate added to each lift's counts (`count_lift`).
        lift_min_gain: the lift is kept only where its best power gains this much mean hit rate on the folds.
    """

    smoothing: float = 50.0
    val_fraction: float = 0.1
    max_passes: int | None = None
    choice_calls: int = 20_000
    cost_calls: int = 3000
    min_choice_passes: int = 100
    online: OnlineRule | None = field(default_factory=OnlineRule)
    online_min_gain: float = 0.001
    lift_powers: tuple = (0.5, 1.0)
    lift_smoothing: float = 20.0
    lift_min_gain: float = 0.001

    def __post_init__(self):
        if self.smoothing <= 0 or self.choice_calls < 1 or self.cost_calls < 1:
            raise ValueError("need smoothing > 0, choice_calls >= 1 and cost_calls >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_passes is not None and self.max_passes < 2:
            raise ValueError(f"max_passes must be >= 2 (or None), got {self.max_passes}")


def layer_visits(stream, num_experts: int) -> list[np.ndarray]:
    """Per MoE layer, the experts routed at each of its visits: bool [V, E] (one visit per pass that ran it)."""
    used = pass_routing(stream, num_experts)
    return [used[used[:, layer].any(-1), layer] for layer in range(used.shape[1])]


def next_use(used: np.ndarray, cap: int = HORIZON + 1) -> np.ndarray:
    """[V, E] visits from visit v until the expert is routed again (1: the next visit), capped at `cap` (also
    for experts never routed again)."""
    V, E = used.shape
    out = np.empty((V, E), dtype=np.int64)
    nxt = np.full(E, V + cap, dtype=np.int64)
    for v in range(V - 1, -1, -1):
        out[v] = nxt
        nxt[used[v]] = v
    return np.minimum(out - np.arange(V)[:, None], cap)


def count_table(stream, num_experts: int, top_k: int, split: int | None = None):
    """Counts [B, H + 1] of n per cell over all visits of `stream`, the cells from the policy's own state
    replayed in the runtime's order (pass by pass, layer by layer); n is labelled from the whole routing's
    future. With `split`, also the counts of the visits before pass `split` (a tuple: all, before)."""
    visits = layer_visits(stream, num_experts)
    L, cols = len(visits), HORIZON + 1
    labels = [next_use(v) - 1 for v in visits]  # [V, E] column of each visit's experts
    state = LayerState(L, num_experts, top_k)
    counts = np.zeros(CELLS * cols, dtype=np.int64)
    head = None
    V = max(v.shape[0] for v in visits)
    parts: list[np.ndarray] = []
    for t in range(V):
        if t == split:
            if parts:
                counts += np.bincount(np.concatenate(parts), minlength=counts.size)
            parts.clear()
            head = counts.copy()
        for layer in range(L):
            if t < visits[layer].shape[0]:
                cell = state.observe(layer, np.flatnonzero(visits[layer][t]))
                parts.append(cell * cols + labels[layer][t])
        if len(parts) >= 8192 or t == V - 1:
            if parts:
                counts += np.bincount(np.concatenate(parts), minlength=counts.size)
            parts.clear()
    if not counts.any():
        raise ValueError("the training routing has no layer visits to learn from")
    counts = counts.reshape(CELLS, cols)
    if split is None:
        return counts
    return counts, (counts if head is None else head.reshape(CELLS, cols))


def count_lift(stream, num_experts: int, smoothing: float = 20.0) -> np.ndarray:
    """[L, E, E] lift[l, e', e]: P(e routed at a visit of l | e' routed at l's visit before) / P(e routed at l),
    counted over consecutive visits of each layer of `stream`; each row gets `smoothing` samples of the layer's
    rate (so a rare e' lifts little); experts never routed in training get 1."""
    lifts = []
    for used in layer_visits(stream, num_experts):  # [V, E]
        u = used.astype(np.float64)
        rate = u.mean(0)  # [E]
        if u.shape[0] < 2:
            lifts.append(np.ones((num_experts, num_experts)))
            continue
        joint = u[:-1].T @ u[1:]  # [E, E] e' at a visit, e at the next
        seen = u[:-1].sum(0)[:, None]  # [E, 1]
        weight = seen + smoothing
        cond = np.where(weight > 0, (joint + smoothing * rate) / np.maximum(weight, 1e-12), rate)  # e' unseen: none
        lifts.append(np.where(rate > 0, cond / np.where(rate > 0, rate, 1.0), 1.0))
    return np.stack(lifts)


def smooth_table(counts: np.ndarray, smoothing: float) -> np.ndarray:
    """[B, H + 1] P(n = j) per cell: its counts plus `smoothing` samples of the distribution of its bucket of
    the fastest horizon (recency; itself that bucket's counts plus `smoothing` samples of the overall
    distribution), so cells that the training routing seldom filled fall back on recency alone."""
    rows = FREQ_BUCKETS[0]
    prior = counts.sum(0) / counts.sum()  # [H + 1]
    by_recency = counts.reshape(rows, CELLS // rows, -1).sum(1)  # [R, H + 1]
    recency = (by_recency + smoothing * prior) / (by_recency.sum(1, keepdims=True) + smoothing)
    back = np.repeat(recency, CELLS // rows, 0)  # [B, H + 1]
    return (counts + smoothing * back) / (counts.sum(1, keepdims=True) + smoothing)


def replay_demand(policy_factory, stream, num_experts: int, capacity: float, calls: int | None = None,
                  start_pass: int = 0) -> tuple[int, int, float]:
    """Drive a fresh policy as the scheduler does with demand fetching only (observe, then each routed expert:
    touch when resident, else assign: victim, forget, touch; the layer's routed slots pinned) over MoE layer
    calls of `stream` from `start_pass` (at most `calls`), at `capacity` (a fraction of L * E slots).

    Returns:
        (hits, misses, CPU seconds of this process per layer call)."""
    from ..runtime.cache import ExpertCache

    visits = layer_visits(stream, num_experts)
    L = len(visits)
    stop = min(v.shape[0] for v in visits)
    seq = [(layer, np.flatnonzero(visits[layer][t]).tolist()) for t in range(start_pass, stop) for layer in range(L)]
    seq = seq[:calls] if calls else seq
    cache = ExpertCache(max(1, int(round(capacity * L * num_experts))), L, num_experts, None, policy_factory())
    policy, slot_of, hits, misses = cache.policy, cache.slot_of, 0, 0
    observe = getattr(policy, "observe", None)
    start = time.process_time()  # CPU time of this process: a shared machine's other load is not counted
    for layer, routed in seq:
        pinned = set()
        if observe is not None:
            observe(layer, frozenset(), routed)
        for e in routed:
            key = (layer, e)
            slot = slot_of.get(key)
            if slot is None:
                misses += 1
                got = cache.assign(key, lambda s: s not in pinned)
                if got is None:
                    continue
                slot = got[0]
            else:
                hits += 1
                policy.touch(slot)
            pinned.add(slot)
    return hits, misses, (time.process_time() - start) / max(len(seq), 1)


def measure_cost(policy_factory, stream, num_experts: int, capacity: float = 0.25, calls: int = 3000,
                 repeats: int = 3) -> float:
    """Median seconds per MoE layer call of a policy's work (observe, touch, victim, forget) driven as the
    scheduler drives it (`replay_demand`) on the first `calls` layer calls of `stream`, no predictor."""
    return measure_costs({"policy": policy_factory}, stream, num_experts, capacity, calls, repeats)["policy"]


def measure_costs(factories: dict, stream, num_experts: int, capacity: float = 0.25, calls: int = 3000,
                  repeats: int = 5) -> dict:
    """`measure_cost` of several policies {name: factory}, their replays taking turns (a shared machine's load
    then falls on all of them alike): {name: median seconds per MoE layer call}."""
    times: dict = {name: [] for name in factories}
    for _ in range(repeats):
        for name, factory in factories.items():
            times[name].append(replay_demand(factory, stream, num_experts, capacity, calls)[2])
    return {name: float(np.median(t)) for name, t in times.items()}


def choose_horizon(folds, geometry: dict, capacities=(0.25, 0.5), online: OnlineRule | None = None,
                   horizons=HORIZONS, lifts=None, lift_rule: LiftRule | None = None) -> tuple[int, dict]:
    """The horizon (of HORIZONS) of the best mean demand hit rate over `capacities` on routing the table was not
    counted on, replayed by the policy as it would run (with its `online` rule), and every horizon's hit rates.

    Args:
        folds: (table, stream, start_pass, calls) each: a table and the passes of `stream` from `start_pass`
            (at most `calls` MoE layer calls) it was not counted on; hits and misses add up over the folds.
        lifts: per fold, the transition lift counted with its table (None: no lift), applied by `lift_rule`.
    """
    E, scores = geometry["num_experts"], {}
    for h in horizons:
        rates = []
        for cap in capacities:
            hits = misses = 0
            for i, (table, stream, start_pass, calls) in enumerate(folds):
                lift = None if lifts is None else lifts[i]
                got = replay_demand(lambda: LearnedPolicy(table, geometry, h, online=online, lift=lift,
                                                          lift_rule=lift_rule), stream, E, cap, calls, start_pass)
                hits, misses = hits + got[0], misses + got[1]
            rates.append(hits / max(hits + misses, 1))
        scores[str(h)] = rates
        logger.info("horizon %d: held-out demand hit rates %s at %s", h, rates, capacities)
    best = max(horizons, key=lambda h: sum(scores[str(h)]))
    return best, {"capacities": list(capacities), "hit_rates": scores}


def choice_folds(stream, num_experts: int, top_k: int, config: EvictionTrainConfig) -> tuple[list, np.ndarray, str,
                                                                                              list]:
    """The folds `choose_horizon` replays and the counts over the whole of `stream`: a table counted before the
    held-out tail (the last `val_fraction` of the passes) and that tail, or, when the tail would be shorter than
    `min_choice_passes`, two halves each scored with the table of the other. Returns (folds, counts, how, the
    routing each fold's table was counted on)."""
    P, L = stream.num_passes, stream.num_layers
    tail = int(P * (1 - config.val_fraction))
    if P - tail >= config.min_choice_passes and tail > 0:
        counts, head = count_table(stream, num_experts, top_k, split=tail)
        folds = [(smooth_table(head, config.smoothing), stream, tail, config.choice_calls)]
        return folds, counts, f"the held-out tail from pass {tail} of {P}", [stream.select_passes(0, tail)]
    counts = count_table(stream, num_experts, top_k)
    half = P // 2
    if half < 1:
        return ([(smooth_table(counts, config.smoothing), stream, 0, config.choice_calls)], counts, "all its passes",
                [stream])
    first, second = stream.select_passes(0, half), stream.select_passes(half, P)
    folds = [(smooth_table(count_table(first, num_experts, top_k), config.smoothing), stream, half,
              config.choice_calls),
             (smooth_table(count_table(second, num_experts, top_k), config.smoothing), stream, 0,
              min(config.choice_calls, half * L))]
    return (folds, counts, f"two folds: passes 0:{half} and {half}:{P}, each scored with the other's table",
            [first, second])


def train_learned_policy(stream, geometry: dict, out, config: EvictionTrainConfig = EvictionTrainConfig(),
                         describe: dict | None = None) -> tuple[LearnedPolicy, dict]:
    """Count a learned eviction table on `stream` (a routing of the training sequences only), choose its
    horizon on the held-out tail, measure its cost per layer call, and save it to `out`.

    Args:
        geometry: {"num_layers", "num_experts", "top_k"} of the model that routed `stream`.
        describe: what the training routing was (recorded in config.json).

    Returns:
        (the loaded policy, the training record written into config.json).
    """
    from ..runtime.learned_policy import load_learned_policy
    from ..runtime.policies import HitDensityPolicy

    E, k = geometry["num_experts"], geometry["top_k"]
    start = time.perf_counter()
    if config.max_passes is not None and config.max_passes < stream.num_passes:
        stream = stream.select_passes(0, config.max_passes)
    passes = stream.num_passes
    folds, counts, how_chosen, sources = choice_folds(stream, E, k, config)
    table = smooth_table(counts, config.smoothing)  # the policy's: counted on every training pass
    geo = {name: geometry[name] for name in ("num_layers", "num_experts", "top_k")}
    horizon, chosen = choose_horizon(folds, geo, online=config.online)
    chosen["on"] = how_chosen
    online = config.online
    if online is not None:  # online costs a few us per layer call: kept only where it gains on the same folds
        offline = choose_horizon(folds, geo, horizons=(horizon,))[1]["hit_rates"][str(horizon)]
        gain = (sum(chosen["hit_rates"][str(horizon)]) - sum(offline)) / len(offline)
        chosen["offline_hit_rates"], chosen["online_gain"] = offline, gain
        if gain < config.online_min_gain:
            online = None
    lift, lift_rule = None, None
    if config.lift_powers:  # the transition lift: its power chosen on the folds, kept only where it gains there
        base = sum(chosen["offline_hit_rates"] if online is None and config.online is not None
                   else chosen["hit_rates"][str(horizon)])  # the folds' hit rates without the lift
        fold_lifts = [count_lift(src, E, config.lift_smoothing) for src in sources]
        tried = {}
        for power in config.lift_powers:
            rates = choose_horizon(folds, geo, online=online, horizons=(horizon,), lifts=fold_lifts,
                                   lift_rule=LiftRule(power))[1]["hit_rates"][str(horizon)]
            tried[str(power)] = rates
        best = max(config.lift_powers, key=lambda p: sum(tried[str(p)]))
        gain = (sum(tried[str(best)]) - base) / len(tried[str(best)])
        chosen["lift_hit_rates"], chosen["lift_gain"] = tried, gain
        if gain >= config.lift_min_gain:
            lift, lift_rule = count_lift(stream, E, config.lift_smoothing), LiftRule(best)
    costs = measure_costs({"learned": lambda: LearnedPolicy(table, geo, horizon, online=online, lift=lift,
                                                            lift_rule=lift_rule),
                           "hit-density": HitDensityPolicy}, stream, E, calls=config.cost_calls)
    cost, cost_hd = costs["learned"], costs["hit-density"]
    filled = counts.sum(1)
    training = {"config": asdict(config), "passes": passes, "tokens": stream.num_tokens,
                "samples": int(counts.sum()),
                "cells": CELLS, "cells_with_samples": int((filled > 0).sum()), "features": list(FEATURES),
                "horizon_choice": chosen, "seconds": time.perf_counter() - start, **(describe or {})}
    how = (f"median over 5 replays of {config.cost_calls} MoE layer calls of the training routing at capacity 0.25, "
           "no predictor: process CPU time of observe + touch + victim + forget through ExpertCache on this CPU "
           "(specmoe.training.eviction.measure_costs), the default hit-density's replays taking turns with them; "
           "the simulator charges charged_s per MoE layer call: what the learned policy costs beyond the default, "
           "whose bookkeeping is part of the compute model's wrapper_s")
    info = {"rule": {"name": "density", "horizon": horizon, "online": online and asdict(online),
                     "lift": lift_rule and asdict(lift_rule)},
            "training": training,
            "cost": {"per_call_s": cost, "hit_density_per_call_s": cost_hd, "charged_s": max(0.0, cost - cost_hd),
                     "how": how}}
    save_learned_policy(out, table, geo, info, lift)
    return load_learned_policy(out), {**training, "rule": info["rule"], "cost": info["cost"]}


def run_train_policy(args) -> int:
    """`specmoe train TRACES --policy learned --out DIR` (see training/cli.py for the arguments)."""
    from ..traces.routing import Routing
    from ..traces.dataset import load_traces

    trace = load_traces(args.traces, hidden=False, max_tokens=args.max_tokens)
    if args.sequences:
        try:
            a, b = (int(v) for v in args.sequences.split(":"))
        except ValueError:
            raise SystemExit(f"--sequences takes START:STOP (sequence indices), got {args.sequences!r}") from None
        if not 0 <= a < b <= trace.num_sequences:
            raise SystemExit(f"--sequences {args.sequences}: the trace has {trace.num_sequences} sequences")
        train, which = trace.select(list(range(a, b))), f"sequences {a}:{b} of {trace.num_sequences}"
    else:
        train = trace.split(tuple(args.fractions), seed=args.split_seed)["train"]
        which = (f"the train part of the seeded split by sequence (seed {args.split_seed}, fractions "
                 f"{list(args.fractions)}): {train.num_sequences} of {trace.num_sequences} sequences")
    geo = trace.geometry
    geometry = {"num_layers": geo.num_layers, "num_experts": geo.num_experts, "top_k": geo.top_k}
    policy, record = train_learned_policy(Routing.from_trace(train), geometry, args.out, EvictionTrainConfig(),
                                          {"traces": str(args.traces), "sequences": which})
    rates = record["horizon_choice"]["hit_rates"][str(policy.horizon)]
    print(f"learned eviction policy (hit density within {policy.horizon} visits): held-out demand hit rate "
          f"{rates[0]:.3f} at 0.25, {rates[1]:.3f} at 0.5 of the experts; {record['cost']['per_call_s'] * 1e6:.1f} "
          f"us per MoE layer call here; trained on {which}; saved to {args.out}")
    return 0

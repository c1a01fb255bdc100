"""Training the learned eviction policy (`specmoe.runtime.learned_policy`) on a user's routing.

Belady's MIN keys every cached expert by its next use. Replaying the training routing visit by visit, the
policy's own feature state (`LayerFeatures`, the code the runtime runs) gives the features of every expert of
the visited layer, and the routing's future gives the label: n, the visits of that layer until the expert is
routed there again (capped at MAX_VISITS; never again: the cap). A tiny MLP regresses log n (a relaxed
Belady); the policy evicts the largest predicted next use. Its cost per MoE layer call is measured here, on
this CPU, and written into the policy directory, where the simulator reads it.

    specmoe train TRACES --policy learned --out DIR
"""

# Shape legend: N samples, F features, D hidden width, L MoE layers, E experts, V visits of a layer

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..runtime.learned_policy import (
    FEATURES, HEADS, MAX_VISITS, RULES, LayerFeatures, LearnedPolicy, MLPScorer, save_learned_policy,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvictionTrainConfig:
    """How the scorer is fitted.

    Args:
        hidden: width D of the MLP's one hidden layer.
        max_samples: (layer, expert) rows sampled from the replay at most (visits are sampled uniformly).
        epochs / batch_size / lr: Adam on the mean squared error of log n.
        val_fraction: the last share of the training passes held out to pick the best epoch.
        seed: seeds the sampling and the weights.
        choice_calls / cost_calls: MoE layer calls replayed per choice of rule / to time the policy.
        max_recency: fit only rows of experts routed at most this many visits ago (the likely residents, whose
            ranking eviction needs); None: every expert of a sampled visit.
    """

    hidden: int = 16
    max_samples: int = 400_000
    epochs: int = 8
    batch_size: int = 2048
    lr: float = 3e-3
    val_fraction: float = 0.1
    seed: int = 0
    max_recency: int | None = None
    choice_calls: int = 20_000
    cost_calls: int = 3000

    def __post_init__(self):
        if self.hidden < 1 or self.max_samples < 16 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("need hidden >= 1, max_samples >= 16, epochs >= 1, batch_size >= 1, lr > 0")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def layer_visits(stream, num_experts: int) -> list[np.ndarray]:
    """Per MoE layer, the experts routed at each of its visits: bool [V, E] (one visit per pass that ran it)."""
    ids = stream.ids.numpy()  # [N, L, k]
    L = ids.shape[1]
    off = stream.pass_offsets.numpy()
    used = np.zeros((len(off) - 1, L, num_experts), dtype=bool)  # [P, L, E]
    pass_of = np.repeat(np.arange(len(off) - 1), np.diff(off))  # [N]
    t, layer, e = np.nonzero(ids >= 0)
    used[pass_of[t], layer, ids[t, layer, e]] = True
    return [used[used[:, layer].any(-1), layer] for layer in range(L)]


def next_use(used: np.ndarray) -> np.ndarray:
    """[V, E] visits from visit v until the expert is routed again (1: the next visit), capped at MAX_VISITS."""
    V, E = used.shape
    out = np.empty((V, E), dtype=np.int64)
    nxt = np.full(E, V + MAX_VISITS, dtype=np.int64)
    for v in range(V - 1, -1, -1):
        out[v] = nxt
        nxt[used[v]] = v
    return np.minimum(out - np.arange(V)[:, None], MAX_VISITS)


def replay_samples(stream, num_experts: int, top_k: int, max_samples: int, seed: int = 0):
    """Features [N, F] and labels n [N] of the replay's sampled visits (the policy's own feature code).

    Returns:
        (x, n, visit, layer, expert): visit [N] the visit index (to hold out the last ones), layer [N] and
        expert [N] the row's (layer, expert)."""
    visits = layer_visits(stream, num_experts)
    L = len(visits)
    total = sum(v.shape[0] for v in visits) * num_experts
    rate = min(1.0, max_samples / max(total, 1))
    rng = np.random.default_rng(seed)
    state = LayerFeatures(L, num_experts, top_k)
    labels = [next_use(v) for v in visits]
    xs, ys, when, where = [], [], [], []
    V = max(v.shape[0] for v in visits)
    for t in range(V):  # visits in the replay's order: pass by pass, layer by layer
        for layer in range(L):
            if t >= visits[layer].shape[0]:
                continue
            feats = state.observe(layer, np.flatnonzero(visits[layer][t]))
            if rng.random() < rate:
                xs.append(feats)
                ys.append(labels[layer][t])
                when.append(np.full(num_experts, t))
                where.append(np.full(num_experts, layer))
    if not xs:
        raise ValueError("the training routing has no layer visits to learn from")
    where = np.concatenate(where)
    return (np.concatenate(xs), np.concatenate(ys), np.concatenate(when), where,
            np.tile(np.arange(num_experts), where.size // num_experts))


def fit_scorer(x: np.ndarray, n: np.ndarray, visit: np.ndarray, config: EvictionTrainConfig) -> tuple[MLPScorer, dict]:
    """Fit the MLP on features x [N, F] and labels n [N] (squared error of log n + cross-entropy of n <= j for
    j = 1..HEADS), the last `val_fraction` of visits held out; returns the best epoch's scorer."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (and does not crowd a shared host)
    try:
        return _fit(torch, x, n, visit, config)
    finally:
        torch.set_num_threads(threads)


def _fit(torch, x, n, visit, config):
    torch.manual_seed(config.seed)
    cut = np.quantile(visit, 1 - config.val_fraction) if config.val_fraction else visit.max() + 1
    train, val = visit < cut, visit >= cut
    if not train.any() or not val.any():
        train = val = np.ones_like(train)
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    X = torch.tensor((x - mean) / std, dtype=torch.float32)
    N = torch.tensor(n, dtype=torch.float32)
    Y = torch.cat([N.log()[:, None], (N[:, None] <= torch.arange(1, HEADS + 1)).float()], 1)  # [N, 1 + H]
    F, D = x.shape[1], config.hidden
    net = torch.nn.Sequential(torch.nn.Linear(F, D), torch.nn.Tanh(), torch.nn.Linear(D, 1 + HEADS))
    with torch.no_grad():
        net[2].bias[0] = float(Y[train, 0].mean())
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def loss_of(out, y):
        return ((out[:, 0] - y[:, 0]) ** 2).mean() + bce(out[:, 1:], y[:, 1:]) * HEADS
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    tr, va = torch.tensor(np.flatnonzero(train)), torch.tensor(np.flatnonzero(val))
    g = torch.Generator().manual_seed(config.seed)

    def val_loss() -> float:
        with torch.no_grad():
            return float(loss_of(net(X[va]), Y[va]))

    prior = Y[tr].mean(0)
    base = float(((Y[va, 0] - prior[0]) ** 2).mean() + bce(torch.logit(prior[1:].clamp(1e-4, 1 - 1e-4)).expand(
        va.numel(), HEADS), Y[va, 1:]) * HEADS)
    best, best_state, history = val_loss(), None, []
    for epoch in range(config.epochs):
        perm = tr[torch.randperm(tr.numel(), generator=g)]
        for i in range(0, perm.numel(), config.batch_size):
            b = perm[i:i + config.batch_size]
            loss = loss_of(net(X[b]), Y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        v = val_loss()
        history.append(v)
        logger.info("epoch %d: val loss %.4f (constant prediction %.4f)", epoch + 1, v, base)
        if best_state is None or v < best:
            best, best_state = v, {k: t.clone() for k, t in net.state_dict().items()}
    net.load_state_dict(best_state)
    weights = {"mean": mean, "std": std, "w1": net[0].weight.detach().numpy().T.astype(np.float64),
               "b1": net[0].bias.detach().numpy().astype(np.float64),
               "w2": net[2].weight.detach().numpy().T.astype(np.float64),
               "b2": net[2].bias.detach().numpy().astype(np.float64)}
    record = {"train_samples": int(train.sum()), "val_samples": int(val.sum()), "val_loss": best,
              "constant_val_loss": base, "val_loss_by_epoch": history}
    return MLPScorer(weights), record


def fit_affinity(stream, num_experts: int, top_k: int, scorer: MLPScorer, x, n, visit, layer,
                 expert) -> tuple[np.ndarray, np.ndarray]:
    """The next-layer affinity of the routing, and how to mix it into the scorer's P(n = 1).

    affinity [L, E, E]: log P(j at layer c + 1 | i at c, same token) / P(j at c + 1), counted over the routing
    (add-one smoothed; the last layer's row is 0). mix [3]: a, b, c of P(n = 1) = sigmoid(a logit q1 + b s + c),
    s the mean affinity row of the experts routed at the layer before, fitted by logistic regression on the
    sampled rows of layers >= 1 (q1: the scorer's own estimate at the layer's previous visit)."""
    import torch

    visits = layer_visits(stream, num_experts)
    L, E = len(visits), num_experts
    V = min(v.shape[0] for v in visits)
    table = np.zeros((L, E, E))
    for c in range(L - 1):
        a, b = visits[c][:V].astype(np.float64), visits[c + 1][:V].astype(np.float64)
        co, p_i, p_j = a.T @ b, a.sum(0), (b.sum(0) + 1) / (V + E)  # [E, E], [E], [E]
        table[c] = np.log(((co + p_j) / (p_i[:, None] + 1)) / p_j)
    rows = np.flatnonzero((layer >= 1) & (visit + 1 < V))
    if rows.size < 16:
        return table, np.array([1.0, 0.0, 0.0])
    rows = np.sort(np.random.default_rng(0).permutation(rows)[:50_000])
    q1 = np.clip(1 / (1 + np.exp(-scorer(x[rows])[:, 1])), 1e-4, 1 - 1e-4)
    lr, vr = layer[rows], visit[rows]
    e = expert[rows]
    s = np.einsum("ne,ne->n", visits_of(visits, lr - 1, vr + 1), table[lr - 1, :, e]) / top_k
    target = torch.tensor(n[rows] == 1, dtype=torch.float64)
    feats = torch.tensor(np.stack([np.log(q1 / (1 - q1)), s], 1))
    w = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(feats @ w[:2] + w[2], target)
        loss.backward()
        return loss

    opt.step(closure)
    return table, w.detach().numpy()


def visits_of(visits: list[np.ndarray], layers: np.ndarray, at: np.ndarray) -> np.ndarray:
    """[N, E] float: the routed experts of layer layers[i] at visit at[i]."""
    return np.stack([visits[l][v] for l, v in zip(layers.tolist(), at.tolist())]).astype(np.float64)


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
    return float(np.median([replay_demand(policy_factory, stream, num_experts, capacity, calls)[2]
                            for _ in range(repeats)]))


CHOICES = (("farthest", 1, False), *(("density", h, a) for h in (1, 2, 4) for a in (False, True)))


def choice_name(rule: str, horizon: int, affinity: bool) -> str:
    return f"{rule}/{horizon}" + ("+affinity" if affinity else "")


def choose_rule(scorer: MLPScorer, geometry: dict, stream, start_pass: int, affinity, capacities=(0.25, 0.5),
                calls: int = 20_000) -> tuple[tuple[str, int, bool], dict]:
    """The (rule, horizon, with affinity) of the best mean demand hit rate over `capacities`, replayed from
    `start_pass` (the training routing's held-out tail), and every choice's hit rates."""
    E, scores = geometry["num_experts"], {}
    for rule, h, aff in CHOICES:
        rates = []
        for cap in capacities:
            hits, misses, _ = replay_demand(
                lambda: LearnedPolicy(scorer, geometry, rule, h, affinity if aff else None), stream, E, cap, calls,
                start_pass)
            rates.append(hits / max(hits + misses, 1))
        scores[choice_name(rule, h, aff)] = rates
        logger.info("%s: held-out demand hit rates %s at %s", choice_name(rule, h, aff), rates, capacities)
    best = max(CHOICES, key=lambda c: sum(scores[choice_name(*c)]))
    return best, {"capacities": list(capacities), "hit_rates": scores}


def train_learned_policy(stream, geometry: dict, out, config: EvictionTrainConfig = EvictionTrainConfig(),
                         describe: dict | None = None) -> tuple[LearnedPolicy, dict]:
    """Fit a learned eviction policy on `stream` (a routing of the training sequences only), choose its rule on
    the held-out tail, measure its cost per layer call, and save it to `out`.

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
    x, n, visit, layer, expert = replay_samples(stream, E, k, config.max_samples, config.seed)
    if config.max_recency is not None:  # feature 0 is log1p(recency)
        keep = x[:, 0] <= np.log1p(config.max_recency) + 1e-9
        x, n, visit, layer, expert = x[keep], n[keep], visit[keep], layer[keep], expert[keep]
    scorer, record = fit_scorer(x, n, visit, config)
    geo = {name: geometry[name] for name in ("num_layers", "num_experts", "top_k")}
    tail = int(np.quantile(visit, 1 - config.val_fraction)) if config.val_fraction else 0
    table, mix = fit_affinity(stream, E, k, scorer, x, n, visit, layer, expert)
    (rule, horizon, aff), chosen = choose_rule(scorer, geo, stream, tail, (table, mix), calls=config.choice_calls)
    affinity = (table, mix) if aff else None
    cost = measure_cost(lambda: LearnedPolicy(scorer, geo, rule, horizon, affinity), stream, E, calls=config.cost_calls)
    cost_hd = measure_cost(HitDensityPolicy, stream, E, calls=config.cost_calls)
    training = {"config": asdict(config), "passes": stream.num_passes, "tokens": stream.num_tokens,
                "samples": int(x.shape[0]), "features": list(FEATURES), "held_out_from_pass": tail,
                "rule_choice": chosen, "seconds": time.perf_counter() - start, **record, **(describe or {})}
    how = (f"median over 3 replays of {config.cost_calls} MoE layer calls of the training routing at capacity 0.25, "
           "no predictor: process CPU time of observe + touch + victim + forget through ExpertCache on this CPU "
           "(specmoe.training.eviction.measure_cost), the default hit-density timed in the same way right after; "
           "the simulator charges charged_s per MoE layer call: what the learned policy costs beyond the default, "
           "whose bookkeeping is part of the compute model's wrapper_s")
    info = {"rule": {"name": rule, "horizon": horizon, "affinity": aff, "mix": mix.tolist()}, "training": training,
            "cost": {"per_call_s": cost, "hit_density_per_call_s": cost_hd, "charged_s": max(0.0, cost - cost_hd),
                     "how": how}}
    save_learned_policy(out, {**scorer.w, **({"affinity": table, "mix": mix} if aff else {})}, geo, info)
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
    config = EvictionTrainConfig(seed=args.seed)
    policy, record = train_learned_policy(Routing.from_trace(train), geometry, args.out, config,
                                          {"traces": str(args.traces), "sequences": which})
    rates = record["rule_choice"]["hit_rates"][choice_name(policy.rule, policy.horizon, policy.affinity is not None)]
    print(f"learned eviction policy ({policy.rule}, horizon {policy.horizon}): held-out demand hit rate "
          f"{rates[0]:.3f} at 0.25, {rates[1]:.3f} at 0.5 of the experts; {record['cost']['per_call_s'] * 1e6:.1f} "
          f"us per MoE layer call here; trained on {which}; saved to {args.out}")
    return 0

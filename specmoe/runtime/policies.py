"""Eviction policies of the expert cache: which slot to give up when an expert must come in.

A policy is a small object that the cache and the scheduler drive through these calls:

* `touch(slot)`: the slot was used, or just got a new expert; `forget(slot)`: its expert was evicted;
* `victim(allowed)`: the slot to evict among those `allowed(slot)` accepts (None: none may go);
* optional `bind(cache, num_layers)`: the `ExpertCache` it serves (`key_of[slot]` -> (layer, expert), `slot_of`);
* optional `observe(layer, predicted, routed)`: once per MoE layer call, before its experts are acquired:
  the layer, the keys the predictor now wants, the expert ids routed there;
* optional `observe_time(t)`: a monotonic layer-step counter.

Decoding visits the MoE layers in a cycle, once per token each, and all layers share one slot pool. LRU over
that pool evicts the expert used longest ago, which is the one whose layer comes round next: with fewer slots
than a token's working set it gets no hits at all. `HitDensityPolicy` (the default) knows the cycle.
"""

# Shape legend: L MoE layers, E experts, S slots, R recency buckets, F frequency buckets

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

Key = tuple[int, int]  # (layer, expert)


class LRUPolicy:
    """Least recently used: the victim is the slot touched longest ago among those allowed."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def touch(self, slot: int) -> None:
        order = self._order
        if slot in order:
            order.move_to_end(slot)
        else:
            order[slot] = None

    def forget(self, slot: int) -> None:
        self._order.pop(slot, None)

    def victim(self, allowed: Callable[[int], bool]) -> int | None:
        for s in self._order:  # oldest first (a plain loop: the simulator's hottest call)
            if allowed(s):
                return s
        return None


class LFUPolicy:
    """Least frequently used with aging: every use adds 1 to its expert's count and all counts halve every
    `halflife` uses, so experts that were popular long ago give way. Counts belong to (layer, expert) once
    bound to a cache (they survive eviction), else to slots (they restart with a new expert).

    Args:
        halflife: uses after which a count has halved (default: 4 per slot of the bound cache, else 1024).
    """

    name = "lfu"

    def __init__(self, halflife: int | None = None) -> None:
        if halflife is not None and halflife < 1:
            raise ValueError(f"halflife must be >= 1 use, got {halflife}")
        self.halflife = halflife
        self.cache = None
        self._count: dict = {}  # key (or slot) -> count scaled by _weight at its last use
        self._weight = 1.0  # grows by 2 ** (1 / halflife) per use: adding it ages every older count
        self._slot_count = np.full(0, np.inf)  # [S] count of each slot's expert, inf: empty

    def bind(self, cache, num_layers: int) -> None:
        self.cache = cache
        if self.halflife is None:
            self.halflife = 4 * cache.num_slots

    def touch(self, slot: int) -> None:
        entry = self.cache.key_of[slot] if self.cache is not None else slot
        self._weight *= 2.0 ** (1.0 / (self.halflife or 1024))
        self._count[entry] = self._count.get(entry, 0.0) + self._weight
        if slot >= self._slot_count.size:
            self._slot_count = np.concatenate([self._slot_count, np.full(slot + 1 - self._slot_count.size, np.inf)])
        self._slot_count[slot] = self._count[entry]
        if self._weight > 1e100:  # rescale before floats overflow; the order is unchanged
            self._count = {k: v / self._weight for k, v in self._count.items()}
            self._slot_count /= self._weight
            self._weight = 1.0

    def forget(self, slot: int) -> None:
        if slot < self._slot_count.size:
            self._slot_count[slot] = np.inf
        if self.cache is None:
            self._count.pop(slot, None)

    def victim(self, allowed: Callable[[int], bool]) -> int | None:
        return _lowest_allowed(self._slot_count.copy(), allowed)


def _lowest_allowed(score: np.ndarray, allowed: Callable[[int], bool]) -> int | None:
    """The slot of the lowest finite score that `allowed` accepts (scores of refused slots become inf)."""
    argmin, inf = score.argmin, np.inf
    while score.size:
        slot = int(argmin())
        if score[slot] == inf:
            return None
        if allowed(slot):
            return slot
        score[slot] = inf
    return None


class ScoredPolicy(LRUPolicy):
    """LRU until bound and observing layers; then the victim is the allowed slot of the lowest score of the
    current layer call (`_scores`, computed once per call: subclasses set `self._score = None` when it goes
    stale), the oldest allowed slot when every allowed slot is kept (score inf). `_keep_predicted` gives the
    slots of experts the predictor wants an infinite score. The recency order is a stamp per slot (a dict store
    per touch, where LRU's ordered dict moves an entry), sorted only when the oldest is asked for."""

    layer: int | None = None
    _score: np.ndarray | None = None

    def __init__(self) -> None:
        self._stamp: dict[int, int] = {}  # slot -> when it was last touched (forgotten slots: absent)
        self._touches = 0

    def _scores(self) -> np.ndarray:  # [S] lowest evicted first, inf for kept slots
        raise NotImplementedError

    def _bind_slots(self, cache, L: int, E: int) -> None:
        """What both scores read about the slots, for `cache` with L layers of E experts: `slot_layer` [S] each
        slot's layer (-1: empty, the last column of `_steps`), `slot_flat` [S] its expert as layer * E + expert
        (L * E: empty), `_slot_key` the keys they hold (plain: cheap to compare), and `_steps` [L, L + 1], the
        layer steps from layer c to layer l's next visit (column L, an empty slot's, is 1)."""
        S = cache.num_slots
        self.cache, self.L, self.E, self._key_of = cache, L, E, cache.key_of
        self.slot_layer = np.full(S, -1, dtype=np.int64)
        self.slot_flat = np.full(S, L * E, dtype=np.int64)
        self._slot_key: list[Key | None] = [None] * S
        self._steps = np.ones((L, L + 1))
        self._steps[:, :L] = (np.arange(L)[None, :] - np.arange(L)[:, None] - 1) % L + 1

    def touch(self, slot: int) -> None:
        """Stamps the slot (every hit and every fill calls it); bound, a new expert in the slot moves its entries,
        and the slot is kept for the rest of this call."""
        self._stamp[slot] = t = self._touches
        self._touches = t + 1
        if self.cache is not None:
            key = self._key_of[slot]
            if self._slot_key[slot] is not key:  # the cache's own key object while the slot holds it
                self._slot_key[slot] = key
                self.slot_layer[slot] = key[0]
                self.slot_flat[slot] = key[0] * self.E + key[1]
            if self._score is not None:
                self._score[slot] = np.inf  # holds an expert of the current layer now, kept this step

    def forget(self, slot: int) -> None:
        """The slot's expert was evicted. The cache fills the slot at once (its `touch` follows, which writes the
        new expert's entries): only the old key is dropped here."""
        self._stamp.pop(slot, None)
        if self.cache is not None:
            self._slot_key[slot] = None

    def _oldest(self, allowed: Callable[[int], bool]) -> int | None:
        """LRUPolicy.victim: the allowed slot touched longest ago."""
        stamp = self._stamp
        for s in sorted(stamp, key=stamp.__getitem__):
            if allowed(s):
                return s
        return None

    def _keep_predicted(self, score: np.ndarray) -> np.ndarray:
        slot_of = self.cache.slot_of
        for key in self.predicted:
            slot = slot_of.get(key)
            if slot is not None:
                score[slot] = np.inf
        return score

    def victim(self, allowed: Callable[[int], bool]) -> int | None:
        if self.layer is None:
            return self._oldest(allowed)
        score = self._score
        if score is None:
            score = self._score = self._scores()
        argmin, inf = score.argmin, np.inf  # _lowest_allowed, inlined: every miss asks
        while True:
            slot = int(argmin())
            if score[slot] == inf:
                break
            if allowed(slot):
                return slot
            score[slot] = inf
        return self._oldest(allowed)  # only kept slots may go


# recency buckets: visits of a layer since the expert was last routed there (0: routed at the latest visit)
_RECENCY_EDGES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_MAX_RECENCY = _RECENCY_EDGES[-1]
_RECENCY_BUCKET = np.searchsorted(np.array(_RECENCY_EDGES), np.arange(_MAX_RECENCY + 1), side="right") - 1


class HitDensityPolicy(ScoredPolicy):
    """Evict the expert with the fewest expected hits per slot-step until its layer comes round again.

    At layer c, a resident expert of layer l is next needed d = (l - c - 1) % L + 1 layer steps ahead, at
    the earliest. It is routed there with probability p, estimated from how often experts with the same
    recency (visits of l since it was last routed) and the same relative frequency (an exponential average
    per (layer, expert)) were routed at their next visit: counts learned online from the routing itself.
    Keeping it costs d slot-steps for p expected hits; the victim is the lowest p / d (least hit density, as
    LHD does for web caches). Experts the predictor wants are kept. Until it is bound to a cache and observes
    layers it is LRU.

    Args:
        freq_decay: decay of the per-(layer, expert) frequency average per visit of its layer.
        freq_buckets: buckets of relative frequency (0.5 wide, in units of the layer's average).
    """

    name = "hit-density"

    def __init__(self, freq_decay: float = 0.95, freq_buckets: int = 8) -> None:
        if not 0 < freq_decay < 1 or freq_buckets < 1:
            raise ValueError(f"need 0 < freq_decay < 1 and freq_buckets >= 1, got {freq_decay}, {freq_buckets}")
        super().__init__()
        self.freq_decay, self.F = freq_decay, freq_buckets
        self._recency_f = _RECENCY_BUCKET * freq_buckets  # [recency] -> its bucket's first index
        self.cache = None
        self.layer: int | None = None
        self.predicted: set[Key] = set()
        self._score: np.ndarray | None = None  # [S] cached for the current layer step

    def bind(self, cache, num_layers: int) -> None:
        if cache is self.cache:  # the cache binds its policy, and so may the scheduler: once is enough
            return
        L, E, S = num_layers, cache.num_experts, cache.num_slots
        self._bind_slots(cache, L, E)
        self.freq = np.full((L, E), 1.0 / E)  # [L, E] decayed share of visits that routed each expert
        self.freq_sum = self.freq.sum(-1)  # [L] row sums, kept with the rows
        self.last = np.full((L, E), -(_MAX_RECENCY + 1), dtype=np.int64)  # [L, E] visit it was last routed at
        self._visits = [0] * L  # [L] visits of each layer so far (`visits`: as an array)
        R = len(_RECENCY_EDGES)
        # [R * F + 1] hits and trials per bucket, with a prior that falls with recency; the last entry (hits inf,
        # trials 1) is the empty slots' bucket, so that hits / trials is inf there: never a victim
        self._hits_all = np.append(np.repeat(1.0 / (2.0 + np.arange(R)), self.F), np.inf)
        self._trials_all = np.ones(R * self.F + 1)
        self.hits, self.trials = self._hits_all[:-1], self._trials_all[:-1]  # [R * F] (views)
        # [L + 1, E] the bucket of each (layer, expert): it changes only when its layer is visited. Row L (index
        # -1, an empty slot's layer) names bucket R * F, whose hit density is inf: never a victim.
        self.bucket = np.full((L + 1, E), R * self.F, dtype=np.int64)
        recency = np.minimum(self.visits[:, None] - self.last, _MAX_RECENCY)
        self.bucket[:L] = self._bucket_of(recency, self.freq, self.freq_sum[:, None])
        self._bucket_flat = self.bucket.reshape(-1)  # [(L + 1) * E] (a view)
        # Made once for `_count_one` and `_scores`, which run at every layer call: per layer its rows of bucket,
        # freq and last (views), its row of the steps table, and the constants as 0-d arrays. (On arrays this
        # small a numpy call costs its dispatch, not its work: the two run on fresh arrays and in-place
        # operators, without `out=` keywords, which cost more than the arrays they save.)
        self._rows = [(self.bucket[i], self.freq[i], self.last[i]) for i in range(L)]
        self._steps_rows = list(self._steps)
        self._decay0, self._gain0 = np.array(self.freq_decay), np.array(1 - self.freq_decay)
        self._twoE0, self._top0 = np.array(2.0 * E), np.array(self.F - 1)
        # 2E a power of two: freq * 2E is exact, so freq / (total / 2E) is (freq * 2E) / total to the bit, one
        # operation fewer
        self._exact_scale = ((2 * E) & (2 * E - 1)) == 0
        # weights of ones for bincount: its float counts add to the float hits and trials without a cast (the
        # same integers: a sum of ones is exact)
        ones = [np.ones(n) for n in range(E + 1)]
        self._consts = (self.trials, self.hits, ones, self._visits, self._decay0, self._gain0, self._twoE0,
                        self._top0, self._recency_f, self._exact_scale)  # what `_count_one` reads, in one load
        self._pending: list[tuple[int, list[int]]] = []  # observed layer calls not yet counted (in order)
        self._pending_layers: set[int] = set()

    @property
    def visits(self) -> np.ndarray:
        """[L] visits of each layer counted so far."""
        return np.array(self._visits, dtype=np.int64)

    def _bucket_of(self, recency: np.ndarray, freq: np.ndarray, freq_sum) -> np.ndarray:
        """Buckets from recency and frequency (any matching shapes)."""
        rel2 = freq * (2 * self.E) / freq_sum  # twice the frequency relative to the layer's average
        return self._recency_f[recency] + np.minimum(rel2.astype(np.int64), self.F - 1)

    def observe(self, layer: int, predicted: set[Key], routed=()) -> None:
        """Record the call; the counts are updated in batches (at most one call per layer each, so a batch is
        the same as its calls one by one), when a layer comes round again or a victim is asked for."""
        if self.cache is None:
            return
        if layer in self._pending_layers:
            self._count()
        self.layer, self.predicted, self._score = layer, predicted, None
        self._pending.append((layer, routed))  # read-only (the scheduler's contract): no copy
        self._pending_layers.add(layer)

    def _count(self) -> None:
        """Count the pending calls: every expert of a visited layer is a trial of its bucket, a routed one a hit;
        then the layer's visits, last-routed visits, frequencies, and so its buckets, move on."""
        pending = self._pending
        if not pending:
            return
        if len(pending) == 1:  # one call (a victim is asked for at most layer calls): on the layer's rows
            self._count_one(*pending[0])
        else:
            self._count_many(pending)
        pending.clear()
        self._pending_layers.clear()

    def _count_one(self, layer: int, used) -> None:
        """One call, on the layer's rows in place (the same arithmetic as `_bucket_of`)."""
        trials, hits, ones, visits, decay, gain, two_e, top, recency_f, exact = self._consts
        bucket, freq, last = self._rows[layer]  # [E] (views: updated in place)
        size = trials.size
        trials += np.bincount(bucket, ones[-1], size)
        visit = visits[layer] = visits[layer] + 1
        freq *= decay
        if used:
            u = np.array(used)  # [k]
            hits += np.bincount(bucket[u], ones[len(used)], size)
            last[u] = visit
            freq[u] += gain
        total = self.freq_sum[layer] = np.add.reduce(freq)
        if exact:
            rel2 = freq / (total / two_e)  # twice the frequency relative to the layer's average
        else:
            rel2 = freq * two_e
            rel2 /= total
        capped = np.minimum(rel2.astype(np.int64), top)  # >= 0: truncated, then capped
        recency_f.take(visit - last, None, bucket, "clip")  # recency capped at _MAX_RECENCY, its last index
        bucket += capped

    def _count_many(self, pending) -> None:
        """Calls on distinct layers, counted at once."""
        decay, size = self.freq_decay, self.trials.size
        layers = np.fromiter((c[0] for c in pending), dtype=np.int64, count=len(pending))  # [n] distinct
        rows = np.concatenate([np.full(len(u), i, dtype=np.int64) for i, (_, u) in enumerate(pending)])  # [m]
        used = np.fromiter((e for _, u in pending for e in u), dtype=np.int64, count=rows.size)  # [m]
        bucket = self.bucket[layers]  # [n, E]
        self.trials += np.bincount(bucket.ravel(), minlength=size)
        if rows.size:
            self.hits += np.bincount(bucket[rows, used], minlength=size)
        counted = self._visits
        for layer, _ in pending:
            counted[layer] += 1
        visits = np.fromiter((counted[c[0]] for c in pending), dtype=np.int64, count=len(pending))  # [n]
        self.last[layers[rows], used] = visits[rows]
        freq = self.freq[layers]  # [n, E]
        freq *= decay
        freq[rows, used] += 1 - decay  # (row, expert) pairs are distinct: a call routes an expert once
        self.freq[layers] = freq
        total = self.freq_sum[layers] = freq.sum(-1)
        recency = np.minimum(visits[:, None] - self.last[layers], _MAX_RECENCY)
        self.bucket[layers] = self._bucket_of(recency, freq, total[:, None])

    def _scores(self) -> np.ndarray:
        """[S] hit density of each slot's expert, inf for kept slots."""
        if self._pending:
            self._count()
        score = (self._hits_all / self._trials_all)[self._bucket_flat[self.slot_flat]]  # empty slots: inf
        score /= self._steps_rows[self.layer][self.slot_layer]
        return self._keep_predicted(score) if self.predicted else score


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy, "hit-density": HitDensityPolicy}
DEFAULT_POLICY = "hit-density"  # SpeculativeMoE's and the simulator's default


def make_policy(policy) -> object:
    """A fresh policy by name ("default" is DEFAULT_POLICY) or learned-policy directory, or a policy object
    checked for the interface.

    Raises:
        ValueError: an unknown name. TypeError: an object without touch/forget/victim.
    """
    if isinstance(policy, (str, os.PathLike)) and str(policy) not in (*POLICIES, "default") and os.path.isdir(policy):
        from .learned_policy import load_learned_policy  # a directory from `specmoe train --policy learned`

        return load_learned_policy(policy)
    if isinstance(policy, str):
        name = DEFAULT_POLICY if policy == "default" else policy
        if name not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose one of {sorted(POLICIES)} or 'default'")
        return POLICIES[name]()
    if not all(callable(getattr(policy, m, None)) for m in ("touch", "forget", "victim")):
        raise TypeError("an eviction policy needs touch(slot), forget(slot) and victim(allowed) methods")
    return policy

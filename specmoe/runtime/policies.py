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
    while score.size:
        slot = int(np.argmin(score))
        if score[slot] == np.inf:
            return None
        if allowed(slot):
            return slot
        score[slot] = np.inf
    return None


# recency buckets: visits of a layer since the expert was last routed there (0: routed at the latest visit)
_RECENCY_EDGES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_MAX_RECENCY = _RECENCY_EDGES[-1]
_RECENCY_BUCKET = np.searchsorted(np.array(_RECENCY_EDGES), np.arange(_MAX_RECENCY + 1), side="right") - 1


class HitDensityPolicy(LRUPolicy):
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
        self.cache = None
        self.layer: int | None = None
        self.predicted: set[Key] = set()
        self._score: np.ndarray | None = None  # [S] cached for the current layer step

    def bind(self, cache, num_layers: int) -> None:
        if cache is self.cache:  # the cache binds its policy, and so may the scheduler: once is enough
            return
        L, E, S = num_layers, cache.num_experts, cache.num_slots
        self.cache, self.L, self.E = cache, L, E
        self.freq = np.full((L, E), 1.0 / E)  # [L, E] decayed share of visits that routed each expert
        self.last = np.full((L, E), -(_MAX_RECENCY + 1), dtype=np.int64)  # [L, E] visit it was last routed at
        self.visits = np.zeros(L, dtype=np.int64)  # [L]
        R = len(_RECENCY_EDGES)
        self.trials = np.ones(R * self.F)  # [R * F] with a prior that falls with recency
        self.hits = np.repeat(1.0 / (2.0 + np.arange(R)), self.F)
        self.slot_layer = np.full(S, -1, dtype=np.int64)  # [S], -1: empty
        self.slot_expert = np.zeros(S, dtype=np.int64)  # [S]

    def _bucket(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        recency = np.minimum(self.visits[layers] - self.last[layers, experts], _MAX_RECENCY)
        rel = self.freq[layers, experts] * self.E / self.freq[layers].sum(-1)
        return _RECENCY_BUCKET[recency] * self.F + np.minimum((rel * 2).astype(np.int64), self.F - 1)

    def observe(self, layer: int, predicted: set[Key], routed=()) -> None:
        if self.cache is None:
            return
        self.layer, self.predicted, self._score = layer, predicted, None
        used = list(routed)
        # _bucket for every expert of one layer, on the layer's rows (this runs once per MoE layer call)
        freq = self.freq[layer]
        recency = np.minimum(self.visits[layer] - self.last[layer], _MAX_RECENCY)
        rel = freq * self.E / freq.sum()
        bucket = _RECENCY_BUCKET[recency] * self.F + np.minimum((rel * 2).astype(np.int64), self.F - 1)
        self.trials += np.bincount(bucket, minlength=self.trials.size)
        if used:
            self.hits += np.bincount(bucket[used], minlength=self.hits.size)
        self.visits[layer] += 1
        self.last[layer, used] = self.visits[layer]
        row = self.freq[layer]
        row *= self.freq_decay
        row[used] += 1 - self.freq_decay

    def touch(self, slot: int) -> None:
        super().touch(slot)
        if self.cache is not None:
            self.slot_layer[slot], self.slot_expert[slot] = self.cache.key_of[slot]
            if self._score is not None:
                self._score[slot] = np.inf  # holds an expert of the current layer now, kept this step

    def forget(self, slot: int) -> None:
        super().forget(slot)
        if self.cache is not None:
            self.slot_layer[slot] = -1

    def _scores(self) -> np.ndarray:
        occupied = self.slot_layer >= 0
        layers = np.where(occupied, self.slot_layer, 0)
        steps = (layers - self.layer - 1) % self.L + 1
        p = (self.hits / self.trials)[self._bucket(layers, self.slot_expert)]
        score = p / steps
        for key in self.predicted:
            slot = self.cache.slot_of.get(key)
            if slot is not None:
                score[slot] = np.inf
        score[~occupied] = np.inf
        return score

    def victim(self, allowed: Callable[[int], bool]) -> int | None:
        if self.layer is None:
            return super().victim(allowed)
        if self._score is None:
            self._score = self._scores()
        found = _lowest_allowed(self._score, allowed)
        return found if found is not None else super().victim(allowed)  # only kept slots may go: the oldest


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

"""Eviction policies for the simulator, with the runtime's policy interface (`touch`, `forget`, `victim`).

LRU and LFU are the runtime's own (`specmoe.runtime.cache`). Two more need to know keys, not just slots,
so the simulator binds them to its `ExpertCache` (`bind`) and tells them where it is (`observe`):

* `PredictionAwarePolicy`: never evicts what the latest prediction wants if anything else can go; otherwise
  evicts the expert whose layer comes back last in the layer cycle (the layer just computed is needed again
  only at the next token), least frequently used first within a layer.
* `BeladyPolicy`: Belady's MIN, evicting the expert whose next use is farthest in the future. With demand
  fetching only it gives the fewest misses any cache of that size can have: the bound every policy and
  predictor is compared with.
"""

# Shape legend: L MoE layers, E experts, S slots

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable

from ..runtime.cache import LFUPolicy, LRUPolicy

Key = tuple[int, int]
NEVER = float("inf")


class PredictionAwarePolicy:
    """Evict unpredicted experts of the layer furthest ahead in the layer cycle (LFU, then LRU, within it)."""

    name = "prediction-aware"

    def __init__(self) -> None:
        self.cache = None
        self.layer = 0
        self.num_layers = 1
        self.predicted: set[Key] = set()
        self._count: dict[Key, int] = {}  # uses per expert, kept across evictions
        self._clock = itertools.count()
        self._buckets: list[OrderedDict[int, None]] = []  # per layer: its resident slots, least recent first
        self._last: dict[int, int] = {}

    def bind(self, cache, num_layers: int) -> None:
        self.cache = cache
        self.num_layers = num_layers
        self._buckets = [OrderedDict() for _ in range(num_layers)]

    def observe(self, layer: int, predicted: set[Key]) -> None:
        self.layer = layer
        self.predicted = predicted

    def touch(self, slot: int) -> None:
        key = self.cache.key_of[slot]
        self._count[key] = self._count.get(key, 0) + 1
        bucket = self._buckets[key[0]]
        bucket[slot] = None
        bucket.move_to_end(slot)
        self._last[slot] = next(self._clock)

    def forget(self, slot: int) -> None:
        key = self.cache.key_of[slot]
        if key is not None:
            self._buckets[key[0]].pop(slot, None)
        self._last.pop(slot, None)

    def victim(self, allowed: Callable[[int], bool]) -> int | None:
        L = self.num_layers
        order = [(self.layer - d) % L for d in range(L)]  # current layer first: it is needed again last
        for spare_predicted in (True, False):
            for layer in order:
                best, best_rank = None, None
                for slot in self._buckets[layer]:
                    if not allowed(slot):
                        continue
                    key = self.cache.key_of[slot]
                    if spare_predicted and key in self.predicted:
                        continue
                    rank = (self._count.get(key, 0), self._last[slot])
                    if best_rank is None or rank < best_rank:
                        best, best_rank = slot, rank
                if best is not None:
                    return best
        return None


class BeladyPolicy:
    """Belady's MIN over a known future: evict the expert used again farthest ahead (or never).

    Args:
        future: for each key, the sorted times (any increasing clock, e.g. pass * L + layer) it is used.
    """

    name = "belady"

    def __init__(self, future: dict[Key, list[int]]):
        self.future = future
        self.cache = None
        self.now = 0
        self._heap: list[tuple[float, int, int, int]] = []  # (-next use, tiebreak, slot, version)
        self._version: dict[int, int] = {}
        self._tie = itertools.count()

    def bind(self, cache, num_layers: int) -> None:
        self.cache = cache

    def observe_time(self, now: int) -> None:
        self.now = now

    def next_use(self, key: Key) -> float:
        times = self.future.get(key, ())
        i = bisect.bisect_right(times, self.now)
        return times[i] if i < len(times) else NEVER

    def touch(self, slot: int) -> None:
        version = self._version.get(slot, 0) + 1
        self._version[slot] = version
        heapq.heappush(self._heap, (-self.next_use(self.cache.key_of[slot]), next(self._tie), slot, version))

    def forget(self, slot: int) -> None:
        self._version[slot] = self._version.get(slot, 0) + 1

    def victim(self, allowed: Callable[[int], bool]) -> int | None:
        stash, found = [], None
        while self._heap:
            entry = heapq.heappop(self._heap)
            _, _, slot, version = entry
            if self._version.get(slot) != version:
                continue  # stale
            if allowed(slot):
                found = entry
                break
            stash.append(entry)
        for entry in stash:
            heapq.heappush(self._heap, entry)
        if found is None:
            return None
        heapq.heappush(self._heap, found)  # still resident until the cache forgets it
        return found[2]


def future_uses(passes, num_layers: int) -> dict[Key, list[int]]:
    """For each (layer, expert), the sorted times pass * L + layer at which it is routed."""
    future: dict[Key, list[int]] = {}
    for p, ids in enumerate(passes):
        for layer in range(num_layers):
            t = p * num_layers + layer
            for e in set(ids[:, layer].flatten().tolist()):
                if e >= 0:
                    future.setdefault((layer, e), []).append(t)
    return future


POLICY_NAMES = ("lru", "lfu", "prediction-aware", "belady")


def make_sim_policy(name: str, passes=None, num_layers: int | None = None):
    """A fresh policy object by name; "belady" needs the stream's passes to know the future.

    Raises:
        ValueError: an unknown name.
    """
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "prediction-aware":
        return PredictionAwarePolicy()
    if name == "belady":
        if passes is None or num_layers is None:
            raise ValueError("the belady policy needs the routing stream's passes (its future)")
        return BeladyPolicy(future_uses(passes, num_layers))
    raise ValueError(f"unknown eviction policy {name!r}; choose one of {POLICY_NAMES}")

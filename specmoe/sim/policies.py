"""Eviction policies for the simulator, with the runtime's policy interface (`touch`, `forget`, `victim`).

LRU and LFU are the runtime's own (`specmoe.runtime.cache`). Two more need to know keys, not just slots,
so the simulator binds them to its `ExpertCache` (`bind`) and tells them where it is (`observe`):

* `PredictionAwarePolicy`: LRU that spares what the latest prediction wants and evicts unused wrong guesses first.
* `BeladyPolicy`: Belady's MIN, evicting the expert whose next use is farthest in the future. With demand
  fetching only it gives the fewest misses any cache of that size can have: the bound every policy and
  predictor is compared with.
"""

# Shape legend: L MoE layers, E experts, S slots

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable

from ..runtime.cache import Key, LFUPolicy, LRUPolicy
NEVER = float("inf")


class PredictionAwarePolicy(LRUPolicy):
    """LRU that never evicts an expert the latest prediction wants while anything else can go.

    The runtime already spares predicted experts when it evicts for a *prefetch*; this policy spares them for
    demand fetches too. Without a predictor it is LRU. (Evicting unused wrong guesses first was tried and moved
    more bytes: a wrongly guessed expert is often a popular one that a later token uses.)
    """

    name = "prediction-aware"

    def __init__(self) -> None:
        super().__init__()
        self.cache = None
        self.predicted: set[Key] = set()

    def bind(self, cache, num_layers: int) -> None:
        self.cache = cache

    def observe(self, layer: int, predicted: set[Key], routed=()) -> None:
        """Layer `layer` was just routed to `routed`; `predicted` is what the predictor now wants."""
        self.predicted = predicted

    def victim(self, allowed: Callable[[int], bool]) -> int | None:
        if self.predicted:
            spare = super().victim(lambda s: allowed(s) and self.cache.key_of[s] not in self.predicted)
            if spare is not None:
                return spare
        return super().victim(allowed)


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

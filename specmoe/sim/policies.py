"""Eviction policies for the simulator: the runtime's own (`specmoe.runtime.policies`: lru, lfu, hit-density,
"default") and one that needs the future, so it exists only here:

A directory written by `specmoe train --policy learned` names a learned policy (`runtime.learned_policy`).

* `BeladyPolicy`: Belady's MIN, evicting the expert whose next use is farthest in the future. With demand
  fetching only it gives the fewest misses any cache of that size can have: the bound every policy and
  predictor is compared with.
"""

# Shape legend: L MoE layers, E experts, S slots

from __future__ import annotations

import heapq
import os
import itertools
from collections.abc import Callable

from ..runtime.cache import Key
from ..runtime.policies import DEFAULT_POLICY, POLICIES, make_policy
NEVER = float("inf")


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
        self._next: dict[Key, int] = {}  # key -> index into future[key] of its first use after `now`
        self._heap: list[tuple[float, int, int, int]] = []  # (-next use, tiebreak, slot, version)
        self._version: dict[int, int] = {}
        self._tie = itertools.count()

    def bind(self, cache, num_layers: int) -> None:
        self.cache = cache

    def observe_time(self, now: int) -> None:
        if now < self.now:
            self._next.clear()  # the clock went back (a new replay): search from the start again
        self.now = now

    def next_use(self, key: Key) -> float:
        """The first use of `key` after now. The clock only rises, so each key's index only moves forward."""
        times = self.future.get(key)
        if times is None:
            return NEVER
        i, now, n = self._next.get(key, 0), self.now, len(times)
        while i < n and times[i] <= now:
            i += 1
        self._next[key] = i
        return times[i] if i < n else NEVER

    def touch(self, slot: int) -> None:
        versions = self._version
        version = versions.get(slot, 0) + 1
        versions[slot] = version
        key = self.cache.key_of[slot]
        times = self.future.get(key)  # next_use, inlined: the simulator's hottest call under Belady
        if times is None:
            nxt = NEVER
        else:
            i, now, n = self._next.get(key, 0), self.now, len(times)
            while i < n and times[i] <= now:
                i += 1
            self._next[key] = i
            nxt = times[i] if i < n else NEVER
        heapq.heappush(self._heap, (-nxt, next(self._tie), slot, version))

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
    keys = [[(layer, e) for e in range(4096)] for layer in range(num_layers)]  # tuples built once
    for p, ids in enumerate(passes):
        rows = ids.tolist()  # [T][L][k]: one conversion per pass
        base = p * num_layers
        for layer in range(num_layers):
            seen = {e for row in rows for e in row[layer] if e >= 0}
            for e in seen:
                key = keys[layer][e] if e < 4096 else (layer, e)
                times = future.get(key)
                if times is None:
                    future[key] = [base + layer]
                else:
                    times.append(base + layer)
    return future


POLICY_NAMES = (*POLICIES, "default", "belady")


def make_sim_policy(name: str, passes=None, num_layers: int | None = None):
    """A fresh policy object by name ("default": the runtime's default, DEFAULT_POLICY); "belady" needs the
    stream's passes to know the future. A policy object is used as it is (one per replay).

    Raises:
        ValueError: an unknown name.
    """
    if not isinstance(name, (str, os.PathLike)):  # a policy object (e.g. an oracle that knows the future)
        return make_policy(name)
    if name == "belady":
        if passes is None or num_layers is None:
            raise ValueError("the belady policy needs the routing stream's passes (its future)")
        return BeladyPolicy(future_uses(passes, num_layers))
    if name not in POLICY_NAMES and not is_known_policy(name):
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {POLICY_NAMES} or a learned policy's "
                         "directory (specmoe train --policy learned)")
    return make_policy(name)


def is_known_policy(name) -> bool:
    """A policy name the simulator runs, or a directory (a learned policy, `specmoe train --policy learned`)."""
    return name in POLICY_NAMES or os.path.isdir(str(name))


def resolve_policy_name(name: str) -> str:
    """The policy a name runs ("default" -> DEFAULT_POLICY), for labels in results."""
    return DEFAULT_POLICY if name == "default" else name

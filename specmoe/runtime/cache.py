"""The device-side expert cache: a slot pool shared by all MoE layers, expert->slot tables, eviction policy.

The cache owns bookkeeping only; the copies themselves belong to a copy engine (transfer.py) and the
decision of what to load belongs to the wrapper. A slot that is in use (pinned for the layer being computed)
or whose copy is in flight is never chosen as a victim.
"""

# Shape legend: L MoE layers, E experts, S slots, B bytes per expert

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from .store import ExpertLayout

Key = tuple[int, int]  # (layer, expert)


class LRUPolicy:
    """Least recently used: the victim is the slot touched longest ago among those allowed."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def touch(self, slot: int) -> None:
        self._order[slot] = None
        self._order.move_to_end(slot)

    def forget(self, slot: int) -> None:
        self._order.pop(slot, None)

    def victim(self, allowed: Callable[[int], bool]) -> int | None:
        return next((s for s in self._order if allowed(s)), None)


class LFUPolicy:
    """Least frequently used (ties: least recently used); counts restart when a slot gets a new expert."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[int, int] = {}
        self._lru = LRUPolicy()

    def touch(self, slot: int) -> None:
        self._count[slot] = self._count.get(slot, 0) + 1
        self._lru.touch(slot)

    def forget(self, slot: int) -> None:
        self._count.pop(slot, None)
        self._lru.forget(slot)

    def victim(self, allowed: Callable[[int], bool]) -> int | None:
        best, best_count = None, None
        for s in self._lru._order:  # oldest first, so ties go to the least recent
            if allowed(s) and (best_count is None or self._count[s] < best_count):
                best, best_count = s, self._count[s]
        return best


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(policy) -> object:
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose one of {sorted(POLICIES)}")
        return POLICIES[policy]()
    if not all(callable(getattr(policy, m, None)) for m in ("touch", "forget", "victim")):
        raise TypeError("an eviction policy needs touch(slot), forget(slot) and victim(allowed) methods")
    return policy


class SlotPool:
    """S expert slots on the device in the store's byte layout: data [S, B] and typed views [S, *shape]."""

    def __init__(self, layout: ExpertLayout, num_slots: int, device: torch.device):
        self.layout = layout
        self.num_slots = num_slots
        self.data = torch.empty(num_slots, layout.nbytes, dtype=torch.uint8, device=device)  # [S, B]
        self.views = layout.views(self.data)  # name -> [S, *shape]

    @property
    def nbytes(self) -> int:
        return self.data.numel()


class ExpertCache:
    """Which expert is in which slot, on the host (dicts) and on the device (table [L, E], -1 = absent; no
    table where `device` is None, as in the simulator)."""

    def __init__(self, num_slots: int, num_layers: int, num_experts: int, device: torch.device | None, policy="lru"):
        self.num_slots, self.num_experts = num_slots, num_experts
        self.policy = make_policy(policy)
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * num_slots
        self.table = (None if device is None else
                      torch.full((num_layers, num_experts), -1, dtype=torch.long, device=device))  # [L, E]
        self._free = list(range(num_slots - 1, -1, -1))
        if hasattr(self.policy, "bind"):  # policies that reason about (layer, expert) keys read key_of / slot_of
            self.policy.bind(self, num_layers)

    def lookup(self, key: Key) -> int | None:
        return self.slot_of.get(key)

    def touch(self, slot: int) -> None:
        self.policy.touch(slot)

    def assign(self, key: Key, allowed: Callable[[int], bool]) -> tuple[int, Key | None] | None:
        """Give `key` a slot: a free one, else the policy's victim among `allowed`. Returns (slot, evicted key),
        or None when every occupied slot is off limits."""
        if key in self.slot_of:
            raise ValueError(f"expert {key} is already in slot {self.slot_of[key]}")
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            slot = self.policy.victim(allowed)
            if slot is None:
                return None
            evicted = self.key_of[slot]
            del self.slot_of[evicted]
            if self.table is not None:
                self.table[evicted] = -1
            self.policy.forget(slot)
        self.key_of[slot] = key
        self.slot_of[key] = slot
        if self.table is not None:
            self.table[key] = slot
        self.policy.touch(slot)
        return slot, evicted

    def resident(self) -> set[Key]:
        return set(self.slot_of)

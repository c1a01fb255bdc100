"""The device-side expert cache: a slot pool shared by all MoE layers, expert->slot tables, eviction policy.

The cache owns bookkeeping only (eviction policies live in policies.py); the copies themselves belong to a copy
engine (transfer.py) and the decisions of what to load, evict and prefetch to the scheduler (scheduler.py), which
passes `assign` the filter that keeps a slot in use (pinned for the layer being computed) or whose copy is in
flight from ever being chosen as a victim.
"""

# Shape legend: L MoE layers, E experts, S slots, B bytes per expert

from __future__ import annotations

from collections.abc import Callable

import torch

from .policies import DEFAULT_POLICY, POLICIES, LFUPolicy, LRUPolicy, make_policy  # noqa: F401 (old imports)
from .store import ExpertLayout

Key = tuple[int, int]  # (layer, expert)


class SlotPool:
    """S expert slots on the device in the store's byte layout: data [S, B] and typed views [S, *shape].

    With a codec (compression.py) the store's layout is the compressed one, so is every slot's: a copy moves
    the compressed bytes straight in, and B is the compressed size. `weights` gives what compute reads
    (QuantizedStacks for the fused kernel); `gather` and `expert_views` give the experts' own layout
    (dequantized into a scratch when compressed) for the model's implementation.

    Args:
        layout: the byte layout of one slot (the store's).
        num_slots: S.
        device: where the slots live.
        codec: the store's `ExpertCodec` when experts are compressed (its `layout` must be `layout`).
    """

    def __init__(self, layout: ExpertLayout, num_slots: int, device: torch.device, codec=None):
        if codec is not None and codec.layout.nbytes != layout.nbytes:
            raise ValueError("a compressed slot pool needs the codec's compressed layout")
        self.layout = layout
        self.num_slots = num_slots
        self.codec = codec
        self.data = torch.empty(num_slots, layout.nbytes, dtype=torch.uint8, device=device)  # [S, B]
        self.views = layout.views(self.data)  # name -> [S, *shape] (compressed parts when compressed)
        self.weights = codec.weights(self.views) if codec is not None else self.views  # name -> [S, ...] / stack

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def compressed(self) -> bool:
        return self.codec is not None

    def gather(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """The experts in `slots` [n] as a compact copy in their own layout: name -> [n, *shape] (one gather;
        compressed slots are dequantized into the new buffer)."""
        compact = self.data.index_select(0, slots)  # [n, B]
        if self.codec is None:
            return self.layout.views(compact)
        return self.codec.slot_layout.views(self.codec.decode_rows(compact))

    def expert_views(self, slot: int) -> tuple[dict[str, torch.Tensor], int]:
        """(views, index) such that views[name][index] is the expert in `slot` in its own layout: the pool's
        views, or a dequantized scratch of that one expert when compressed."""
        if self.codec is None:
            return self.views, slot
        return self.codec.slot_layout.views(self.codec.decode_rows(self.data[slot : slot + 1])), 0


class ExpertCache:
    """Which expert is in which slot, on the host (dicts) and on the device (table [L, E], -1 = absent; no
    table where `device` is None, as in the simulator)."""

    def __init__(self, num_slots: int, num_layers: int, num_experts: int, device: torch.device | None, policy=DEFAULT_POLICY):
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
        slot_of, policy, table = self.slot_of, self.policy, self.table
        if key in slot_of:
            raise ValueError(f"expert {key} is already in slot {slot_of[key]}")
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            slot = policy.victim(allowed)
            if slot is None:
                return None
            evicted = self.key_of[slot]
            del slot_of[evicted]
            if table is not None:
                table[evicted] = -1
            policy.forget(slot)
        self.key_of[slot] = key
        slot_of[key] = slot
        if table is not None:
            table[key] = slot
        policy.touch(slot)
        return slot, evicted

    def resident(self) -> set[Key]:
        return set(self.slot_of)

"""Counters of the offloading runtime, in total and per MoE layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LayerStats:
    hits: int = 0  # routed experts found resident or already in flight
    hits_in_flight: int = 0  # of the hits, those whose copy had not finished (compute waited on its event)
    misses: int = 0  # routed experts not resident: fetched on demand, or computed on the host (misses="host"/"auto")
    host_computed: int = 0  # of the misses, those computed on the host from the host store
    prefetch_issued: int = 0
    prefetch_used: int = 0  # prefetched experts later routed to before being evicted
    prefetch_wasted: int = 0  # prefetched experts evicted without being used
    prefetch_refused: int = 0  # candidates not resident that admission did not copy (`runtime.admission`)
    reuse_issued: int = 0  # of prefetch_issued, copies of experts just computed on the host (misses="auto"),
    reuse_used: int = 0  # kept for their layer's next visit (no predictor chose them); of prefetch_used, those
    reuse_refused: int = 0  # routed to; of prefetch_refused, those that admission did not copy
    bytes_moved: int = 0  # host -> device, demand and prefetch
    predict_calls: int = 0  # layer calls that ran the predictor (asked of the scheduler: `wants_prediction`)
    predict_skipped: int = 0  # layer calls whose predictor the governor skipped (its copies did not pay for it)

    def add(self, other: "LayerStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Stats:
    """What the runtime did since the last reset. ``per_layer[l]`` holds MoE layer l's share."""

    per_layer: list[LayerStats]
    stall_s: float = 0.0  # time compute waited for expert copies
    stall_waits: int = 0
    host_stall_s: float = 0.0  # time the host was blocked on copies (slot / staging waits, pageable copies)
    host_stall_waits: int = 0
    host_syncs: int = 0  # device->host syncs in the hot path (one per MoE layer call)
    layer_calls: int = 0
    chunked_calls: int = 0  # layer calls that needed more distinct experts than there are slots
    total: LayerStats = field(init=False)

    def __post_init__(self):
        self.total = LayerStats()
        for layer in self.per_layer:
            self.total.add(layer)

    # The totals read directly: ``stats.hits`` is ``stats.total.hits``.
    hits = property(lambda self: self.total.hits, doc="routed experts found resident or in flight, all layers")
    hits_in_flight = property(lambda self: self.total.hits_in_flight, doc="of the hits, those still copying")
    misses = property(lambda self: self.total.misses, doc="routed experts not resident (fetched or computed on the host)")
    host_computed = property(lambda self: self.total.host_computed, doc="of the misses, those computed on the host")
    prefetch_issued = property(lambda self: self.total.prefetch_issued)
    prefetch_used = property(lambda self: self.total.prefetch_used)
    prefetch_wasted = property(lambda self: self.total.prefetch_wasted)
    prefetch_refused = property(lambda self: self.total.prefetch_refused)
    reuse_issued = property(lambda self: self.total.reuse_issued, doc="of prefetch_issued, copies of host-computed experts")
    reuse_used = property(lambda self: self.total.reuse_used, doc="of prefetch_used, those of host-computed experts")
    reuse_refused = property(lambda self: self.total.reuse_refused, doc="of prefetch_refused, host-computed experts")
    bytes_moved = property(lambda self: self.total.bytes_moved, doc="host -> device bytes, all layers")
    predict_calls = property(lambda self: self.total.predict_calls, doc="layer calls that ran the predictor")
    predict_skipped = property(lambda self: self.total.predict_skipped,
                               doc="layer calls whose predictor the governor skipped")

    @property
    def hit_rate(self) -> float:
        """Share of routed experts found resident or in flight (1.0 when nothing was routed: nothing missed)."""
        n = self.total.hits + self.total.misses
        return self.total.hits / n if n else 1.0

    @property
    def hits_resident(self) -> int:
        """Hits on experts whose copy had landed (the others, `hits_in_flight`, waited on a copy)."""
        return self.total.hits - self.total.hits_in_flight

    @property
    def copies(self) -> int:
        """Expert copies host -> device: demand fetches and prefetches."""
        return self.total.misses - self.total.host_computed + self.total.prefetch_issued

    @property
    def prefetch_recall(self) -> float:
        """Share of the routed experts not kept by the cache itself that a prefetch brought in time or late."""
        n = self.total.prefetch_used + self.total.misses
        return self.total.prefetch_used / n if n else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Share of settled prefetches (used or wasted) that were used."""
        settled = self.total.prefetch_used + self.total.prefetch_wasted
        return self.total.prefetch_used / settled if settled else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self.total),
            "hit_rate": self.hit_rate,
            "prefetch_precision": self.prefetch_precision,
            "prefetch_recall": self.prefetch_recall,
            "hits_resident": self.hits_resident,
            "copies": self.copies,
            "stall_s": self.stall_s,
            "stall_waits": self.stall_waits,
            "host_stall_s": self.host_stall_s,
            "host_stall_waits": self.host_stall_waits,
            "host_syncs": self.host_syncs,
            "layer_calls": self.layer_calls,
            "chunked_calls": self.chunked_calls,
            "per_layer": [asdict(s) for s in self.per_layer],
        }

    def summary(self) -> str:
        """One line: hit rate, MiB moved and stall."""
        return (f"hit rate {self.hit_rate:.3f} ({self.hits} hits, {self.misses} misses), "
                f"{self.bytes_moved / 2**20:.1f} MiB moved, stall {self.stall_s * 1e3:.1f} ms")

    def __str__(self) -> str:
        t = self.total
        lines = [
            f"hit rate {self.hit_rate:.3f} ({t.hits} hits, {t.hits_in_flight} on in-flight copies; {t.misses} misses)",
            f"misses: {t.misses - t.host_computed} fetched, {t.host_computed} computed on the host",
            f"prefetch: {t.prefetch_issued} issued, {t.prefetch_used} used, {t.prefetch_wasted} wasted, "
            f"{t.prefetch_refused} refused by admission "
            f"(precision {self.prefetch_precision:.3f}); of them copies of host-computed experts: "
            f"{t.reuse_issued} issued, {t.reuse_used} used, {t.reuse_refused} refused; the predictor ran at "
            f"{t.predict_calls} layer calls, skipped at {t.predict_skipped} (its copies did not pay for it)",
            f"moved {t.bytes_moved / 2**20:.1f} MiB host->device; compute stalled {self.stall_s * 1e3:.2f} ms "
            f"in {self.stall_waits} waits, the host blocked {self.host_stall_s * 1e3:.2f} ms on copies in "
            f"{self.host_stall_waits} waits; {self.host_syncs} host syncs over {self.layer_calls} layer calls",
            "layer  hits  misses  pf_issued  pf_used  pf_wasted",
        ]
        for i, s in enumerate(self.per_layer):
            lines.append(
                f"{i:5d} {s.hits:5d} {s.misses:7d} {s.prefetch_issued:10d} {s.prefetch_used:8d} {s.prefetch_wasted:10d}"
            )
        return "\n".join(lines)

"""Where a missed expert runs: copied to a device slot ("fetch") or computed where it lives ("host").

A routed expert that is not resident can cross PCIe (its bytes over the link, then device compute) or stay in
host RAM and be computed there (its bytes over the host's memory bus). `split_misses` decides per miss, the
same way in the runtime and in the simulator, from `MissCosts`: the copy time of one expert and the host time
of one expert for a number of tokens. Copies queue on one copy engine and host experts on one host worker, and
both run beside the device computing the resident experts, so each miss goes where it would finish first
(list scheduling, experts with the most tokens first). Prefetches are not decided here: what the predictor
asks for always goes to the device.
"""

# Shape legend: T tokens routed to one expert

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MISSES = ("fetch", "host", "auto")


def check_misses(misses: str) -> str:
    if misses not in MISSES:
        raise ValueError(f"misses must be one of {MISSES} (fetch: copy missed experts to the device; host: compute "
                         f"them on the host; auto: decide per miss from a cost model), got {misses!r}")
    return misses


@dataclass(frozen=True)
class MissCosts:
    """Seconds to serve one missed expert each way.

    Args:
        copy_s: one expert copied host->device (the store's bytes; with compression, decode included).
        host_s: host compute of one expert for one token ...
        host_token_s: ... plus this per further token routed to it.
        host_call_s: once per layer call that uses the host: the hidden states crossing both ways.
        source: how the numbers were obtained ("measured ...", "profile ...").
    """

    copy_s: float
    host_s: float
    host_token_s: float = 0.0
    host_call_s: float = 0.0
    source: str = ""

    def __post_init__(self):
        for name in ("copy_s", "host_s", "host_token_s", "host_call_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"MissCosts.{name} must be seconds >= 0, got {value!r}")

    def host_seconds(self, tokens: int) -> float:
        return self.host_s + self.host_token_s * max(0, tokens - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def split_misses(misses: list[int], tokens: dict[int, int], mode: str, costs: MissCosts | None = None,
                 copy_backlog_s: float = 0.0) -> tuple[list[int], list[int]]:
    """Split the missed experts of one layer call into (fetched, computed on the host).

    Args:
        misses: expert ids routed to and not resident.
        tokens: expert id -> tokens routed to it in this call.
        mode: "fetch" (all copied), "host" (all computed on the host) or "auto" (needs `costs`).
        copy_backlog_s: copy time already queued ahead of these misses (e.g. prefetches in flight).

    Returns:
        (fetched, host), each in the order of `misses`.
    """
    if mode == "fetch" or not misses:
        return list(misses), []
    if mode == "host":
        return [], list(misses)
    if costs is None:
        raise ValueError("misses='auto' needs MissCosts (measured at start-up or given)")
    copy_clock, host_clock = copy_backlog_s, costs.host_call_s
    to_host: set[int] = set()
    for e in sorted(misses, key=lambda e: -tokens.get(e, 1)):
        host_done = host_clock + costs.host_seconds(tokens.get(e, 1))
        copy_done = copy_clock + costs.copy_s
        if host_done < copy_done:
            to_host.add(e)
            host_clock = host_done
        else:
            copy_clock = copy_done
    return [e for e in misses if e not in to_host], [e for e in misses if e in to_host]


def hottest(frequencies, slots: int) -> list[tuple[int, int]]:
    """A static placement (llama.cpp's ``--n-cpu-moe`` spirit): the `slots` most often routed (layer, expert)
    keys of frequencies [L][E], hottest first (ties: lower layer, then lower expert)."""
    keys = [(count, layer, e) for layer, row in enumerate(frequencies) for e, count in enumerate(row)]
    keys.sort(key=lambda x: (-x[0], x[1], x[2]))
    return [(layer, e) for _, layer, e in keys[:slots]]

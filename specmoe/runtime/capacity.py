"""`cache_capacity` -> a number of cache slots: a fraction of all experts, a slot count, or a memory budget."""

from __future__ import annotations

import logging
import math
import re

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'8GiB' -> 8589934592; '1.5GB' -> 1500000000; '4096B' -> 4096."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write it like '8GiB', '512MiB' or '2GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_capacity(text: str) -> float | int | str:
    """The one reading of a capacity written as text (every command line): '0.5' -> 0.5 (a fraction of all
    experts), '96' -> 96 (slots), '8GiB' -> '8GiB' (a memory budget), each checked here.

    Raises:
        ValueError: anything else, saying what to write.
    """
    t = str(text).strip()
    if re.fullmatch(r"[+-]?\d+", t):
        if int(t) < 1:
            raise ValueError(f"capacity {text!r}: a slot count must be >= 1 (or give a fraction in (0, 1] like 0.5, "
                             "or a budget like 8GiB)")
        return int(t)
    try:
        value = float(t)
    except ValueError:
        value = None
    if value is not None:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"capacity {text!r}: a fraction of all experts must be in (0, 1] (or give a slot count "
                             "like 96, or a budget like 8GiB)")
        return value
    try:
        parse_bytes(t)
    except ValueError:
        raise ValueError(f"capacity {text!r}: write a fraction of all experts in (0, 1] like 0.5, a slot count like "
                         "96, or a memory budget like 8GiB") from None
    return t


def capacity_arg(text: str):
    """The argparse `type` of every --capacity / --capacities option: `parse_capacity`, its message on error."""
    import argparse

    try:
        return parse_capacity(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def capacity_fraction(capacity, num_layers: int, num_experts: int, expert_nbytes: int) -> float:
    """The share of all experts that `capacity` (any form `resolve_capacity` takes) keeps on the device."""
    return resolve_capacity(capacity, num_layers, num_experts, expert_nbytes) / (num_layers * num_experts)


def resolve_capacity(capacity, num_layers: int, num_experts: int, expert_nbytes: int) -> int:
    """Number of cache slots for `cache_capacity` (fraction of all experts, slot count, or memory budget)."""
    total = num_layers * num_experts
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float, str)):
        raise TypeError(
            f"cache_capacity must be a float in (0, 1], an int number of slots or a budget such as '8GiB'; "
            f"got {type(capacity).__name__}"
        )
    if isinstance(capacity, str):
        if re.fullmatch(r"\s*[\d.]+\s*", capacity):
            raise ValueError(f"cache_capacity {capacity!r} is a string without a unit: pass a fraction as a float "
                             f"({capacity.strip()} rather than '{capacity.strip()}'), a slot count as an int, or a "
                             "budget with a unit such as '8GiB'")
        budget = parse_bytes(capacity)
        slots = budget // expert_nbytes
        if slots < 1:
            raise ValueError(
                f"cache budget {capacity!r} ({budget} bytes) is smaller than one expert "
                f"({expert_nbytes / 2**20:.2f} MiB); give at least {expert_nbytes} bytes"
            )
    elif isinstance(capacity, float):
        if not (0.0 < capacity <= 1.0) or math.isnan(capacity):
            raise ValueError(f"a float cache_capacity is a fraction of all experts in (0, 1], got {capacity}")
        slots = max(1, math.ceil(capacity * total - 1e-9))
    else:
        if capacity <= 0:
            raise ValueError(f"cache_capacity as a slot count must be >= 1, got {capacity}")
        slots = capacity
    if slots > total:  # a budget beyond the model: said, not silently cut
        logger.warning("cache_capacity %r gives %d slots, more than the model's %d experts; using %d (all of them)",
                       capacity, slots, total, total)
    return min(slots, total)

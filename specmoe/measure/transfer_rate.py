"""Host->device copy rate of one expert buffer, pinned and pageable: what the simulator's profile assumes."""

from __future__ import annotations

import statistics

import torch

from .timing import timed_call


def measure_h2d(nbytes: int, device, repeats: int = 20) -> dict:
    """Median seconds and bytes/s of copying `nbytes` from host memory to `device` (pinned and pageable).

    On CPU both are host-to-host copies (memcpy), which says nothing about PCIe; the result says which.
    """
    device = torch.device(device)
    out = {"nbytes": int(nbytes), "device": str(device), "repeats": repeats}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for kind in ("pinned", "pageable"):
        pin = kind == "pinned" and device.type == "cuda"
        if kind == "pinned" and device.type != "cuda":
            continue
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).fill_(1)
        for _ in range(3):  # warm-up
            dst.copy_(src, non_blocking=pin)
        times = [timed_call(lambda: dst.copy_(src, non_blocking=pin), device)[0] for _ in range(repeats)]
        med = statistics.median(times)
        out[f"{kind}_copy_s"] = med
        out[f"{kind}_h2d_bytes_per_s"] = nbytes / med
    if device.type != "cuda":
        out["note"] = "CPU: host-to-host memcpy, not a PCIe figure"
    return out

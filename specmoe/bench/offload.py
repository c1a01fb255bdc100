"""The baseline users have today: accelerate's offloading, at the same device-memory budget as the cache.

On CUDA, `infer_auto_device_map` with `max_memory={gpu: budget, "cpu": ...}` places whole decoder layers on
the GPU until the budget is spent and the rest on the CPU, and `dispatch_model` adds hooks that copy an
offloaded module's weights to the GPU for every forward (all its experts, routed or not).
On CPU there is nowhere to offload *to*: `cpu_offload(execution_device=cpu)` still runs accelerate's hooks
and weight copies (host to host), which is what the CPU row measures; it says nothing about PCIe.
The model is changed in place (hooks, meta parameters): pass a copy you can throw away.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def accelerate_offload(model: nn.Module, device, budget_bytes: int | None) -> dict:
    """Offload `model` (on the CPU) with accelerate; returns how it was placed.

    Args:
        model: a transformers model on the CPU; it is modified in place.
        device: the execution device.
        budget_bytes: device memory allowed for weights (CUDA only).

    Returns:
        {"method": ..., "device_map_summary": {placement: modules}, "budget_bytes": ...}
    """
    from accelerate import cpu_offload, dispatch_model, infer_auto_device_map

    device = torch.device(device)
    if device.type != "cuda":
        cpu_offload(model, execution_device=device)
        return {"method": "accelerate.cpu_offload(execution_device=cpu): host-to-host copies (degenerate on CPU)",
                "device_map_summary": {"cpu (offloaded)": len(list(model.modules()))}, "budget_bytes": None}
    if budget_bytes is None or budget_bytes <= 0:
        raise ValueError("accelerate offload on CUDA needs a positive device budget in bytes")
    index = device.index if device.index is not None else torch.cuda.current_device()
    host = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 2
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory={index: int(budget_bytes), "cpu": int(host)},
                                       no_split_module_classes=no_split)
    summary: dict[str, int] = {}
    for placement in device_map.values():
        summary[str(placement)] = summary.get(str(placement), 0) + 1
    logger.info("accelerate device map: %s", summary)
    dispatch_model(model, device_map=device_map, main_device=device)
    return {"method": "accelerate infer_auto_device_map(max_memory) + dispatch_model", "device_map_summary": summary,
            "budget_bytes": int(budget_bytes)}

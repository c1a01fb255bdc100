"""What the wrapper checks before it touches a model: materialised weights, one device, a predictor, memory."""

from __future__ import annotations

import torch
from torch import nn

from .adapters import ModelMoE


def check_materialised(model: nn.Module, moe: ModelMoE, streamed: bool) -> None:
    """Refuse a model whose weights are on the meta device (accelerate's disk or CPU offload), before any change."""
    expert_ids = {id(p) for layer in moe.layers for p in layer.experts.parameters()} if streamed else set()
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta" and id(p) not in expert_ids]
    if meta:
        raise ValueError(
            f"{len(meta)} weights of this model are on the meta device (e.g. {meta[0]}): it was loaded with "
            "accelerate offloading (device_map with 'disk' or 'cpu' entries), whose hooks load weights at each call. "
            "SpeculativeMoE offloads the experts itself: load the model without offloading, or let "
            "specmoe.load_offloaded(path) stream it from its safetensors files (it never holds the whole model in "
            "memory)")


def model_devices(model: nn.Module) -> set[torch.device]:
    return {t.device for t in list(model.parameters()) + list(model.buffers())}


def indexed_device(device) -> torch.device:
    """`device` with its index: "cuda" -> cuda:<current device>. Tensors always live on an indexed device, and
    `torch.device("cuda:0") == torch.device("cuda")` is False, so every device the runtime compares is indexed."""
    device = torch.device(device)
    if device.index is not None or device.type in ("cpu", "meta"):
        return device
    backend = getattr(torch, device.type, None)
    current = getattr(backend, "current_device", None)
    return torch.device(device.type, current() if callable(current) else 0)


def resolve_device(model: nn.Module, device) -> torch.device:
    """Where the cache and compute live, indexed (`indexed_device`): `device`, else the model's accelerator,
    else the current CUDA device, else the CPU."""
    if device is not None:
        return indexed_device(device)
    devices = {d for d in model_devices(model) if d.type != "meta"}
    accel = [d for d in devices if d.type != "cpu"]
    if len(accel) > 1:
        raise ValueError(f"the model is spread over {sorted(map(str, accel))}; load it on one device "
                         "(or with specmoe.load_offloaded) before wrapping")
    if accel:
        return accel[0]
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def check_predictor(predictor) -> None:
    if predictor is not None and not all(callable(getattr(predictor, m, None)) for m in ("predict", "bind", "reset")):
        raise TypeError(f"predictor must implement the specmoe Predictor protocol (bind/reset/predict), "
                        f"got {type(predictor).__name__}")


def check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 (or None for the default), got {value!r}")


def check_device_memory(model: nn.Module, moe: ModelMoE, device: torch.device, pool_bytes: int) -> None:
    """Refuse a cache that cannot fit next to the non-expert weights (CUDA only)."""
    if device.type != "cuda":
        return

    def nbytes(t):
        return t.numel() * t.element_size()

    expert = {id(p): p for layer in moe.layers for p in layer.experts.parameters()}
    device = indexed_device(device)
    freed = sum(nbytes(p) for p in expert.values() if p.device == device)
    moved_in = sum(nbytes(t) for t in list(model.parameters()) + list(model.buffers())
                   if id(t) not in expert and t.device != device)
    free, _ = torch.cuda.mem_get_info(device)
    if pool_bytes + moved_in - freed > free:
        raise ValueError(
            f"the cache ({pool_bytes / 2**30:.2f} GiB) and the non-expert weights ({moved_in / 2**30:.2f} GiB "
            f"to move) do not fit in the {(free + freed) / 2**30:.2f} GiB available on {device}; "
            "lower cache_capacity"
        )

"""Load a local checkpoint with experts in host memory and the rest on the device.

The checkpoint is read by transformers onto the CPU (safetensors, with its own key conversions), so the
device never holds the whole model; `SpeculativeMoE` then moves the experts into the host store layer by
layer (each layer's tensors are freed as soon as they are stored) and the non-expert weights to the device.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from .wrapper import SpeculativeMoE


def _model_class(config):
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return AutoModelForCausalLM


def load_offloaded(path, *, device=None, cache_capacity=0.5, predictor=None, dtype=None, **wrapper_kwargs):
    """Load a `save_pretrained` directory straight into a `SpeculativeMoE`.

    Args:
        path: a local directory with config.json and safetensors weights (nothing is downloaded).
        device: the compute device (default: CUDA when present, else CPU).
        cache_capacity: as for `SpeculativeMoE`.
        predictor: as for `SpeculativeMoE`.
        dtype: load in this dtype (default: the checkpoint's).
        **wrapper_kwargs: passed on to `SpeculativeMoE`.

    Returns:
        The wrapped model, ready for `.generate`.

    Raises:
        FileNotFoundError: `path` is not a directory with a config.json.
        TypeError / ValueError: as `SpeculativeMoE` (dense model, bad capacity, ...).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json); "
                                "load_offloaded reads what save_pretrained writes")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = _model_class(config).from_pretrained(
        path, dtype=dtype if dtype is not None else "auto", device_map="cpu", local_files_only=True
    )
    model.eval()
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return SpeculativeMoE(model, predictor, cache_capacity, device=device, **wrapper_kwargs)

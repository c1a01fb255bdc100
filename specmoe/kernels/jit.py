"""When Triton kernels can run, and compiling them late enough that TRITON_INTERPRET is honoured.

`triton.jit` decides at decoration time whether a function is compiled for the GPU or interpreted on the CPU
(TRITON_INTERPRET=1). Decorating at import would freeze that choice for the whole process, so kernels here
are plain functions wrapped in `LazyKernel`, decorated on first launch for the mode in force then.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether TRITON_INTERPRET=1 is set (kernels then run, slowly, on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether a Triton kernel can be launched on tensors of `device` in this process."""
    if not triton_installed():
        return False
    device = torch.device(device)
    if interpreting():
        return device.type == "cpu"
    return device.type == "cuda"


class LazyKernel:
    """A Triton kernel decorated with `triton.jit` when first launched: ``LazyKernel(fn)[grid](*args)``.

    The kernel body must not call other Python-level kernels (each would be decorated separately); keep
    helpers inline.
    """

    def __init__(self, fn):
        self.fn = fn
        self._compiled = {}
        functools.update_wrapper(self, fn)

    def get(self):
        mode = interpreting()
        if mode not in self._compiled:
            import triton

            self._compiled[mode] = triton.jit(self.fn)
        return self._compiled[mode]

    def __getitem__(self, grid):
        return self.get()[grid]

"""Whether the Triton kernels here can run, and where: compiled on CUDA, or interpreted on CPU.

Triton fixes the mode when it is first imported: with TRITON_INTERPRET=1 in the environment at that moment,
every `triton.jit` function (ours and triton.language's own) runs in its NumPy interpreter on CPU tensors;
otherwise it is compiled for the GPU. Set the variable before anything imports triton (the test suite does
so in conftest.py on machines without CUDA).
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
except ImportError:  # pragma: no cover - triton is optional; every entry point has a PyTorch fallback
    triton = None


def jit(fn):
    """`triton.jit`, or the plain function when triton is not installed (then it is never launched)."""
    return triton.jit(fn) if triton is not None else fn


@jit
def _probe(x_ptr):
    pass


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """Whether triton runs kernels in its interpreter in this process (fixed when triton was imported)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe, InterpretedFunction)


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether a Triton kernel can be launched on tensors of `device` in this process."""
    if triton is None:
        return False
    device = torch.device(device)
    if interpreting():
        return device.type == "cpu"
    return device.type == "cuda"

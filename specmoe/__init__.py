"""specmoe: run Mixture-of-Experts LMs on GPUs too small to hold them.

Experts live in host memory, a device cache keeps the hot ones, and a speculation predictor prefetches the
experts upcoming layers will need so that copies overlap compute.

Layers, bottom first; a package imports only from layers below its own (tests/test_layers.py checks it):
  io, geometry, hub, _version  <  measure  <  kernels, predictors  <  runtime  <  traces  <  training, sim
  <  reference  <  bench  <  serve  <  the command lines (specmoe.cli, specmoe.generate, every `<package>.cli`, __main__) and this module.
"""

from ._version import __version__

__all__ = ["MoEGeometry", "OffloadConfig", "SpeculativeMoE", "find_moe_layers", "load_offloaded", "__version__"]

# The public API loads on first use (PEP 562), so that `specmoe --help` and the commands that do not need torch
# start without importing torch and transformers.
_LAZY = {"MoEGeometry": ".geometry", "OffloadConfig": ".runtime.config", "SpeculativeMoE": ".runtime.wrapper",
         "find_moe_layers": ".runtime.adapters", "load_offloaded": ".runtime.loading"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'specmoe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

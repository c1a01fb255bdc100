"""specmoe: run Mixture-of-Experts LMs on GPUs too small to hold them.

Experts live in host memory, a device cache keeps the hot ones, and a speculation predictor prefetches the
experts upcoming layers will need so that copies overlap compute.

Layers, bottom first; a package imports only from layers below its own (tests/test_layers.py checks it):
  io, geometry, hub, _version  <  measure  <  kernels, predictors  <  runtime  <  traces  <  training, sim
  <  reference  <  bench  <  the command lines (specmoe.cli, specmoe.generate, every `<package>.cli`, __main__) and this module.
"""

from ._version import __version__
from .geometry import MoEGeometry
from .runtime.adapters import find_moe_layers
from .runtime.config import OffloadConfig
from .runtime.loading import load_offloaded
from .runtime.wrapper import SpeculativeMoE

__all__ = ["MoEGeometry", "OffloadConfig", "SpeculativeMoE", "find_moe_layers", "load_offloaded", "__version__"]

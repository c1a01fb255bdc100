"""Where the runtime computes experts with the fused Triton kernel instead of the model's implementation.

``compute="triton"``: every MoE layer the kernel supports, always (compressed slots too: the kernel dequantizes
in registers; "auto" then takes the kernel wherever Triton runs). ``compute="auto"`` (CUDA): only for the
shapes where the tuned launch configs of this GPU (`specmoe/kernels/configs/<device>.json`) record that the
kernel measured faster than transformers' experts implementation; elsewhere the model's implementation,
and a log line saying so, once per shape.
"""

# Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k, S slots

from __future__ import annotations

import logging

import torch

from .adapters import MoELayer

logger = logging.getLogger(__name__)


class FusedKernelCompute:
    """Per-layer plans and per-call choice for the fused experts kernel.

    Args:
        mode: "triton" or "auto".
        device: the cache's device.
        fallback: what runs instead ("pool" or "gather"), for log messages.
        compressed: the slots hold compressed experts; the kernel reads them as they are, and the fallback
            dequantizes the routed slots into a scratch, so "auto" takes the kernel wherever it runs.
    """

    def __init__(self, mode: str, device: torch.device, fallback: str, compressed: bool = False):
        from .. import kernels  # imports triton: only when the kernel may be used

        self.kernels = kernels
        self.mode = mode
        self.device = device
        self.compressed = compressed
        self.fallback = (f"{fallback} on the routed slots dequantized into a scratch" if compressed else fallback)
        self.activation: dict[int, str] = {}  # MoE layer -> activation, for layers the kernel supports
        self._logged: set[str] = set()
        self.runs_here = kernels.triton_runs_on(device)  # else moe_experts falls back to the torch reference
        if mode == "auto" and not self.runs_here:
            logger.info("compute='auto': Triton cannot run on %s here; using %s", device, fallback)

    def plan(self, layer: MoELayer) -> None:
        activation, reason = self.kernels.kernel_activation(layer.experts)
        if activation is None:
            logger.info("MoE layer %s: the fused kernel does not support it (%s); using the model's experts "
                        "implementation (%s)", layer.name, reason, self.fallback)
        else:
            self.activation[layer.index] = activation

    def wanted(self, layer: MoELayer, ids: torch.Tensor, views: dict[str, torch.Tensor]) -> bool:
        """Whether this call (routed ids [T, k]) runs the kernel."""
        if layer.index not in self.activation:
            return False
        if self.mode == "triton":
            return True
        if not self.runs_here:
            return False
        if self.compressed:  # fewer bytes read than any dequantize-then-compute path
            return True
        gate_up, down = views["gate_up_proj"], views["down_proj"]  # [S, 2I, H], [S, H, I]
        tokens, top_k = ids.shape
        key = self.kernels.shape_key(gate_up.dtype, gate_up.shape[-1], down.shape[-1], top_k)
        if self.kernels.launch_configs(self.device).kernel_faster(key, tokens):
            return True
        if key not in self._logged:
            self._logged.add(key)
            logger.info("compute='auto': no measurement on %s says the fused kernel beats the model's experts "
                        "implementation for %s at %d tokens; using %s", self.device, key, tokens, self.fallback)
        return False

    def __call__(self, layer: MoELayer, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 views: dict[str, torch.Tensor], table: torch.Tensor) -> torch.Tensor:
        """[T, H] routed experts' output for hidden [T, H], ids/weights [T, k], the pool's weights (views, or
        QuantizedStacks when compressed), table [E]."""
        return self.kernels.moe_experts(hidden, ids, weights, views["gate_up_proj"], views["down_proj"], table,
                                        self.activation[layer.index])

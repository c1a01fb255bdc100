"""The kernel benchmark's problem: one MoE layer's routed experts computed from a pool of S slots, as the
runtime does, by the fused kernel and by transformers' experts implementations alike.

Used by ``benchmarks/moe_kernel.py`` (figures) and ``benchmarks/autotune_moe_kernel.py`` (launch configs).
Ours reads through the expert->slot table; transformers' (a real ``MixtralExperts`` module bound to the pool,
``config._experts_implementation`` = grouped_mm / batched_mm / eager) gets expert ids remapped to slots
("pool" compute). Timing is `specmoe.measure.time_fn`: medians of CUDA-event timings after warm-up, the L2
cache flushed before each run (weights come from HBM, as they do when a layer's experts are used once per token).

Compressed slots: implementation "triton-<scheme>" (e.g. "triton-int4-g128") runs the kernel on a second pool
holding the same experts compressed in the runtime's own compressed layout (`ExpertCodec`), dequantizing in
registers.
"""

# Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k, S slots

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.experts_kernel import moe_experts
from ..kernels.launch_config import MoEKernelConfig
from ..runtime.adapters import FusedExperts

IMPLEMENTATIONS = ("triton", "grouped_mm", "batched_mm", "eager")
COMPRESSED_PREFIX = "triton-"  # + a compression scheme: the kernel on compressed slots


def compression_of(implementation: str) -> str | None:
    """"triton-int4-g128" -> "int4-g128"; None for the uncompressed implementations."""
    return implementation[len(COMPRESSED_PREFIX):] if implementation.startswith(COMPRESSED_PREFIX) else None


@dataclass(frozen=True)
class ExpertsShape:
    """One MoE layer's expert geometry (SiLU experts, concatenated gate/up)."""

    name: str
    hidden: int  # H
    intermediate: int  # I
    num_experts: int  # E
    top_k: int  # k

    def __post_init__(self):
        for f in ("hidden", "intermediate", "num_experts", "top_k"):
            if getattr(self, f) < 1:
                raise ValueError(f"ExpertsShape.{f} must be >= 1")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")


# Public models' expert geometry (from their config.json files).
PRESETS = {
    s.name: s
    for s in (
        ExpertsShape("mixtral-8x7b", 4096, 14336, 8, 2),
        ExpertsShape("qwen1.5-moe-a2.7b", 2048, 1408, 60, 4),
        ExpertsShape("olmoe-1b-7b", 2048, 1024, 64, 8),
        ExpertsShape("deepseek-v2-lite", 2048, 1408, 64, 6),
        ExpertsShape("qwen3-30b-a3b", 2048, 768, 128, 8),
        ExpertsShape("tiny", 72, 40, 8, 2),  # smoke tests on CPU
    )
}


class ExpertsProblem:
    """A slot pool with one layer's experts resident in shuffled slots, hidden states and routing.

    Args:
        shape: the layer geometry.
        tokens: T.
        num_slots: S (at least E; the layer's experts take E of them).
        dtype, device: of weights and hidden states.
        seed: for weights (scaled like a trained layer's), routing (uniform top-k) and hidden states.
    """

    def __init__(self, shape: ExpertsShape, tokens: int, num_slots: int, dtype: torch.dtype,
                 device: torch.device | str, seed: int = 0):
        H, I, E, k = shape.hidden, shape.intermediate, shape.num_experts, shape.top_k
        S = max(num_slots, E)
        device = torch.device(device)
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.shape, self.tokens, self.num_slots, self.dtype, self.device = shape, tokens, S, dtype, device
        # one buffer per slot with gate_up then down, like SlotPool (strided over S)
        self.data = torch.empty(S, 3 * I * H, dtype=dtype, device=device)  # [S, 3IH]
        for s in range(S):  # fill slot by slot: no [S, 3IH] float32 temporary
            self.data[s].copy_(torch.randn(3 * I * H, generator=g).mul_(H**-0.5))
        self.gate_up = self.data[:, : 2 * I * H].view(S, 2 * I, H)  # [S, 2I, H]
        self.down = self.data[:, 2 * I * H :].view(S, H, I)  # [S, H, I]
        self.table = torch.randperm(S, generator=g)[:E].to(device)  # [E] expert -> slot
        scores = torch.rand(tokens, E, generator=g)
        self.ids = scores.topk(k, dim=-1).indices.to(device)  # [T, k]
        self.weights = torch.softmax(torch.randn(tokens, k, generator=g), -1).to(device, dtype)  # [T, k]
        self.hidden = torch.randn(tokens, H, generator=g).to(device, dtype)  # [T, H]
        self._modules: dict[str, torch.nn.Module] = {}
        self._compressed: dict[str, tuple] = {}

    @property
    def weight_bytes_touched(self) -> int:
        """Bytes of expert weights the routing needs (each distinct expert once)."""
        n = int(torch.unique(self.ids).numel())
        return n * 3 * self.shape.intermediate * self.shape.hidden * self.dtype.itemsize

    def bytes_touched(self, implementation: str) -> int:
        """Bytes of expert weights `implementation` reads (compressed slots: the compressed bytes)."""
        scheme = compression_of(implementation)
        if scheme is None:
            return self.weight_bytes_touched
        codec = self.compressed_pool(scheme)[0]
        return int(torch.unique(self.ids).numel()) * codec.layout.nbytes

    def compressed_pool(self, scheme: str) -> tuple:
        """(codec, {"gate_up_proj": QuantizedStack, "down_proj": QuantizedStack}): the pool's experts
        compressed into a pool of the runtime's compressed layout (built once per scheme)."""
        if scheme not in self._compressed:
            from ..runtime.adapters import ExpertTensorSpec
            from ..runtime.compression import make_codec
            from ..runtime.store import ExpertLayout

            H, I = self.shape.hidden, self.shape.intermediate
            layout = ExpertLayout((ExpertTensorSpec("gate_up_proj", (2 * I, H), self.dtype),
                                   ExpertTensorSpec("down_proj", (H, I), self.dtype)))
            codec = make_codec(scheme, layout)
            data = torch.empty(self.num_slots, codec.layout.nbytes, dtype=torch.uint8, device=self.device)  # [S, Bc]
            for s in range(self.num_slots):
                codec.layout.pack(data[s], codec.encode({"gate_up_proj": self.gate_up[s], "down_proj": self.down[s]}))
            self._compressed[scheme] = (codec, codec.weights(codec.layout.views(data)), data)
        return self._compressed[scheme][:2]

    def reference(self, implementation: str) -> torch.Tensor:
        """The PyTorch reference of what `implementation` computes (compressed: the dequantized experts)."""
        from ..kernels.reference import experts_reference

        scheme = compression_of(implementation)
        gate_up, down = ((self.gate_up, self.down) if scheme is None else
                         (lambda w: (w["gate_up_proj"], w["down_proj"]))(self.compressed_pool(scheme)[1]))
        return experts_reference(self.hidden, self.ids, self.weights, gate_up, down, self.table, "silu")

    def _module(self, implementation: str) -> torch.nn.Module:
        """transformers' MixtralExperts running `implementation` on the pool (ids are slot ids)."""
        if implementation not in self._modules:
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralExperts

            cfg = MixtralConfig(hidden_size=self.shape.hidden, intermediate_size=self.shape.intermediate,
                                num_local_experts=self.num_slots, num_experts_per_tok=self.shape.top_k,
                                hidden_act="silu")
            cfg._experts_implementation = implementation
            with torch.device("meta"):
                experts = MixtralExperts(cfg)
            layout = FusedExperts()
            layout.remove(experts)
            layout.bind_pool(experts, {"gate_up_proj": self.gate_up, "down_proj": self.down})
            self._modules[implementation] = experts
        return self._modules[implementation]

    def runner(self, implementation: str, config: MoEKernelConfig | None = None) -> Callable[[], torch.Tensor]:
        """A no-argument callable computing the layer's routed experts with `implementation`."""
        if implementation == "triton":
            args = (self.hidden, self.ids, self.weights, self.gate_up, self.down, self.table)
            return lambda: moe_experts(*args, "silu", config)
        if compression_of(implementation) is not None:
            weights = self.compressed_pool(compression_of(implementation))[1]
            args = (self.hidden, self.ids, self.weights, weights["gate_up_proj"], weights["down_proj"], self.table)
            return lambda: moe_experts(*args, "silu", config)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
        module = self._module(implementation)
        table, ids, hidden, weights = self.table, self.ids, self.hidden, self.weights

        def run():
            return module(hidden, table[ids], weights)  # remapping ids is part of the "pool" path's cost

        return run


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())

"""Synthetic experts for timing the runtime's host kernels at any shape and format, without a checkpoint.

One SwiGLU expert (gate_up [2I, H], down [H, I], the layout of Mixtral, Qwen-MoE and DeepSeek experts) in a
`HostStore` of one or more copies (so that timed calls can read weights the caches do not hold, as decode
does), raw or compressed, computed by `HostExperts` exactly as the runtime does it.
"""

# Shape legend: T tokens, H hidden, I expert intermediate

from __future__ import annotations

from collections.abc import Callable

import torch

from ..runtime.adapters import FusedExperts, MoELayer
from ..runtime.compression import make_codec
from ..runtime.host_compute import HostExperts
from ..runtime.store import ExpertLayout, HostStore

COMPRESSION = {"bf16": None, "int8": "int8", "int4": "int4-g128",  # host kernel format -> store compression
               "mxfp4": "mxfp4", "fp8": "fp8-b128", "gptq": "gptq-int4-g128"}  # the publishers' formats


class SyntheticExpert:
    """A one-expert host store of shape (H, I) in `fmt` ("bf16", "int8", "int4"; the publishers' "mxfp4",
    "fp8" (128 blocks), "gptq" (g128, sorted g_idx)) with random weights.

    Attributes:
        layer: a `MoELayer` whose experts module (on the meta device) drives `HostExperts`.
        host: the `HostExperts` computing from `store`.
        nbytes: bytes of the expert in the store (what one host compute reads).
        weights: weights of the expert.
    """

    def __init__(self, fmt: str, hidden: int, inter: int, seed: int = 0, copies: int = 1,
                 threads: int | None = None, activations: str = "fp32"):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        if fmt not in COMPRESSION:
            raise ValueError(f"format must be one of {sorted(COMPRESSION)}, got {fmt!r}")
        config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=copies,
                               num_experts_per_tok=1)
        with torch.device("meta"):
            experts = MixtralExperts(config).to(torch.bfloat16)
        layout = FusedExperts()
        slot_layout = ExpertLayout(layout.tensor_specs(experts))
        layout.remove(experts)
        codec = make_codec(COMPRESSION[fmt], slot_layout)
        self.store = HostStore(codec.layout if codec else slot_layout, 1, copies)
        g = torch.Generator().manual_seed(seed)
        for name, view in self.store.expert((0, 0)).items():  # plausible values, no NaN or denormals
            if name.endswith("_scales"):  # MXFP4 e8m0: 2^-9 .. 2^-5
                view.copy_(torch.randint(118, 123, view.shape, generator=g).to(view.dtype))
            elif name.endswith(".g_idx"):  # GPTQ, desc_act false
                view.copy_(torch.arange(view.shape[0], dtype=torch.int32) // codec.fmt.block)
            elif view.dtype == torch.float8_e4m3fn:  # normal codes with |x| < 1, both signs
                view.view(torch.uint8).copy_(torch.randint(8, 56, view.shape, generator=g, dtype=torch.uint8) |
                                             (torch.randint(0, 2, view.shape, generator=g, dtype=torch.uint8) << 7))
            elif view.dtype.is_floating_point:
                view.copy_(torch.rand(view.shape, generator=g) * 0.02 + (0.001 if ".q" in name else -0.01))
            else:
                view.copy_(torch.randint(-100, 100, view.shape, generator=g).to(view.dtype))
        for e in range(1, copies):  # copies of expert 0 in their own buffers
            self.store[(0, e)].copy_(self.store[(0, 0)])
        self.copies = copies
        self.layer = MoELayer(0, f"synthetic {fmt} H={hidden} I={inter}", experts, None, layout)
        self.host = HostExperts(self.store, codec, threads, activations)  # activations: host_activations
        self.nbytes = self.store.layout.nbytes
        self.weights = 3 * hidden * inter
        self.hidden_size = hidden

    @property
    def kernel(self) -> str:
        """Which implementation computes it (`HostExperts.kernel_name`)."""
        return self.host.kernel_name(self.layer)

    def runner(self, tokens: int) -> Callable[[], torch.Tensor]:
        """A call computing the expert for `tokens` tokens on this thread, as the host worker does; each call
        takes the next copy (round robin)."""
        hidden = torch.randn(tokens, self.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        weights = torch.ones(tokens, 1)
        ids = [torch.full((tokens, 1), e, dtype=torch.long) for e in range(self.copies)]
        turn = iter(range(2**62))

        def call():
            e = next(turn) % self.copies
            return self.host.compute(self.layer, hidden, ids[e], weights, [e])
        return call

    def close(self) -> None:
        self.host.close()


def host_expert_timer(fmt: str, hidden: int, inter: int, tokens: int = 1) -> Callable[[], torch.Tensor]:
    """A callable running one synthetic expert of shape (H, I) in `fmt` for `tokens` tokens."""
    return SyntheticExpert(fmt, hidden, inter).runner(tokens)

"""Hidden-state predictor: a small MLP per MoE layer from the hidden state entering layer l to multi-hot
scores over the experts of layers l+1..l+D, trained with BCE.

With `router_init` it adds a learned pre-gate: for each (source layer l, target l+d) a copy of target
layer's router (weight [E, H], bias [E]) applied to the hidden state, and the MLP's output layer starts at
zero. So before training it scores exactly like `PreGatePredictor` (with wrap), and training moves it from
there; early stopping on validation keeps it no worse than where it started.
"""

# Shape legend: B tokens, E experts, H hidden, L MoE layers, D lookahead, M MLP width

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import MoEGeometry
from .base import register_predictor
from .trainable import TrainablePredictor


class HiddenNet(nn.Module):
    """Per source layer l: logits = gelu(LN(h) @ w1 + b1) @ w2 + b2 (+ h @ gate_w^T, the learned pre-gate)."""

    def __init__(self, L: int, E: int, H: int, D: int, dim: int, gate: bool):
        super().__init__()
        self.E, self.D = E, D
        self.w1 = nn.Parameter(torch.randn(L, H, dim) * H**-0.5)
        self.b1 = nn.Parameter(torch.zeros(L, dim))
        self.w2 = nn.Parameter(torch.zeros(L, dim, D * E) if gate else torch.randn(L, dim, D * E) * dim**-0.5)
        self.b2 = nn.Parameter(torch.zeros(L, D * E))  # holds the routers' biases when gated
        self.gate_w = nn.Parameter(torch.zeros(L, D * E, H)) if gate else None  # a pre-gate per (source, target)

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] entering MoE layer `layer` -> logits [B, D, E] (few ops: it runs at every layer)."""
        x = F.layer_norm(hidden, hidden.shape[-1:])
        z = torch.addmm(self.b2[layer], F.gelu(torch.addmm(self.b1[layer], x, self.w1[layer])), self.w2[layer])
        if self.gate_w is not None:
            z = torch.addmm(z, hidden, self.gate_w[layer].t())  # [B, D*E]
        return z.view(-1, self.D, self.E)


@register_predictor("hidden")
class HiddenStatePredictor(TrainablePredictor):
    """MLP from the hidden state entering layer l to scores for layers l+1..l+D (one MLP per source layer).

    Args:
        geometry: the model's routing geometry.
        lookahead: D, target layers l+1..l+D.
        wrap: predict the next token's first layers from the last layers.
        dim: MLP width.
        router_init: add a learned pre-gate started from the targets' routers (call `init_from_routers`).
    """

    def __init__(self, geometry: MoEGeometry, lookahead: int = 2, wrap: bool = True, dim: int = 256,
                 router_init: bool = True):
        super().__init__(geometry, lookahead, wrap)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim, self.router_init = dim, bool(router_init)
        g = geometry
        self.module = HiddenNet(g.num_layers, g.num_experts, g.hidden_size, lookahead, dim, self.router_init)

    @torch.no_grad()
    def init_from_routers(self, routers: Sequence) -> "HiddenStatePredictor":
        """Copy router t (weight [E, H], bias) into the pre-gate of every (l, t = l + d), t taken modulo L.

        Raises:
            ValueError: built without router_init, or routers that do not match the geometry.
        """
        L, E, H = self.geometry.num_layers, self.geometry.num_experts, self.geometry.hidden_size
        if not self.router_init:
            raise ValueError("this HiddenStatePredictor was built with router_init=False")
        if len(routers) != L:
            raise ValueError(f"need the model's {L} routers, got {len(routers)}")
        net = self.module
        for layer in range(L):
            for d in range(1, self.lookahead + 1):
                r = routers[(layer + d) % L]
                if tuple(r.weight.shape) != (E, H):
                    raise ValueError(f"router {(layer + d) % L} has weight {tuple(r.weight.shape)}, expected [{E}, {H}]")
                rows = slice((d - 1) * E, d * E)
                net.gate_w[layer, rows] = r.weight.float().to(net.gate_w.device)
                net.b2[layer, rows] = 0.0 if r.bias is None else r.bias.float().to(net.b2.device)
        return self

    def forward(self, layer, hidden):
        return self.module(layer, hidden)

    def batch_inputs(self, trace, layer, tokens):
        if layer not in trace.hidden:
            raise ValueError(f"the trace has no hidden states at MoE layer {layer}; collect with --hidden-layers all")
        return {"hidden": trace.hidden[layer][tokens].float()}  # [B, H]

    def runtime_inputs(self, layer, hidden, history):
        return {"hidden": hidden.float()}  # [T, H]

    def config(self):
        return {"lookahead": self.lookahead, "wrap": self.wrap, "dim": self.dim, "router_init": self.router_init}

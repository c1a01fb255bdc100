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


TEMPERATURE_LR = 100.0  # the gate temperature (one number per source/target pair) learns this much faster


class HiddenNet(nn.Module):
    """Per source layer l: logits = relu(LN(h) @ w1 + b1) @ w2 + b2 (+ exp(s) * h @ gate_w^T, the learned
    pre-gate with a learned temperature)."""

    def __init__(self, L: int, E: int, H: int, D: int, dim: int, gate: bool):
        super().__init__()
        self.E, self.D = E, D
        self.w1 = nn.Parameter(torch.randn(L, H, dim) * H**-0.5)
        self.b1 = nn.Parameter(torch.zeros(L, dim))
        self.w2 = nn.Parameter(torch.zeros(L, dim, D * E) if gate else torch.randn(L, dim, D * E) * dim**-0.5)
        self.b2 = nn.Parameter(torch.zeros(L, D * E))  # holds the routers' biases when gated
        self.gate_w = nn.Parameter(torch.zeros(L, D * E, H)) if gate else None  # a pre-gate per (source, target)
        # log of a temperature per (source, target): router logits are often tiny next to what BCE wants
        self.gate_log_scale = nn.Parameter(torch.zeros(L, D, 1)) if gate else None
        self.register_buffer("gate_ready", torch.tensor(not gate))  # the pre-gate holds router weights

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] entering MoE layer `layer` -> logits [B, D, E] (few ops: it runs at every layer)."""
        x = F.layer_norm(hidden, hidden.shape[-1:])
        z = torch.addmm(self.b2[layer], F.relu(torch.addmm(self.b1[layer], x, self.w1[layer])), self.w2[layer])
        z = z.view(-1, self.D, self.E)
        if self.gate_w is not None:
            gate = (hidden @ self.gate_w[layer].t()).view(-1, self.D, self.E)  # [B, D, E]
            z = torch.addcmul(z, gate, self.gate_log_scale[layer].exp())
        return z

    @torch.no_grad()
    def fused(self, layer: int) -> tuple[torch.Tensor, ...]:
        """Layer `layer`'s weights for `run_fused`: the temperature folded into the gate, transposed once."""
        b2, w2 = self.b2[layer], self.w2[layer]
        if self.gate_w is not None:  # [dim + H, D*E]: one matmul for the MLP's output and the pre-gate
            scale = self.gate_log_scale[layer].exp().expand(self.D, self.E).reshape(-1, 1)  # [D*E, 1]
            w2 = torch.cat([w2, (self.gate_w[layer] * scale).t()])
        return self.w1[layer], self.b1[layer], w2.contiguous(), b2

    def run_fused(self, weights: tuple[torch.Tensor, ...], hidden: torch.Tensor) -> torch.Tensor:
        """`forward` with `fused` weights: hidden [B, H] -> logits [B, D, E]."""
        w1, b1, w2, b2 = weights
        a = F.relu(torch.addmm(b1, F.layer_norm(hidden, hidden.shape[-1:]), w1))  # [B, dim]
        if w2.shape[0] != a.shape[1]:
            a = torch.cat([a, hidden], dim=1)  # [B, dim + H]
        return torch.addmm(b2, a, w2).view(-1, self.D, self.E)


@register_predictor("hidden")
class HiddenStatePredictor(TrainablePredictor):
    """MLP from the hidden state entering layer l to scores for layers l+1..l+D (one MLP per source layer).

    Args:
        geometry: the model's routing geometry.
        lookahead: D, target layers l+1..l+D.
        wrap: predict the next token's first layers from the last layers.
        dim: MLP width.
        router_init: add a learned pre-gate started from the targets' routers (`init_from_routers`, or
            `bind` with the model's routers when it has not been initialised yet).
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
        net.gate_ready.fill_(True)
        self.reset()
        return self

    def bind(self, geometry, routers=()):
        """Attach to a model; an untrained router-initialised predictor takes its pre-gate from `routers`."""
        super().bind(geometry, routers)
        if self.router_init and not bool(self.module.gate_ready) and routers and routers[0] is not None:
            self.init_from_routers(routers)

    def prepare(self, layer):
        return self.module.fused(layer)

    def runtime_logits(self, layer, hidden, history):
        return self.module.run_fused(self.prepared(layer), hidden.float())  # [T, D, E]

    def param_groups(self, lr):
        """The pre-gate learns at a rate scaled to its weights' size: Adam moves every weight by about `lr` per
        step whatever its scale, which would wipe out router weights much smaller than the MLP's."""
        net = self.module
        if net.gate_w is None:
            return super().param_groups(lr)
        scale = min(1.0, net.gate_w.detach().pow(2).mean().sqrt().item() / self.geometry.hidden_size**-0.5)
        special = (net.gate_w, net.gate_log_scale)
        rest = [p for p in net.parameters() if all(p is not q for q in special)]
        return [{"params": rest, "lr": lr}, {"params": [net.gate_w], "lr": lr * max(scale, 1e-3)},
                {"params": [net.gate_log_scale], "lr": lr * TEMPERATURE_LR, "weight_decay": 0.0}]

    def train_logits(self, trace, layers, tokens):
        missing = sorted(set(layers.unique().tolist()) - set(trace.hidden))
        if missing:
            raise ValueError(f"the trace has no hidden states at MoE layers {missing}; collect with --hidden-layers all")
        out = torch.zeros(tokens.shape[0], self.lookahead, self.geometry.num_experts, device=self.device)
        for layer in layers.unique().tolist():  # one small MLP per source layer
            rows = torch.nonzero(layers == layer).flatten()
            out[rows.to(self.device)] = self.module(layer, trace.hidden[layer][tokens[rows]].float().to(self.device))
        return out  # [B, D, E]

    def config(self):
        return {"lookahead": self.lookahead, "wrap": self.wrap, "dim": self.dim, "router_init": self.router_init}

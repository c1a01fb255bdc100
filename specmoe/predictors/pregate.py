"""Training-free pre-gate: the router of layer l+d applied to the hidden state entering layer l."""

# Shape legend: T tokens, E experts, H hidden

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..geometry import MoEGeometry
from .base import Predictor, register_predictor


@register_predictor("pregate")
class PreGatePredictor(Predictor):
    """Score layer l+d's experts with layer l+d's own router on the hidden state entering layer l.

    Args:
        lookahead: d, how many MoE layers ahead to score (1 = the next layer).
        wrap: also score the next token's first layers from the last layers (their routers applied to
            the current hidden state; usually a weak guess, so off by default).
    """

    def __init__(self, lookahead: int = 1, wrap: bool = False, geometry: MoEGeometry | None = None):
        super().__init__(lookahead, geometry)
        self.wrap = wrap
        self.routers: Sequence = ()

    def bind(self, geometry, routers=()):
        if len(routers) != geometry.num_layers:
            raise ValueError(f"PreGatePredictor needs the model's {geometry.num_layers} routers, got {len(routers)}")
        super().bind(geometry, routers)
        self.routers = routers

    @torch.no_grad()
    def predict(self, layer: int, hidden: torch.Tensor, history: torch.Tensor) -> dict[int, torch.Tensor]:
        L = self.geometry.num_layers
        return {t: self.routers[t % L].logits(hidden) for t in self.targets(layer, wrap=self.wrap)}  # [T, E] each

    def config(self):
        return {"lookahead": self.lookahead, "wrap": self.wrap}

"""Bounds: an oracle that replays recorded routing (the ceiling) and random guesses (the floor)."""

# Shape legend: T tokens, E experts, L MoE layers, k top-k, P forward passes

from __future__ import annotations

import torch

from ..geometry import MoEGeometry
from .base import Predictor, register_predictor


@register_predictor("oracle")
class OraclePredictor(Predictor):
    """Replays given routing: the experts that will be routed score 1, the rest 0.

    Args:
        routing: a routing table with forward passes (`specmoe.traces.Routing`, e.g. `capture.routing()`),
            or one tensor per forward pass, [T, L, k] expert ids (-1 where a layer did not run), in the
            order the passes will run again (as `specmoe.traces.capture_routing` records them).
        lookahead: how many MoE layers ahead to reveal; targets past the last layer read the next pass.

    Which pass is predicted comes from `start_pass` (the runtime calls it at each forward pass; 0 after `reset`).
    """

    def __init__(self, routing, lookahead: int = 1, geometry: MoEGeometry | None = None):
        super().__init__(lookahead, geometry)
        if hasattr(routing, "pass_offsets"):  # a Routing (traces sits above predictors: duck-typed)
            routing = routing.passes()
        self.routing = [r.long() for r in routing]
        self._pass = 0  # the forward pass being predicted (`start_pass`), 0 after a reset
        for i, r in enumerate(self.routing):
            if r.dim() != 3:
                raise ValueError(f"routing[{i}] must be [T, L, k], got shape {tuple(r.shape)}")

    def bind(self, geometry, routers=()):
        super().bind(geometry, routers)
        for i, r in enumerate(self.routing):
            if r.shape[1:] != (geometry.num_layers, geometry.top_k):
                raise ValueError(f"routing[{i}] has shape {tuple(r.shape)}, expected [T, {geometry.num_layers}, "
                                 f"{geometry.top_k}] for this model")

    def reset(self):
        self._pass = 0

    def start_pass(self, index):
        self._pass = index

    @torch.no_grad()
    def predict(self, layer, hidden, history):
        L, E = self.geometry.num_layers, self.geometry.num_experts
        p = self._pass
        out = {}
        T = hidden.shape[0]
        for t in self.targets(layer):
            src, tl = (p, t) if t < L else (p + 1, t - L)
            if src >= len(self.routing):
                continue
            if self.routing[src].device != hidden.device:  # once: no copy per call on the hot path
                self.routing = [r.to(hidden.device) for r in self.routing]
            ids = self.routing[src][:, tl]  # [T', k]; T' != T across prefill -> decode
            rows = (torch.arange(ids.shape[0], device=hidden.device) % T)[:, None].expand_as(ids)  # [T', k]
            scores = torch.zeros(T, E + 1, device=hidden.device)
            scores[rows, torch.where(ids < 0, E, ids)] = 1.0
            out[t] = scores[:, :E]  # [T, E]
        return out

    def config(self):
        return {"lookahead": self.lookahead}

    def state_tensors(self):
        return {f"pass.{i}": r for i, r in enumerate(self.routing)}

    @classmethod
    def from_config(cls, config, tensors, geometry):
        routing = [tensors[f"pass.{i}"] for i in range(len(tensors))]
        return cls(routing, geometry=geometry, **config)


@register_predictor("random")
class RandomPredictor(Predictor):
    """Uniformly random scores from a seeded generator: the floor every predictor must beat."""

    def __init__(self, seed: int = 0, lookahead: int = 1, geometry: MoEGeometry | None = None):
        super().__init__(lookahead, geometry)
        self.seed = seed
        self.reset()

    def reset(self):
        self._gen: torch.Generator | None = None  # made on the device of the first call, then reused

    @torch.no_grad()
    def predict(self, layer, hidden, history):
        if self._gen is None or self._gen.device != hidden.device:
            self._gen = torch.Generator(device=hidden.device).manual_seed(self.seed)
        E = self.geometry.num_experts
        return {t: torch.rand(hidden.shape[0], E, generator=self._gen, device=hidden.device)
                for t in self.targets(layer)}

    def config(self):
        return {"seed": self.seed, "lookahead": self.lookahead}

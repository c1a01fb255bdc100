"""Base of predictors backed by a torch module that scores layers l+1..l+D in one call.

One module serves training (batches of (token, source layer) rows drawn from traces, `train_logits`) and
the runtime (`predict`, called by SpeculativeMoE once per MoE layer for all tokens of a pass,
`runtime_logits`), which may use per-layer tensors prepared once from the weights.
"""

# Shape legend: B batch tokens, T tokens, E experts, H hidden, L MoE layers, k top-k, D lookahead, C context

from __future__ import annotations

import torch
from torch import nn

from ..geometry import MoEGeometry
from .base import Predictor


class TrainablePredictor(Predictor):
    """A predictor with a `module` whose output is logits [B, D, E] for target layers layer+1..layer+D.

    Targets past the last layer (the next token's first layers) are scored too and returned by `predict`
    when `wrap` is True.

    Subclasses set `self.module` in __init__ and implement `train_logits` and `runtime_logits` (and, for speed,
    `prepare`: per-layer tensors computed once from the weights; `reset()` drops them).
    """

    def __init__(self, geometry: MoEGeometry, lookahead: int = 2, wrap: bool = True):
        if geometry is None:
            raise ValueError(f"{type(self).__name__} needs the model's geometry (MoEGeometry) to build its network")
        if lookahead > geometry.num_layers:
            raise ValueError(f"lookahead {lookahead} exceeds the {geometry.num_layers} MoE layers; use at most that")
        super().__init__(lookahead, geometry)
        self.wrap = bool(wrap)
        self.module: nn.Module
        self._prepared: dict = {}

    # --- what subclasses provide ------------------------------------------------------------------
    def train_logits(self, trace, layers: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Differentiable logits [B, D, E] for rows (tokens[i] of a RoutingTrace, source layer layers[i]),
        on the module's device."""
        raise NotImplementedError

    def runtime_logits(self, layer: int, hidden: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Logits [T, D, E] from the runtime's hidden [T, H] and history [T, layer+1, k] (no grad, eval mode);
        may use `self.prepared(layer)`."""
        raise NotImplementedError

    def train_targets(self, trace, layers: torch.Tensor, tokens: torch.Tensor):
        """What training and validation score the logits against: (ids [B, D, k], -1 = none; valid [B, D]) for the
        rows of `train_logits`; the routed experts of layers l+1..l+D (`RoutingTrace.targets`) unless a subclass
        trains on fewer."""
        return trace.targets(layers, tokens, self.lookahead, self.wrap)

    def param_groups(self, lr: float) -> list[dict]:
        """AdamW parameter groups (one group at `lr` unless a subclass scales some parameters' rate)."""
        return [{"params": list(self.module.parameters()), "lr": lr}]

    def prepare(self, layer: int):
        """Tensors for `runtime_logits` at `layer` that depend on the weights only (fused, transposed...)."""
        return None

    # --- the runtime protocol ----------------------------------------------------------------------
    def prepared(self, layer: int):
        """`prepare(layer)`, computed once until the weights may have changed (reset, training, a move)."""
        out = self._prepared.get(layer)
        if out is None:
            out = self._prepared[layer] = self.prepare(layer)
        return out

    def reset(self) -> None:
        self._prepared = {}

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def predict(self, layer: int, hidden: torch.Tensor, history: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.module.training:  # (the weights may have changed: their tensors are made again, the state kept:
            self.module.eval()  # a stateful predictor first called after the runtime `observe`d it keeps that)
            self._prepared = {}
        if self.device != hidden.device:
            self.module.to(hidden.device)
            self._prepared = {}
        logits = self.runtime_logits(layer, hidden, history)  # [T, D, E]
        return {t: logits[:, t - layer - 1] for t in self.targets(layer, wrap=self.wrap)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    # --- persistence -------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    @classmethod
    def from_config(cls, config: dict, tensors: dict[str, torch.Tensor], geometry: MoEGeometry | None):
        predictor = cls(geometry=geometry, **config)
        try:
            predictor.module.load_state_dict(tensors)
        except RuntimeError as err:
            raise ValueError(f"{cls.__name__}: saved weights do not fit its config ({str(err).splitlines()[0]})") \
                from None
        predictor.module.eval()
        return predictor

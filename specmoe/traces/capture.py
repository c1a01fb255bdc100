"""Record the routing a model actually does: per forward pass, per token, per MoE layer, the top-k ids.

Works on plain and wrapped models alike (it hooks the experts modules' calls, which both go through). A pass
starts where the model's one pass-start signal says (`runtime.hooks.PassMarker`: a forward pre-hook on the
top-level model, shared with the wrapper), never guessed from layer order or token counts.
"""

# Shape legend: T tokens, L MoE layers, k top-k, H hidden

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..runtime.adapters import ModelMoE, find_moe_layers
from ..runtime.hooks import PassMarker
from .routing import Routing


RoutedPass = Routing  # one forward pass: a Routing with one pass (ids/weights [T, L, k], hidden {layer: [T, H]})


class capture_routing:
    """Context manager recording every MoE layer call of `model` into `self.passes`.

    Args:
        model: the model (or its SpeculativeMoE wrapper's model).
        hidden_layers: MoE layers whose entering hidden state [T, H] is kept too (fp16, on the CPU).

    Example:
        with capture_routing(model) as cap:
            model.generate(**inputs, max_new_tokens=8)
        oracle = OraclePredictor(cap.routing())
    """

    def __init__(self, model: nn.Module, hidden_layers: Sequence[int] = (), moe: ModelMoE | None = None):
        wrapper = getattr(model, "_specmoe_wrapper", None)  # a wrapped model's experts left the module
        self.model = wrapper.model if wrapper is not None else model
        self.moe = moe or (wrapper.moe if wrapper is not None else find_moe_layers(model))
        self.hidden_layers = set(hidden_layers)
        self.passes: list[Routing] = []  # one single-pass Routing per forward call
        self._handles = []
        self._marker: PassMarker | None = None
        self._new_pass = True  # the next layer call starts a pass

    def routing(self, calls: list[dict] | None = None) -> Routing:
        """Every pass recorded so far as one Routing (passes in order, weights and common hidden layers kept)."""
        return Routing.from_passes(self.passes, calls, num_experts=self.moe.geometry.num_experts)

    def _start_pass(self, index: int) -> None:
        self._new_pass = True

    def _hook(self, index: int):
        geo = self.moe.geometry
        layer = self.moe.layers[index]

        def hook(module, args, kwargs):
            hidden, ids, weights = layer.layout.routing(module, args, kwargs, geo.top_k)
            T = hidden.shape[0]
            if self._new_pass:
                self._new_pass = False
                self.passes.append(Routing(  # -1 / 0 where a layer did not run
                    torch.full((T, geo.num_layers, geo.top_k), -1, dtype=torch.long), torch.tensor([0, T]),
                    weights=torch.zeros(T, geo.num_layers, geo.top_k), num_experts=geo.num_experts,
                ))
            cur = self.passes[-1]
            cur.ids[:, index] = ids.reshape(T, -1).long().cpu()
            if weights is not None and weights.numel() == T * geo.top_k:
                cur.weights[:, index] = weights.reshape(T, -1).float().cpu()
            if index in self.hidden_layers:
                cur.hidden[index] = hidden.reshape(T, -1).detach().to("cpu", torch.float16)

        return hook

    def __enter__(self) -> "capture_routing":
        self._marker = PassMarker.attach(self.model, self._start_pass)
        for layer in self.moe.layers:
            self._handles.append(layer.experts.register_forward_pre_hook(self._hook(layer.index), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._marker is not None:
            self._marker.detach(self.model, self._start_pass)
            self._marker = None

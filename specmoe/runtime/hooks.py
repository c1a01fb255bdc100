"""Install and restore: what the wrapper attaches to a model, as hook objects that put back exactly what was there.

In the spirit of accelerate's `ModelHook` / `add_hook_to_module` / `remove_hook_from_module`:

- `ExpertsHook`, one per MoE layer: the experts module's calls go to the runtime (for ModuleList layouts, each
  expert also gets a pre/post forward hook that binds it to its slot). Where accelerate has installed a hook on
  the experts module, its `_old_forward` (what the hook calls) is replaced instead of `forward`, so the hook's
  pre/post-forward keep running; `remove()` restores the instance's attributes exactly.
- `PassMarker`: the one signal that a forward pass starts (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm


from .adapters import MoELayer
from .store import HostStore

class _Missing:
    """An attribute that was not set on the instance: one object, also in copies (`copy.deepcopy` of a wrapped
    model keeps `old is _MISSING` true, so the copy's `remove()` pops the attribute instead of setting it)."""

    def __repr__(self) -> str:
        return "_MISSING"

    def __reduce__(self):
        return "_MISSING"  # copy / deepcopy return the module-level object itself


_MISSING = _Missing()


class _Redirect:
    """The experts module's replacement forward: ``forward(layer, args, kwargs)``. An object, not a lambda, so
    that `copy.deepcopy` of a wrapped model copies it with the model (its bound method and layer are copied
    too, and the copy runs its own runtime, not the original's)."""

    def __init__(self, forward: Callable, layer: MoELayer):
        self.forward, self.layer = forward, layer

    def __call__(self, *args, **kwargs):
        return self.forward(self.layer, args, kwargs)


class _ExpertHook:
    """Expert e's forward pre-hook (which=0) or hook (which=1): ``expert_hooks(layer, e)[which]``, made at the
    first call and again in a copy (closures are not copied by `copy.deepcopy`; this object and its bound
    `expert_hooks` are)."""

    def __init__(self, expert_hooks: Callable, layer: MoELayer, e: int, which: int):
        self.expert_hooks, self.layer, self.e, self.which = expert_hooks, layer, e, which
        self._fn = None

    def __getstate__(self):
        return {**self.__dict__, "_fn": None}

    def __call__(self, *args):
        if self._fn is None:
            self._fn = self.expert_hooks(self.layer, self.e)[self.which]
        return self._fn(*args)


class ExpertsHook:
    """Route `layer.experts`' calls to `forward(layer, args, kwargs)` until `remove()`.

    Args:
        layer: the MoE layer.
        forward: what runs instead of the experts module's forward.
        expert_hooks: for ModuleList layouts, ``expert_hooks(layer, e) -> (pre, post)``: forward pre/post hooks
            registered on expert e.
        wrap: what the redirect is installed as, ``wrap(redirect)``: compiled decode's call of the hot path
            (`compiled.experts_wrap`: an opaque custom op in the graph, or a graph break), never compiled itself.
    """

    def __init__(self, layer: MoELayer, forward: Callable, expert_hooks: Callable | None = None,
                 wrap: Callable | None = None):
        module = self.module = layer.experts
        self.attr = "_old_forward" if getattr(module, "_hf_hook", None) is not None and \
            "_old_forward" in module.__dict__ else "forward"
        self.old = module.__dict__.get(self.attr, _MISSING)
        redirect = self.redirect = _Redirect(forward, layer)
        setattr(module, self.attr, wrap(redirect) if wrap is not None else redirect)
        self.handles = []
        if expert_hooks is not None:
            for e, expert in enumerate(layer.layout.experts_list(module)):
                self.handles.append(expert.register_forward_pre_hook(_ExpertHook(expert_hooks, layer, e, 0)))
                self.handles.append(expert.register_forward_hook(_ExpertHook(expert_hooks, layer, e, 1)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.old is _MISSING:
            self.module.__dict__.pop(self.attr, None)
        else:
            setattr(self.module, self.attr, self.old)


def new_store(moe, layout, codec, expert_source):
    """The host store of the experts: built by `expert_source` (streamed from a checkpoint), else empty."""
    if expert_source is not None:
        return expert_source.build_store(moe, layout, codec)
    return HostStore(codec.layout if codec else layout, moe.geometry.num_layers, moe.geometry.num_experts)


def offload_experts(moe, store, codec, streamed: bool, saved: list[dict]) -> None:
    """Move every layer's experts into `store` (compressed by `codec` if given) and out of their modules,
    appending what `layout.remove` returns to `saved` as it goes (so a failure part way can be undone).
    `streamed`: the store is already filled, the modules hold meta tensors."""
    big = store.nbytes > 2**30  # a progress bar only where it takes a while
    for layer in tqdm(moe.layers, desc="experts -> host store", unit="layer", disable=streamed or not big,
                      leave=False):
        for e in range(moe.geometry.num_experts if not streamed else 0):
            tensors = layer.layout.expert_tensors(layer.experts, e)
            store.write((layer.index, e), codec.encode(tensors) if codec else tensors)
        saved.append(layer.layout.remove(layer.experts))  # frees the module's expert tensors


def restore_experts(layers, saved: list[dict], store, codec, devices: list[torch.device]) -> None:
    """Give each layer's experts module back its tensors (what `layout.remove` saved), filled from the host store
    (dequantized when compressed) on the device they came from."""
    for layer, kept in zip(layers, saved):
        data = {}
        host = codec.decode_layer(store, layer.index) if codec is not None else store.layer_tensors(layer.index)
        for name, view in host.items():  # [E, *shape]: decompressed copies, or strided views of the store
            data[name] = torch.empty(view.shape, dtype=view.dtype, device=devices[layer.index])
            data[name].copy_(view)
        layer.layout.restore(layer.experts, kept, data)


class PassMarker:
    """The one signal that a forward pass starts: a forward pre-hook on the model's top-level module.

    Encoder-decoder models also get it on their encoder, which `generate` runs alone before the decoding passes
    (that run is a pass of its own, as capture records it); an encoder run inside the model's own forward is
    part of that pass: calls nest, and only the outermost starts a pass. `index` counts the passes since the
    marker was attached (-1: none yet) and never goes back. Listeners get the index of each pass as it starts.

    One marker per model, shared by its users (the wrapper, `traces.capture_routing`): `attach` returns the
    model's marker, making it at the first call; `detach` removes its hooks after the last user.
    """

    def __init__(self, model: nn.Module):
        self.index = -1
        self.listeners: list[Callable[[int], None]] = []
        self._depth = 0
        self._users = 0
        entries = [model]
        encoder = model.get_encoder() if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else None
        if encoder is not None and encoder is not model:
            entries.append(encoder)
        self._handles = []
        for module in entries:
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))

    def _pre(self, module, args):
        if self._depth == 0:
            self.index += 1
            for listener in self.listeners:
                listener(self.index)
        self._depth += 1

    def _post(self, module, args, output):
        self._depth = max(0, self._depth - 1)

    @classmethod
    def attach(cls, model: nn.Module, listener: Callable[[int], None]) -> "PassMarker":
        marker = model.__dict__.get("_specmoe_passes")
        if marker is None:
            marker = cls(model)
            model.__dict__["_specmoe_passes"] = marker
        marker._users += 1
        marker.listeners.append(listener)
        return marker

    def detach(self, model: nn.Module, listener: Callable[[int], None]) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)
        self._users -= 1
        if self._users <= 0:
            for h in self._handles:
                h.remove()
            self._handles = []
            model.__dict__.pop("_specmoe_passes", None)

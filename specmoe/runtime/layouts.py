"""The two experts layouts of transformers 5.x MoE models: how an experts module stores its experts and is called.

* `FusedExperts`: an experts module decorated with ``use_experts_implementation`` holding 3-D parameters
  (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, optional biases, transposed or not), called as
  ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.
* `ModuleListExperts`: an ``nn.ModuleList``/``nn.ModuleDict`` of identical per-expert MLPs, next to a router.

A layout knows how to read one expert's tensors, take them out of the module, give them back, and read the
routing from an experts call. `adapters.find_moe_layers` finds which layout each MoE layer has.
"""

# Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k, S cache slots

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertTensorSpec:
    """One tensor of one expert: its path inside the expert, shape and dtype."""

    name: str  # "gate_up_proj" (fused) or "wi.weight" (modulelist)
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


class ExpertsLayout:
    """How one family of experts modules stores and is called with its experts (see module docstring)."""

    name = "base"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    def num_experts(self, experts: nn.Module) -> int:
        raise NotImplementedError

    def tensor_specs(self, experts: nn.Module) -> tuple[ExpertTensorSpec, ...]:
        raise NotImplementedError

    def expert_tensors(self, experts: nn.Module, e: int) -> dict[str, torch.Tensor]:
        """Expert e's tensors, by spec name (views into the module's parameters)."""
        raise NotImplementedError

    def remove(self, experts: nn.Module) -> dict[str, Any]:
        """Take the expert parameters out of the module; returns what `restore` needs besides the data."""
        raise NotImplementedError

    def restore(self, experts: nn.Module, saved: dict[str, Any], data: dict[str, torch.Tensor]) -> None:
        """Put parameters back: data maps spec name -> [E, *shape] on the original device."""
        raise NotImplementedError

    def routing(self, experts: nn.Module, args: tuple, kwargs: dict, top_k: int):
        """From an experts call, return (hidden [T, H], ids [T, k] long with -1 for no expert, weights or None)."""
        raise NotImplementedError


class FusedExperts(ExpertsLayout):
    """transformers' `use_experts_implementation` experts: 3-D parameters with the expert on dim 0."""

    name = "fused"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        params = dict(module.named_parameters(recurse=False))
        has_up = "gate_up_proj" in params or "up_proj" in params
        return (
            hasattr(type(module), "_apply_gate")
            and has_up
            and "down_proj" in params
            and all(p.dim() >= 2 for p in params.values())
        )

    def _param_names(self, experts: nn.Module) -> list[str]:
        e = self.num_experts(experts)
        return [n for n, p in experts.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == e]

    def num_experts(self, experts: nn.Module) -> int:
        return int(experts.down_proj.shape[0])

    def tensor_specs(self, experts):
        return tuple(
            ExpertTensorSpec(n, tuple(p.shape[1:]), p.dtype)
            for n, p in experts.named_parameters(recurse=False)
            if n in self._param_names(experts)
        )

    def expert_tensors(self, experts, e):
        return {n: getattr(experts, n)[e] for n in self._param_names(experts)}

    def remove(self, experts):
        names = self._param_names(experts)
        saved = {"requires_grad": {n: experts._parameters[n].requires_grad for n in names},
                 "num_experts": experts.__dict__.get("num_experts")}
        for n in names:
            del experts._parameters[n]
        return saved

    def restore(self, experts, saved, data):
        for n, rg in saved["requires_grad"].items():
            experts.__dict__.pop(n, None)
            experts.register_parameter(n, nn.Parameter(data[n], requires_grad=rg))
        if saved["num_experts"] is not None:
            experts.num_experts = saved["num_experts"]

    def bind_pool(self, experts: nn.Module, views: dict[str, torch.Tensor]) -> None:
        """Make the module compute on the slot pool: its tensors become [S, ...] views, num_experts S."""
        for n, v in views.items():
            experts.__dict__[n] = v
        experts.num_experts = next(iter(views.values())).shape[0]

    def routing(self, experts, args, kwargs, top_k):
        bound = _bind_call(experts, args, kwargs)
        hidden, ids, weights = bound[0], bound[1], bound[2]
        return hidden, ids, weights

    def replace_call(self, args: tuple, kwargs: dict, experts: nn.Module, ids: torch.Tensor, weights,
                     hidden: torch.Tensor | None = None):
        """Arguments for the original forward with ids/weights (and hidden, if given) replaced (same positions
        or names)."""
        if not kwargs and len(args) == 3:  # how every family calls its experts
            return (args[0] if hidden is None else hidden, ids, weights), {}
        sig = _forward_signature(experts)
        b = sig.bind(*args, **kwargs)
        names = list(sig.parameters)
        if hidden is not None:
            b.arguments[names[0]] = hidden
        b.arguments[names[1]] = ids
        b.arguments[names[2]] = weights
        return b.args, b.kwargs


class ModuleListExperts(ExpertsLayout):
    """An nn.ModuleList / nn.ModuleDict of identical per-expert modules (SwitchTransformers)."""

    name = "modulelist"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict)) or len(module) < 2:
            return False
        children = list(module.children())
        if len(children) != len(module) or len({type(c) for c in children}) != 1:
            return False
        shapes = [tuple((n, tuple(p.shape)) for n, p in c.named_parameters()) for c in children]
        return bool(shapes[0]) and all(s == shapes[0] for s in shapes)

    @staticmethod
    def experts_list(experts: nn.Module) -> list[nn.Module]:
        return list(experts.values()) if isinstance(experts, nn.ModuleDict) else list(experts)

    def num_experts(self, experts):
        return len(experts)

    def tensor_specs(self, experts):
        first = self.experts_list(experts)[0]
        return tuple(ExpertTensorSpec(n, tuple(p.shape), p.dtype) for n, p in first.named_parameters())

    def expert_tensors(self, experts, e):
        return dict(self.experts_list(experts)[e].named_parameters())

    def remove(self, experts):
        saved = {"requires_grad": {}}
        for e, expert in enumerate(self.experts_list(experts)):
            for name, p in list(expert.named_parameters()):
                owner, leaf = owner_of(expert, name)
                saved["requires_grad"][name] = p.requires_grad
                del owner._parameters[leaf]
        return saved

    def restore(self, experts, saved, data):
        for e, expert in enumerate(self.experts_list(experts)):
            for name, rg in saved["requires_grad"].items():
                owner, leaf = owner_of(expert, name)
                owner.__dict__.pop(leaf, None)
                owner.register_parameter(leaf, nn.Parameter(data[name][e], requires_grad=rg))

    def bind_expert(self, expert: nn.Module, views: dict[str, torch.Tensor], slot: int) -> None:
        """Point one expert's tensors at its cache slot."""
        for name, v in views.items():
            owner, leaf = owner_of(expert, name)
            owner.__dict__[leaf] = v[slot]

    def routing(self, experts, args, kwargs, top_k):
        bound = _bind_call(experts, args, kwargs)
        hidden, selected = bound[0], bound[1]
        weights = bound[2] if len(bound) > 2 else None
        e = len(experts)
        t = hidden.shape[0]
        if selected.dim() >= 2 and selected.shape[-1] == e and top_k < e:
            # a dispatch mask [T, ..., E] (one-hot or multi-hot; capacity-dropped tokens are all zero)
            hot = selected.reshape(t, -1, e).amax(1).float()  # [T, E]
            vals, ids = hot.topk(top_k, dim=-1)  # [T, k]
            ids = torch.where(vals > 0, ids, torch.full_like(ids, -1))
        else:
            ids = selected.reshape(t, -1).long()
        return hidden, ids, weights


LAYOUTS: tuple[type[ExpertsLayout], ...] = (FusedExperts, ModuleListExperts)


def owner_of(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = dotted.rpartition(".")
    return (root.get_submodule(prefix) if prefix else root), leaf


@functools.lru_cache(maxsize=None)
def _signature_of(cls: type) -> inspect.Signature:
    sig = inspect.signature(cls.forward)
    return sig.replace(parameters=list(sig.parameters.values())[1:])  # drop self


def _forward_signature(module: nn.Module) -> inspect.Signature:
    return _signature_of(type(module))


def _bind_call(module: nn.Module, args: tuple, kwargs: dict) -> list:
    """The first three arguments of an experts call, wherever they were passed."""
    if not kwargs:
        return list(args)
    b = _forward_signature(module).bind_partial(*args, **kwargs)
    return list(b.arguments.values())

"""Find the MoE layers of a transformers model and describe their router and expert tensors.

Two layouts cover the families of transformers 5.x:

* ``fused``: an experts module decorated with ``use_experts_implementation`` holding 3-D parameters
  (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, optional biases, transposed or not), called as
  ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``. Mixtral, Qwen2/3-MoE, OLMoE,
  DeepSeek-V2/V3, GPT-OSS, Granite-MoE, Phi-MoE, GLM4-MoE, ...
* ``modulelist``: an ``nn.ModuleList``/``nn.ModuleDict`` of identical per-expert MLPs, next to a router
  (SwitchTransformers, encoder-decoder).

A layout (`layouts.py`) knows how to read one expert's tensors, take them out of the module, give them back, and
read the routing from an experts call; this module finds the layers and their routers. Neither knows of caches.
"""

# Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k, L MoE layers, S cache slots

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..geometry import MoEGeometry
from .layouts import LAYOUTS, ExpertsLayout, ExpertTensorSpec, FusedExperts, ModuleListExperts, owner_of

__all__ = ["ExpertTensorSpec", "ExpertsLayout", "FusedExperts", "MoELayer", "ModelMoE", "ModuleListExperts",
           "RouterWeights", "SUPPORTED", "find_moe_layers"]

SUPPORTED = (
    "experts modules decorated with transformers' `use_experts_implementation` (3-D gate_up_proj/down_proj: "
    "Mixtral, Qwen2-MoE, Qwen3-MoE, Qwen3-Next, OLMoE, DeepSeek-V2/V3/V4, GPT-OSS, Granite-MoE, Phi-MoE, GLM4-MoE, "
    "...), Llama-4's and DBRX's experts, and ModuleList/ModuleDict experts next to a router (SwitchTransformers)"
)
ROUTER_NAMES = ("gate", "router")

# Families transformers has whose MoE layers specmoe cannot offload, and what is missing (one line each).
UNSUPPORTED = {
    "jetmoe": "JetMoE's experts (JetMoeParallelExperts) take tokens pre-sorted by expert with per-expert counts, "
              "and its attention is a mixture of experts too; specmoe has no layout for either",
    "zaya": "Zaya's router is an MLP over router states carried from layer to layer (ZayaRouter), not a linear "
            "[E, H] router: specmoe's predictors, traces and host misses need one",
    "longcat_flash": "LongCat-Flash routes to zero-computation experts (ids past the real experts, zero_expert_num) "
                     "that specmoe's expert table cannot hold",
}


@dataclass(frozen=True)
class RouterWeights:
    """The linear part of a router: scores = hidden @ weight.T (+ bias). weight [E, H], bias [E] or None.

    It holds the module and attribute names, not tensors, so it follows the model across devices.
    """

    owner: nn.Module
    weight_name: str
    bias_name: str | None = None

    @property
    def weight(self) -> torch.Tensor:  # [E, H]
        return getattr(self.owner, self.weight_name).detach()

    @property
    def bias(self) -> torch.Tensor | None:  # [E]
        return None if self.bias_name is None else getattr(self.owner, self.bias_name).detach()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, E]
        w = self.weight
        out = torch.nn.functional.linear(hidden.to(w.device, w.dtype), w)
        bias = self.bias
        return out if bias is None else out + bias.to(out.dtype)


@dataclass
class MoELayer:
    """One MoE layer: its experts container, the router next to it, and the layout that drives them."""

    index: int  # 0 .. L-1, in forward order
    name: str  # module path of the experts container
    experts: nn.Module
    router: RouterWeights
    layout: ExpertsLayout


@dataclass
class ModelMoE:
    """Every MoE layer of a model and their shared geometry."""

    layers: list[MoELayer]
    geometry: MoEGeometry
    specs: tuple[ExpertTensorSpec, ...]  # one expert's tensors, the same in every layer
    first_decode_layer: int  # the MoE layer a decoding step starts at (0, or the decoder's first)

    @property
    def expert_nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    @property
    def transposed(self) -> bool:
        """Whether the expert matrices are held [in, out] (gpt-oss, Llama-4), not transformers' usual [out, in]."""
        layer = self.layers[0]
        return bool(getattr(layer.layout, "transposed", False) or getattr(layer.experts, "is_transposed", False))


def _find_router(parent: nn.Module, experts: nn.Module, num_experts: int) -> RouterWeights | None:
    candidates = [(n, m) for n, m in parent.named_children() if m is not experts]
    candidates.sort(key=lambda nm: nm[0] not in ROUTER_NAMES)  # prefer gate / router
    for _, module in candidates:
        for pname, p in module.named_parameters():
            if p.dim() == 2 and p.shape[0] == num_experts:
                owner, leaf = owner_of(module, pname)
                bias_name = leaf.replace("weight", "bias") if "weight" in leaf else None
                bias = getattr(owner, bias_name, None) if bias_name else None
                if not (isinstance(bias, torch.Tensor) and bias.shape == (num_experts,)):
                    bias_name = None
                return RouterWeights(owner, leaf, bias_name)
    return None


def _probe_top_k(parent: nn.Module, experts: nn.Module, hidden_size: int) -> int | None:
    """k of the routing the router really produces: call it on two zero tokens and read the width of the expert
    ids [T, k] it returns (PhiMoE's sparsemixer picks 2 whatever num_experts_per_tok says). None when the router
    cannot be called so (no gate/router child, weights on the meta device, another signature)."""
    for name, module in parent.named_children():
        if name not in ROUTER_NAMES or module is experts:
            continue
        weight = next(iter(module.parameters()), None)
        if weight is None or weight.device.type == "meta":
            return None
        try:  # the RNG is forked: a router with jitter must not shift the model's random stream
            with torch.no_grad(), torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
                out = module(torch.zeros(2, hidden_size, dtype=weight.dtype, device=weight.device))
        except Exception:  # noqa: BLE001 - any router we cannot probe falls back to the config
            return None
        ints = [o for o in (out if isinstance(out, tuple) else (out,))
                if isinstance(o, torch.Tensor) and not o.is_floating_point() and o.dim() == 2 and o.shape[0] == 2]
        return int(ints[-1].shape[1]) if ints else None
    return None


def _top_k(model: nn.Module, parent: nn.Module, layout: ExpertsLayout, experts: nn.Module | None = None,
           hidden_size: int | None = None) -> int:
    if isinstance(layout, FusedExperts) and hidden_size is not None:
        probed = _probe_top_k(parent, experts, hidden_size)
        if probed is not None:
            return probed
    for m in parent.modules():
        k = getattr(m, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    cfg = getattr(model, "config", None)
    for cfg_ in (cfg, getattr(cfg, "text_config", None)):
        for attr in ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"):
            k = getattr(cfg_, attr, None)
            if isinstance(k, int) and k > 0:
                return k
    return 1  # Switch routing: top-1


def find_moe_layers(model: nn.Module) -> ModelMoE:
    """Describe every MoE layer of `model`.

    Raises:
        TypeError: the model has no MoE layer of a supported layout (a dense model, or an unknown family).
        ValueError: its MoE layers disagree on geometry or expert shapes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    modules = dict(model.named_modules())
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in UNSUPPORTED:
        raise TypeError(f"{type(model).__name__} cannot be offloaded by specmoe: {UNSUPPORTED[model_type]}")
    found: list[tuple[str, nn.Module, ExpertsLayout, RouterWeights, int]] = []
    claimed: set[str] = set()
    # Experts modules first, containers (ModuleList layouts) after: a ModuleList holding found experts (the
    # decoder layers of a model whose layers look alike) is never taken for experts.
    for containers in (False, True):
        for name, module in modules.items():
            if any(name.startswith(c + ".") or c == name for c in claimed):
                continue
            if containers and any(c.startswith(name + ".") for c in claimed):
                continue
            for layout_cls in LAYOUTS:
                if (layout_cls is ModuleListExperts) != containers or not layout_cls.matches(module):
                    continue
                layout = layout_cls()
                parent_name = name.rpartition(".")[0]
                parent = modules[parent_name] if parent_name else model
                router = _find_router(parent, module, layout.num_experts(module))
                if router is None:
                    continue
                layout.attach(parent)
                found.append((name, module, layout, router,
                              _top_k(model, parent, layout, module, int(router.weight.shape[1]))))
                claimed.add(name)
                break
    if not found:
        raise TypeError(
            f"{type(model).__name__} has no MoE layers that specmoe can offload. Supported: {SUPPORTED}."
        )
    found.sort(key=lambda f: list(modules).index(f[0]))  # forward order
    name0, mod0, layout0, router0, k0 = found[0]
    specs = layout0.tensor_specs(mod0)
    geometry = MoEGeometry(
        num_layers=len(found),
        num_experts=layout0.num_experts(mod0),
        top_k=k0,
        hidden_size=int(router0.weight.shape[1]),
    )
    layers = []
    for i, (name, module, layout, router, k) in enumerate(found):
        shape = (layout.num_experts(module), k, int(router.weight.shape[1]), layout.tensor_specs(module))
        if shape != (geometry.num_experts, geometry.top_k, geometry.hidden_size, specs):
            raise ValueError(
                f"MoE layer {name} differs from {name0} (experts, top-k, hidden, tensors): {shape[:3]} vs "
                f"{(geometry.num_experts, geometry.top_k, geometry.hidden_size)}; specmoe needs one expert shape "
                "across layers"
            )
        layers.append(MoELayer(i, name, module, router, layout))
    first_decode = next((lay.index for lay in layers if "decoder" in lay.name.split(".")), 0)
    return ModelMoE(layers, geometry, specs, first_decode)

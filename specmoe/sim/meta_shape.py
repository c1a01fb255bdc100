"""Counts of any transformers MoE model, from its config: the model is built on the meta device (no memory, no
weights) and its parameters are sorted into the fields of `ModelShape`.

`ModelShape.from_config` uses this for every model type that `sim.shapes.FAMILIES` does not count by formula.
Totals are exact (the meta model's own parameters); per-layer fields are averages over the layers that have
them, and whatever the averages leave out (layers that differ, multi-token-prediction heads, the final norm) is
`other_params`. KV values per token are averaged over all layers (linear-attention layers hold a fixed-size
state, not a KV cache, and count 0).
"""

# Shape legend: L decoder layers, E experts, k top-k, H hidden, I expert intermediate

from __future__ import annotations

import functools
import json
import math
import re

import torch
from torch import nn

_NOT_CONFIG = ("model_type", "architectures", "transformers_version", "quantization_config", "auto_map")
_ATTENTION = re.compile(r"attn|attention|mixer")


def count_on_meta(values: dict) -> dict:
    """`ModelShape` field values (plus "expert_specs" as the meta model holds them and "transposed": whether
    its expert weights are [in, out]) of the config.json `values`.

    Raises:
        ValueError: transformers cannot build this config, or the model has no MoE layers specmoe finds.
    """
    return dict(_count(json.dumps(values, sort_keys=True, default=str)))


@functools.lru_cache(maxsize=64)
def _count(key: str) -> dict:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..runtime.adapters import find_moe_layers

    values = json.loads(key)
    model_type = values.get("model_type")
    try:
        config = AutoConfig.for_model(model_type, **{k: v for k, v in values.items() if k not in _NOT_CONFIG})
    except Exception as err:  # noqa: BLE001 - unknown types, validators (huggingface_hub's own error class)
        raise ValueError(f"transformers {transformers.__version__} cannot read a config of model_type "
                         f"{model_type!r}: {err}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - any construction failure is the config's: say which
        raise ValueError(f"cannot build a {model_type!r} model from this config on the meta device: "
                         f"{type(err).__name__}: {err}") from None
    try:
        moe = find_moe_layers(model)
    except TypeError as err:
        raise ValueError(f"cannot derive a ModelShape for model_type {model_type!r}: {err}") from None
    text = getattr(config, "text_config", None) or config
    return _sort(model, moe, text)


def _decoder_layers(model: nn.Module, first_moe: str) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and first_moe.startswith(name + "."):
            return name, module
    raise ValueError(f"cannot find the decoder layers holding {first_moe}")


def _sort(model: nn.Module, moe, config) -> dict:
    names = {id(m): n for n, m in model.named_modules()}
    params = dict(model.named_parameters())  # tied weights appear once
    list_name, layers = _decoder_layers(model, moe.layers[0].name)
    experts_at = {lay.name: lay for lay in moe.layers}
    H, L = moe.geometry.hidden_size, len(layers)
    attn = norms = shared = dense = router = kv_total = 0
    moe_count = 0
    for i in range(L):
        prefix = f"{list_name}.{i}."
        mine = {n[len(prefix):]: p.numel() for n, p in params.items() if n.startswith(prefix)}
        layer_moe = [lay for name, lay in experts_at.items() if name.startswith(prefix)]
        skip = set()
        for lay in layer_moe:
            rel = lay.name[len(prefix):]
            skip |= {n for n in mine if n.startswith(rel + ".")}
            owner = names.get(id(lay.router.owner), "")
            rel_router = owner[len(prefix):] if owner.startswith(prefix) else None
            if rel_router is not None:
                router_names = {n for n in mine if n.startswith(rel_router + ".") and n not in skip}
                router += sum(mine[n] for n in router_names)
                skip |= router_names
        rest = 0
        for n, count in mine.items():
            if n in skip:
                continue
            head = n.split(".")[0]
            if _ATTENTION.search(head):
                attn += count
            elif "norm" in head:
                norms += count
            else:
                rest += count
        if layer_moe:
            moe_count += 1
            shared += rest
        else:
            dense += rest
        kv_total += _kv_values(layers[i], config)
    dense_count = L - moe_count
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    lm_head = 0 if out is None or out.weight is embed else out.weight.numel()
    spec_values = sum(math.prod(s.shape) for s in moe.specs)
    experts = moe.geometry.num_layers * moe.geometry.num_experts * spec_values
    counts = dict(
        attention_params=attn // L, norm_params=norms // L, router_params=router // moe_count,
        shared_params=shared // moe_count, dense_mlp_params=dense // dense_count if dense_count else 0,
    )
    per_layer = (moe_count * (counts["attention_params"] + counts["norm_params"] + counts["router_params"]
                              + counts["shared_params"])
                 + dense_count * (counts["attention_params"] + counts["norm_params"] + counts["dense_mlp_params"]))
    total = sum(p.numel() for p in params.values())
    other = total - experts - per_layer - embed.numel() - lm_head
    heads = _get(config, "num_attention_heads", "n_heads") or 1
    head_dim = _get(config, "head_dim") or max(H // heads, 1)
    types = list(getattr(config, "layer_types", None) or [])
    sliding_window = getattr(config, "sliding_window", None) or 0
    return dict(
        num_layers=L, moe_layers=moe.geometry.num_layers, hidden_size=H, num_experts=moe.geometry.num_experts,
        top_k=moe.geometry.top_k, moe_intermediate_size=_intermediate(moe.specs, H), vocab_size=embed.shape[0],
        embed_params=embed.numel(), lm_head_params=lm_head, final_norm_params=0, other_params=other,
        kv_values_per_token=max(1, round(kv_total / L)), attention_heads=heads, attention_head_dim=head_dim,
        sliding_window=sliding_window if any(t == "sliding_attention" for t in types) else 0,
        sliding_layers=sum(t == "sliding_attention" for t in types) if sliding_window else 0,
        expert_specs=moe.specs, transposed=moe.transposed, **counts,
    )


def _get(config, *keys):
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _kv_values(layer: nn.Module, config) -> int:
    """K and V values one token adds to this layer's cache: its k/v projections' widths, MLA's decompressed
    heads, 0 for a layer without one (linear attention)."""
    for name, module in layer.named_children():
        if not _ATTENTION.search(name):
            continue
        k, v = getattr(module, "k_proj", None), getattr(module, "v_proj", None)
        if isinstance(k, nn.Linear) and isinstance(v, nn.Linear):
            return k.out_features + v.out_features
        if hasattr(module, "kv_b_proj"):
            heads = _get(config, "num_attention_heads") or 1
            qk = _get(config, "qk_head_dim") or ((_get(config, "qk_nope_head_dim") or 0) + (_get(config, "qk_rope_head_dim") or 0))
            return heads * (qk + (_get(config, "v_head_dim") or 0))
    return 0


def _intermediate(specs, hidden: int) -> int:
    for spec in specs:
        if spec.name == "down_proj" and len(spec.shape) == 2:
            a, b = spec.shape
            return b if a == hidden else a
    return max(min(s.shape) for s in specs if len(s.shape) == 2)

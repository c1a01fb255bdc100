"""Tiny checkpoints with pre-quantized experts, written in their publishers' layouts (what transformers'
integrations read: mxfp4.py for gpt-oss, finegrained_fp8.py for DeepSeek-V3 / Qwen3-FP8, GPTQ's
qweight/qzeros/scales/g_idx, with act-order too ("gptq-act": g_idx a permutation's groups, the same for gate_proj
and up_proj, which share their input), AutoAWQ's GEMM qweight/qzeros/scales), with the `quantization_config`
their config.json carries."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from specmoe.kernels.prequant import PrequantFormat, quantize, quantize_gptq

_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=96, max_position_embeddings=128, tie_word_embeddings=False)
MODELS = {  # expert matrices sized for each format's blocks (MXFP4: K % 32; FP8 per-expert: I % 128; GPTQ: K % G)
    "mxfp4": ("gpt_oss", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, layer_types=None,
                              sliding_window=32)),
    "fp8": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=96,
                              decoder_sparse_step=1, mlp_only_layers=[])),
    "gptq": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=96,
                               decoder_sparse_step=1, mlp_only_layers=[])),
}
MODELS["gptq-act"] = MODELS["awq"] = MODELS["gptq"]
QUANT = {
    "mxfp4": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                 "model.layers.*.mlp.router", "model.embed_tokens",
                                                                 "lm_head"]},
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
            "modules_to_not_convert": ["model.layers.*.mlp.gate", "lm_head"]},  # attention in FP8 too (DeepSeek-V3)
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
             "checkpoint_format": "gptq"},
    "gptq-act": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False,
                 "checkpoint_format": "gptq"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None},  # AutoAWQ's config.json (quantization_config of an AWQ build)
}


def act_order_g_idx(k: int, group: int, generator: torch.Generator) -> torch.Tensor:
    """GPTQ act-order's g_idx [K]: the columns, in a permuted order (GPTQ's by the Hessian's diagonal), cut into
    groups of `group`: not monotone."""
    perm = torch.randperm(k, generator=generator)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
    return g_idx


def tiny_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    model_type, extra = MODELS[kind]
    cfg = AutoConfig.for_model(model_type, **{**_TINY, **extra, **overrides})
    cfg.pad_token_id, cfg.eos_token_id = 0, None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and (".gate." in name or ".router." in name) and "experts" not in name:
                p.normal_(0, 0.5)
    return model


def write_checkpoint(kind: str, out: Path, seed: int = 0, *, split_g_idx: bool = False, **overrides) -> Path:
    """A tiny model's checkpoint with its experts quantized as `kind`'s publisher stores them; the other tensors
    bf16. gpt-oss (MXFP4): fused ``experts.gate_up_proj_blocks [E, 2I, H/32, 16]`` / ``_scales`` (its model
    holds gate_up [E, H, 2I], transposed); FP8, GPTQ and AWQ: per-expert ``experts.{e}.gate_proj`` / ``up_proj``
    / ``down_proj`` tensors. `split_g_idx` ("gptq-act"): gate_proj and up_proj get different act-order g_idx
    (no GPTQ run makes that; a checkpoint specmoe must refuse). `overrides`: config values to change (sizes)."""
    model = tiny_model(kind, seed, **overrides)
    fmt = PrequantFormat.from_quantization_config(QUANT[kind])
    act_order = bool(QUANT[kind].get("desc_act"))
    gen = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().contiguous()
        if kind == "mxfp4" and key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            parts = [quantize(value[e].T.float(), fmt) for e in range(value.shape[0])]  # [N, K] = [out, in]
            for sfx in fmt.suffixes:
                tensors[key + sfx] = torch.stack([p[sfx] for p in parts])
        elif kind != "mxfp4" and key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stem = key[: -len("gate_up_proj")] if key.endswith("gate_up_proj") else key[: -len("down_proj")]
            for e in range(value.shape[0]):
                if key.endswith("gate_up_proj"):
                    gate, up = value[e].chunk(2, dim=0)  # [I, H] each
                    mats = {"gate_proj": gate, "up_proj": up}
                else:
                    mats = {"down_proj": value[e]}
                g_idx = act_order_g_idx(value.shape[-1], fmt.block, gen) if act_order else None
                for proj, w in mats.items():
                    if split_g_idx and proj == "up_proj":
                        g_idx = act_order_g_idx(value.shape[-1], fmt.block, gen)
                    parts = quantize_gptq(w.float(), fmt.block, g_idx) if act_order else quantize(w.float(), fmt)
                    for sfx, part in parts.items():
                        name = {"": ".weight", "_scale_inv": ".weight_scale_inv"}.get(sfx, sfx)
                        tensors[f"{stem}{e}.{proj}{name}"] = part.contiguous()
        elif kind == "fp8" and ".self_attn." in key and key.endswith("_proj.weight"):
            parts = quantize(value.float(), fmt)
            tensors[key], tensors[key + "_scale_inv"] = parts[""], parts["_scale_inv"]
        elif kind in ("gptq-act", "awq") and ".self_attn." in key and key.endswith("_proj.weight"):
            # as GPTQ / AWQ builds ship them: attention quantized too (the router gate and lm_head are not)
            g_idx = act_order_g_idx(value.shape[1], fmt.block, gen) if act_order else None
            parts = quantize_gptq(value.float(), fmt.block, g_idx) if act_order else quantize(value.float(), fmt)
            tensors.update({key[: -len(".weight")] + sfx: part for sfx, part in parts.items()})
        else:
            tensors[key] = value.to(torch.bfloat16) if value.is_floating_point() else value
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.update(quantization_config=QUANT[kind], dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(config))
    return out


def dequantized_reference(kind: str, path: Path):
    """The checkpoint as a bf16 model: transformers' own load where it dequantizes on this machine (MXFP4 and
    FP8 on a CPU), else (GPTQ, whose transformers path needs optimum + gptqmodel) the unquantized model with
    each expert replaced by the dequantization of its published parts (GPTQ with act-order and AWQ too)."""
    if kind in ("mxfp4", "fp8"):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    from safetensors.torch import load_file

    fmt = PrequantFormat.from_quantization_config(QUANT[kind])
    model = tiny_model(kind, dtype=torch.bfloat16)
    state = load_file(str(Path(path) / "model.safetensors"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                stem = name.rsplit(".", 1)[0] + "."
                projs = ["gate_proj", "up_proj"] if name.endswith("gate_up_proj") else ["down_proj"]
                for e in range(p.shape[0]):
                    mats = [fmt.dequantize({sfx: state[f"{stem}{e}.{proj}{sfx}"] for sfx in fmt.suffixes})
                            for proj in projs]
                    p[e].copy_(torch.cat(mats, dim=0))
            elif name in state:
                p.copy_(state[name])
            elif name.endswith(".weight") and name[: -len("weight")] + "qweight" in state:  # quantized attention
                p.copy_(fmt.dequantize({sfx: state[name[: -len(".weight")] + sfx] for sfx in fmt.suffixes}))
            else:
                raise KeyError(f"{path}: no tensor for {name}")
    return model

"""Where a pre-quantized checkpoint keeps each expert's published parts (`kernels.prequant` formats).

The model is built unquantized (its experts `gate_up_proj [E, ...]`, `down_proj [E, ...]`), and the store holds
each expert in the published layout of its codec (`compression.PrequantCodec`): ``gate_up_proj_blocks``,
``gate_up_proj_scale_inv``, ``gate_up_proj.qweight`` ... Those parts come from

* fused tensors stored as the published layout holds them (gpt-oss: ``experts.gate_up_proj_blocks [E, ...]``):
  expert e is slice e of dim 0, plain bytes of the file;
* per-expert tensors, found through transformers' own converter for the unquantized weight
  (``mlp.experts.*.gate_proj.weight`` + ``...up_proj.weight`` -> ``gate_up_proj``) with ``.weight`` replaced by
  the part's key (FP8: ``.weight`` and ``.weight_scale_inv``; GPTQ: ``.qweight``, ``.qzeros``, ``.scales``,
  ``.g_idx``), concatenated along the output channels: dim 0 for FP8 (plain bytes too, when every block row
  is whole) and the last dim for GPTQ and AWQ (built in memory, without loss; GPTQ's ``g_idx`` must be the same
  for the concatenated matrices: it is without act-order, and with it too, since gate_proj and up_proj share
  their input and so GPTQ's column order).

`PrequantPlan` has `ExpertPlan`'s two reading methods, so `loading.CheckpointExperts` serves either.
"""

# Shape legend: E experts, N output channels, K input channels

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import SafetensorsCheckpoint, _conversions

# per part suffix: the per-expert checkpoint key's suffix that replaces ".weight", and the concatenation dim
_PER_EXPERT = {"": (".weight", 0), "_scale_inv": (".weight_scale_inv", 0), ".qweight": (".qweight", -1),
               ".qzeros": (".qzeros", -1), ".scales": (".scales", -1), ".g_idx": (".g_idx", None)}


@dataclass(frozen=True)
class _Recipe:
    fused: str | None  # a fused checkpoint key [E, *shape]
    templates: tuple[str, ...]  # or per-expert keys with "{e}" for the expert, concatenated
    cat_dim: int | None  # None: every template holds the same tensor (GPTQ g_idx): take the first


class PrequantPlan:
    """For every MoE layer: where each published part of each expert is in the checkpoint.

    Args:
        checkpoint: the shards.
        model: the unquantized model (meta device), for transformers' key conversions.
        moe: its MoE layers.
        codec: the `PrequantCodec` whose layout the store holds.

    Raises:
        KeyError: a part the checkpoint does not hold (the message names it).
    """

    def __init__(self, checkpoint: SafetensorsCheckpoint, model: nn.Module, moe, codec):
        from transformers.core_model_loading import rename_source_key

        self.checkpoint, self.codec = checkpoint, codec
        renamings, converters = _conversions(model)
        meta_keys = dict.fromkeys(model.state_dict().keys(), True)
        self.renamed = {rename_source_key(k, renamings, [], model.base_model_prefix, meta_keys)[0]: k
                        for k in checkpoint.keys()}
        self.recipes: dict[str, _Recipe] = {}
        E = moe.geometry.num_experts
        for layer in moe.layers:
            for spec in codec.layout.specs:
                key = f"{layer.name}.{spec.name}"
                self.recipes[key] = self._recipe(layer.name, spec, codec, converters, E)

    def _recipe(self, experts_name: str, spec, codec, converters, E: int) -> _Recipe:
        key = f"{experts_name}.{spec.name}"
        fused = self.renamed.get(key)
        if fused is not None:
            shape = self.checkpoint.entries[fused].shape
            if shape[0] != E or tuple(shape[1:]) != tuple(spec.shape):
                raise ValueError(f"{fused}: shape {shape}, expected [{E}, {', '.join(map(str, spec.shape))}]")
            return _Recipe(fused, (), None)
        base, sfx = _split(spec.name, codec)
        if sfx not in _PER_EXPERT:
            raise KeyError(f"the checkpoint in {self.checkpoint.directory} has no tensor {key}")
        ck_suffix, cat_dim = _PER_EXPERT[sfx]
        target = f".{experts_name}.{base}"
        for conv in converters:
            if not any(target.endswith("." + t.lstrip(".")) for t in conv.target_patterns):
                continue
            templates = []
            for pattern in conv.source_patterns:
                if not pattern.endswith(".weight") or "*" not in pattern:
                    break
                pre = pattern[: pattern.index("*")]
                full = f".{experts_name}."
                if not full.endswith(pre if pre.startswith(".") else "." + pre):
                    break
                root = full[: len(full) - len(pre.lstrip("."))]
                templates.append((root + pattern.lstrip(".")[:-len(".weight")] + ck_suffix).lstrip(".").replace("*", "{e}"))
            else:
                missing = [t.format(e=0) for t in templates if t.format(e=0) not in self.renamed]
                if templates and not missing:
                    return _Recipe(None, tuple(templates), cat_dim)
                if templates:
                    raise KeyError(f"the checkpoint in {self.checkpoint.directory} has no {missing[0]} (for {key})")
        raise KeyError(f"the checkpoint in {self.checkpoint.directory} has no tensors for {key} (neither fused "
                       "nor per expert)")

    def _keys(self, key: str, e: int) -> list[str]:
        r = self.recipes[key]
        if r.fused is not None:
            return [r.fused]
        keys = [self.renamed[t.format(e=e)] for t in r.templates]
        return keys[:1] if r.cat_dim is None else keys

    def direct_ranges(self, key: str, e: int, shape: tuple[int, ...], dtype: torch.dtype):
        """[(file, offset, nbytes)] whose bytes, concatenated, are expert e's part; None if not so stored."""
        r = self.recipes[key]
        out = []
        for ck in self._keys(key, e):
            entry = self.checkpoint.entries[ck]
            if entry.dtype != dtype:
                return None
            if r.fused is not None:
                per = entry.nbytes // entry.shape[0]
                out.append((entry.file, entry.start + e * per, per))
            else:
                out.append((entry.file, entry.start, entry.nbytes))
        if r.fused is None and len(out) > 1 and r.cat_dim not in (0, None):
            return None  # concatenated along another dim than the first: not a byte range
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        return out if sum(n for _, _, n in out) == nbytes else None

    def expert_tensor(self, key: str, e: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Expert e's part, read from the checkpoint (a new CPU tensor).

        Raises:
            ValueError: a shape other than the layout's, or concatenated GPTQ matrices with different g_idx.
        """
        r = self.recipes[key]
        if r.fused is not None:
            entry = self.checkpoint.entries[r.fused]
            t = torch.empty(entry.shape[1:], dtype=entry.dtype)
            self.checkpoint.read_range(entry.file, entry.start + e * (entry.nbytes // entry.shape[0]), t)
        else:
            parts = [self.checkpoint.read(self.renamed[tpl.format(e=e)]) for tpl in r.templates]
            if r.cat_dim is None:
                if any(not torch.equal(p, parts[0]) for p in parts[1:]):
                    raise ValueError(f"{key} expert {e}: gate_proj and up_proj have different GPTQ g_idx; specmoe "
                                     "reads act-order (desc_act) only with one g_idx for both, as GPTQ gives them")
                t = parts[0]
            else:
                t = torch.cat(parts, dim=r.cat_dim)
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(f"{key} expert {e}: the checkpoint gives {t.dtype} {tuple(t.shape)}, the published "
                             f"layout expects {dtype} {tuple(shape)}")
        return t


def _split(name: str, codec) -> tuple[str, str]:
    """A published part's name -> (model tensor, part suffix): "gate_up_proj.qweight" -> ("gate_up_proj",
    ".qweight"); a tensor kept as it is (a bias) -> (name, "")."""
    for base in sorted(codec.compressed, key=len, reverse=True):
        if name.startswith(base) and name[len(base):] in codec.fmt.suffixes:
            return base, name[len(base):]
    return name, "<kept>"

"""One expert's tensors in a publisher's format (`kernels.prequant`): the layout the host store, the copies and
the cache slots hold for pre-quantized experts, and the number of weight values it carries."""

from __future__ import annotations

import math

import torch

from ..kernels.prequant import PrequantFormat
from .layouts import ExpertTensorSpec

FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def expert_specs_as(specs, expert_dtype: str, transposed: bool = False) -> tuple[ExpertTensorSpec, ...]:
    """One expert's tensors (any float dtype) as stored in `expert_dtype`: a float dtype casts them; a publisher's
    format (`kernels.prequant`: mxfp4, fp8-b128, gptq-int4-g128) replaces each 2-D weight by its parts and keeps
    the rest (biases) in bf16. `transposed`: the weights are [in, out] (gpt-oss), not [out, in]."""
    fmt = PrequantFormat.parse(expert_dtype)
    out = []
    for spec in specs:
        if fmt is None:
            out.append(ExpertTensorSpec(spec.name, spec.shape, FLOAT_DTYPES[expert_dtype]) if spec.dtype.is_floating_point
                       else spec)
        elif len(spec.shape) == 2 and spec.dtype.is_floating_point:
            n, k = spec.shape[::-1] if transposed else spec.shape
            out += [ExpertTensorSpec(spec.name + sfx, shape, dt) for sfx, (shape, dt) in fmt.parts(n, k).items()]
        else:
            out.append(ExpertTensorSpec(spec.name, spec.shape, torch.bfloat16))
    return tuple(out)


def prequant_values(fmt: PrequantFormat, spec: ExpertTensorSpec) -> int:
    """Weight values one tensor of a pre-quantized expert holds (0 for its scales, zeros and indices)."""
    for sfx in ("_blocks", "_scales", "_scale_inv", ".qweight", ".qzeros", ".scales", ".g_idx"):
        if spec.name.endswith(sfx):
            return fmt.values(sfx, spec.shape)
    return math.prod(spec.shape)  # an FP8 weight, a bias

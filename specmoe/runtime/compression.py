"""Compressed host storage of experts (opt-in): what the host store holds and how a slot is rebuilt from it.

With compression the host store keeps each expert in a *compressed layout* (int8 or int4 matrices plus
scales, `specmoe.kernels.quant`), so a swap moves 2-4x fewer bytes over PCIe. The copy engine copies the
compressed bytes into a device staging buffer and `ExpertCodec.decode` dequantizes them into the slot, in
the slot's usual (uncompressed) layout, on the same stream, before the slot's ready event. Everything after
the slot (compute, `gather`/`pool`/`triton`) is unchanged. Without compression none of this is used.

Compression changes numerics: the model computes with quantize-dequantized experts, and `unwrap()` gives
those back (the original weights are not kept).
"""

# Shape legend: L MoE layers, E experts, B bytes per expert (slot layout), Bc bytes per compressed expert

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..kernels.quant import QuantFormat, compressible, dequantize, dequantize_into, quantize
from .adapters import ExpertTensorSpec
from .store import ExpertLayout


class ExpertCodec:
    """Encode an expert's tensors into the compressed layout; decode compressed bytes into a slot.

    Args:
        layout: the slot (uncompressed) layout of one expert.
        fmt: the compression format.

    Attributes:
        layout: the compressed layout (what the host store holds), `layout.nbytes` = Bc.
        slot_layout: the uncompressed layout (what a cache slot holds), `slot_layout.nbytes` = B.
    """

    def __init__(self, layout: ExpertLayout, fmt: QuantFormat):
        self.slot_layout = layout
        self.fmt = fmt
        self.compressed = {s.name for s in layout.specs if compressible(s.shape, s.dtype)}
        if not self.compressed:
            raise ValueError("compression needs 2-D floating-point expert weights; this model's experts have none")
        specs = []
        for spec in layout.specs:
            if spec.name in self.compressed:
                specs += [ExpertTensorSpec(spec.name + sfx, shape, dtype)
                          for sfx, (shape, dtype) in fmt.parts(spec.shape).items()]
            else:
                specs.append(spec)
        self.layout = ExpertLayout(tuple(specs))

    @property
    def ratio(self) -> float:
        """Bytes of an uncompressed slot over bytes of a compressed expert (B / Bc)."""
        return self.slot_layout.nbytes / self.layout.nbytes

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An expert's tensors (slot layout names) -> its compressed tensors (compressed layout names)."""
        out = {}
        for spec in self.slot_layout.specs:
            t = tensors[spec.name]
            if spec.name in self.compressed:
                out.update({spec.name + sfx: part for sfx, part in quantize(t, self.fmt).items()})
            else:
                out[spec.name] = t
        return out

    def decode(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Rebuild a slot: dst [B] uint8 (slot layout) from src [Bc] uint8 (compressed layout), both on the
        same device, on the current stream."""
        packed = self.layout.unpack(src)
        slot = self.slot_layout.unpack(dst)
        for name, view in slot.items():
            if name in self.compressed:
                dequantize_into(view, self._parts(packed, name), self.fmt)
            else:
                view.copy_(packed[name])

    def decode_tensors(self, src: torch.Tensor) -> dict[str, torch.Tensor]:
        """An expert's tensors (new tensors, slot layout names) from its compressed bytes, with the reference."""
        packed = self.layout.unpack(src)
        out = {}
        for spec in self.slot_layout.specs:
            if spec.name in self.compressed:
                out[spec.name] = dequantize(self._parts(packed, spec.name), self.fmt, spec.shape, spec.dtype)
            else:
                out[spec.name] = packed[spec.name].clone()
        return out

    def decode_layer(self, store, layer: int) -> dict[str, torch.Tensor]:
        """A layer's experts from a host store in the compressed layout: name -> [E, *shape] (new tensors)."""
        experts = [self.decode_tensors(store[(layer, e)]) for e in range(store.num_experts)]
        return {name: torch.stack([x[name] for x in experts]) for name in experts[0]}

    @staticmethod
    def _parts(packed: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        return {k[len(name):]: v for k, v in packed.items() if k.startswith(name + ".q")}


def make_codec(compression, layout: ExpertLayout) -> ExpertCodec | None:
    """`compression` None/"none" -> None; "int8", "int4", "int4-g128" or a QuantFormat -> a codec."""
    if compression is None or compression == "none":
        return None
    fmt = compression if isinstance(compression, QuantFormat) else QuantFormat.parse(compression)
    return ExpertCodec(layout, fmt)

"""Compressed experts (opt-in): the layout the host store *and the device slots* hold, and how it is read.

With compression every expert lives in a *compressed layout* (int8 or int4 matrices plus scales,
`specmoe.kernels.quant`) in the host store, in flight over PCIe and in its cache slot: a swap is one copy of
the compressed bytes straight into the slot, and a slot costs `layout.nbytes` (2-4x less than bf16), so a
memory budget holds 2-4x more experts. Compute reads the slots as they are:

* the fused experts kernel (`compute="triton"`, or "auto" on CUDA) takes the pool's `QuantizedStack`s and
  dequantizes in registers;
* elsewhere (layers the kernel does not support, CPU without Triton) the routed slots are dequantized on the
  fly into a small scratch in the experts' own layout and the model's implementation runs on it
  (`SlotPool.gather`, `SlotPool.expert_views`).

Compression changes numerics: the model computes with quantize-dequantized experts. The originals are not
kept, so `unwrap()` gives back the dequantized experts (with a warning).

`PrequantCodec` is the same interface for experts that arrive quantized in their publisher's format (MXFP4,
block-scaled FP8, GPTQ int4: `kernels.prequant`): their bytes as published are the store's, the copies' and
the slots' layout; the fused kernel reads them in place (`PrequantStack`, dequantized in registers); elsewhere the
routed slots are dequantized on use (PyTorch reference), as do the host experts (misses="host"/"auto") and
`unwrap()`.
"""

# Shape legend: L MoE layers, E experts, n slots, B bytes per expert (uncompressed layout), Bc compressed

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..kernels import prequant
from ..kernels.prequant import PrequantFormat
from ..kernels.quant import QuantFormat, QuantizedStack, compressible, dequantize, dequantize_into, quantize
from .adapters import ExpertTensorSpec
from .store import ExpertLayout


class ExpertCodec:
    """Encode an expert's tensors into the compressed layout; read compressed bytes back.

    Args:
        layout: the uncompressed layout of one expert (the model's own tensors).
        fmt: the compression format.

    Attributes:
        layout: the compressed layout (what the host store and every slot hold), `layout.nbytes` = Bc.
        slot_layout: the uncompressed layout (what a dequantized scratch holds), `slot_layout.nbytes` = B.
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
        self._specs = {s.name: s for s in layout.specs}

    @property
    def ratio(self) -> float:
        """Bytes of an uncompressed expert over bytes of a compressed one (B / Bc)."""
        return self.slot_layout.nbytes / self.layout.nbytes

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An expert's tensors (uncompressed names) -> its compressed tensors (compressed layout names)."""
        out = {}
        for spec in self.slot_layout.specs:
            t = tensors[spec.name]
            if spec.name in self.compressed:
                out.update({spec.name + sfx: part for sfx, part in quantize(t, self.fmt).items()})
            else:
                out[spec.name] = t
        return out

    def weights(self, views: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | QuantizedStack]:
        """Compressed views [N, ...] (e.g. a slot pool's) -> name -> QuantizedStack of N matrices for the
        compressed tensors, the view itself for the others. No copy."""
        out = {}
        for spec in self.slot_layout.specs:
            if spec.name in self.compressed:
                out[spec.name] = QuantizedStack.from_parts(self._parts(views, spec.name), self.fmt, spec.shape,
                                                           spec.dtype)
            else:
                out[spec.name] = views[spec.name]
        return out

    def decode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Dequantize compressed buffers rows [n, Bc] into a new scratch [n, B] (uncompressed layout), on
        rows' device and the current stream (PyTorch ops, batched over n)."""
        out = torch.empty(rows.shape[0], self.slot_layout.nbytes, dtype=torch.uint8, device=rows.device)
        dst = self.slot_layout.views(out)
        for name, w in self.weights(self.layout.views(rows)).items():
            dst[name].copy_(w.dequantize() if isinstance(w, QuantizedStack) else w)
        return out

    def decode(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Dequantize one expert: dst [B] uint8 (uncompressed layout) from src [Bc] uint8, same device (the
        dequantize kernel where Triton runs, else the PyTorch reference)."""
        packed = self.layout.unpack(src)
        slot = self.slot_layout.unpack(dst)
        for name, view in slot.items():
            if name in self.compressed:
                dequantize_into(view, self._parts(packed, name), self.fmt)
            else:
                view.copy_(packed[name])

    def decode_tensors(self, src: torch.Tensor) -> dict[str, torch.Tensor]:
        """An expert's tensors (new tensors, uncompressed names) from its compressed bytes, with the reference."""
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
    def _parts(packed: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        return {k[len(name):]: v for k, v in packed.items() if k.startswith(name + ".q")}


class PrequantCodec:
    """Experts in a publisher's format (`kernels.prequant`): the layout their parts take, and how to read them.

    Args:
        layout: the experts' own (dequantized) layout, what the model computes with.
        fmt: the publisher's format.
        transposed: the model holds its expert matrices [in, out] (gpt-oss), the formats hold [out, in].

    Attributes:
        layout: the published layout (store, copies, slots): each 2-D weight ``w`` as its parts (``w_blocks`` and
            ``w_scales``, ``w`` and ``w_scale_inv``, ``w.qweight`` ...), other tensors (biases) as they are.
        slot_layout: the dequantized layout.
    """

    def __init__(self, layout: ExpertLayout, fmt: PrequantFormat, transposed: bool = False):
        self.slot_layout, self.fmt, self.transposed = layout, fmt, transposed
        self.compressed = {s.name for s in layout.specs if len(s.shape) == 2 and s.dtype.is_floating_point}
        if not self.compressed:
            raise ValueError(f"{fmt} experts need 2-D floating-point expert weights; this model's experts have none")
        specs = []
        for spec in layout.specs:
            if spec.name in self.compressed:
                n, k = self._nk(spec)
                specs += [ExpertTensorSpec(spec.name + sfx, shape, dtype) for sfx, (shape, dtype) in fmt.parts(n, k).items()]
            else:
                specs.append(spec)
        self.layout = ExpertLayout(tuple(specs))
        self._suffixes = fmt.suffixes

    def _nk(self, spec) -> tuple[int, int]:
        return tuple(spec.shape[::-1]) if self.transposed else tuple(spec.shape)

    @property
    def ratio(self) -> float:
        return self.slot_layout.nbytes / self.layout.nbytes

    def parts_of(self, name: str) -> list[str]:
        """Names of the published tensors that make the model tensor `name` (itself when not quantized)."""
        return [name + sfx for sfx in self._suffixes] if name in self.compressed else [name]

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An expert's model tensors -> its published parts (the reference quantizers; a checkpoint's own parts
        are read as they are instead)."""
        out = {}
        for spec in self.slot_layout.specs:
            t = tensors[spec.name]
            if spec.name in self.compressed:
                w = t.T if self.transposed else t  # [N, K]
                out.update({spec.name + sfx: part for sfx, part in prequant.quantize(w.float().cpu(), self.fmt).items()})
            else:
                out[spec.name] = t
        return out

    def weights(self, views: Mapping[str, torch.Tensor]) -> dict:
        """Published views [S, ...] (a slot pool's) -> name -> `PrequantStack` of S matrices [out, in] (gpt-oss's
        transposed experts too) for the quantized tensors, the view itself for the others (biases): what the
        fused kernel reads, no copy."""
        return {spec.name: prequant.PrequantStack(self.fmt, self._nk(spec), spec.dtype,
                                                  {sfx: views[spec.name + sfx] for sfx in self._suffixes})
                if spec.name in self.compressed else views[spec.name] for spec in self.slot_layout.specs}

    def _dequantize(self, packed: Mapping[str, torch.Tensor], spec) -> torch.Tensor:
        w = self.fmt.dequantize({sfx: packed[spec.name + sfx] for sfx in self._suffixes}, spec.dtype)  # [..., N, K]
        return w.transpose(-1, -2) if self.transposed else w

    def decode_tensors(self, src: torch.Tensor) -> dict[str, torch.Tensor]:
        """An expert's model tensors (new tensors) from its published bytes [Bc]."""
        packed = self.layout.unpack(src)
        return {s.name: (self._dequantize(packed, s).contiguous() if s.name in self.compressed
                         else packed[s.name].clone()) for s in self.slot_layout.specs}

    def decode(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Dequantize one expert: dst [B] uint8 (model layout) from src [Bc] uint8, same device."""
        self.slot_layout.pack(dst, self.decode_tensors(src))

    def decode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Dequantize published buffers rows [n, Bc] into a new scratch [n, B] (model layout), on rows' device."""
        out = torch.empty(rows.shape[0], self.slot_layout.nbytes, dtype=torch.uint8, device=rows.device)
        dst = self.slot_layout.views(out)
        for i in range(rows.shape[0]):  # one expert at a time: GPTQ's g_idx differs per expert
            packed = self.layout.unpack(rows[i])
            for spec in self.slot_layout.specs:
                dst[spec.name][i].copy_(self._dequantize(packed, spec) if spec.name in self.compressed
                                        else packed[spec.name])
        return out

    def decode_layer(self, store, layer: int) -> dict[str, torch.Tensor]:
        """A layer's experts from a host store in the published layout: name -> [E, *shape] (new tensors)."""
        experts = [self.decode_tensors(store[(layer, e)]) for e in range(store.num_experts)]
        return {name: torch.stack([x[name] for x in experts]) for name in experts[0]}


def make_codec(compression, layout: ExpertLayout, transposed: bool = False) -> ExpertCodec | PrequantCodec | None:
    """`compression` None/"none" -> None; "int8", "int4", "int4-g128" or a QuantFormat -> a codec; a publisher's
    format ("mxfp4", "fp8-b128", "gptq-int4-g128" or a PrequantFormat) -> a `PrequantCodec` (`transposed`: the
    model's expert matrices are [in, out])."""
    if compression is None or compression == "none":
        return None
    pre = compression if isinstance(compression, PrequantFormat) else \
        None if isinstance(compression, QuantFormat) else PrequantFormat.parse(compression)
    if pre is not None:
        return PrequantCodec(layout, pre, transposed)
    fmt = compression if isinstance(compression, QuantFormat) else QuantFormat.parse(compression)
    return ExpertCodec(layout, fmt)

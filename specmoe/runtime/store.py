"""Host-side home of every expert: one contiguous byte buffer per expert, pinned when CUDA is present.

The store is a Mapping ``(layer, expert) -> uint8 buffer [nbytes]``; the same byte layout is used by the
GPU slot pool, so a swap is a single copy of one buffer. Backends differ only in where the bytes live.
"""

# Shape legend: L MoE layers, E experts, N buffers, B bytes per expert (padded)

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import torch

from ..kernels.host.experts import advise_huge_pages
from .adapters import ExpertTensorSpec

logger = logging.getLogger(__name__)

ALIGN = 256  # bytes; every tensor of an expert starts at a multiple of this (vectorised copies, grouped_mm)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class ExpertLayout:
    """Byte layout of one expert: where each of its tensors sits inside its buffer."""

    def __init__(self, specs: tuple[ExpertTensorSpec, ...]):
        if not specs:
            raise ValueError("an expert needs at least one tensor")
        self.specs = specs
        self.offsets: dict[str, int] = {}
        offset = 0
        for spec in specs:
            self.offsets[spec.name] = offset
            offset = _align(offset + spec.nbytes)
        self.nbytes = offset  # B, padded

    def views(self, buffers: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into buffers [N, B] uint8: name -> [N, *shape] (strided over N, no copy)."""
        if buffers.dtype != torch.uint8 or buffers.dim() != 2 or buffers.shape[1] != self.nbytes:
            raise ValueError(f"expected uint8 buffers [N, {self.nbytes}], got {buffers.dtype} {tuple(buffers.shape)}")
        out = {}
        for spec in self.specs:
            start = self.offsets[spec.name]
            raw = buffers[:, start : start + spec.nbytes]  # [N, nbytes]
            out[spec.name] = raw.view(spec.dtype).view(buffers.shape[0], *spec.shape)
        return out

    def unpack(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into one expert's buffer [B]."""
        return {name: v[0] for name, v in self.views(buffer.view(1, -1)).items()}

    def pack(self, buffer: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy an expert's tensors (any device) into its buffer [B]."""
        views = self.unpack(buffer)
        missing = set(views) - set(tensors)
        if missing:
            raise ValueError(f"expert tensors missing: {sorted(missing)}")
        for name, view in views.items():
            src = tensors[name]
            if tuple(src.shape) != tuple(view.shape):
                raise ValueError(f"expert tensor {name}: expected shape {tuple(view.shape)}, got {tuple(src.shape)}")
            view.copy_(src.to(view.dtype))


def pin_tensor(t: torch.Tensor) -> bool:
    """Page-lock a CPU tensor's memory in place (cudaHostRegister). Returns whether it is pinned.

    Registering avoids the caching host allocator, which rounds each pinned allocation up to a power of two.
    """
    if not torch.cuda.is_available() or t.numel() == 0:
        return False
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
    if err != 0:
        logger.warning("cudaHostRegister failed (error %d): experts stay in pageable memory; copies will be "
                       "synchronous and slower", err)
        return False
    return True


def unpin_tensor(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class _ExpertKeys(Mapping):
    """A mapping over every (layer, expert) of `num_layers` x `num_experts`."""

    num_layers: int
    num_experts: int

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((layer, e) for layer in range(self.num_layers) for e in range(self.num_experts))

    def __len__(self) -> int:
        return self.num_layers * self.num_experts


class HostStore(_ExpertKeys):
    """Every expert of every MoE layer in one host arena [L*E, B]; ``store[(layer, e)]`` is a [B] buffer."""

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int):
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts
        # Untouched pages cost nothing until written, so filling layer by layer while the model's own
        # expert tensors are freed keeps the host's peak memory near one copy of the experts.
        self.arena = torch.empty(num_layers * num_experts, layout.nbytes, dtype=torch.uint8)  # [L*E, B]
        advise_huge_pages(self.arena)  # before the first write: streaming experts from 4 KiB pages is TLB-bound
        self.pinned = False

    def _row(self, key: tuple[int, int]) -> int:
        layer, expert = key
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise KeyError(key)
        return layer * self.num_experts + expert

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        return self.arena[self._row(key)]

    @property
    def nbytes(self) -> int:
        return self.arena.numel()

    def write(self, key: tuple[int, int], tensors: Mapping[str, torch.Tensor]) -> None:
        self.layout.pack(self[key], tensors)

    def expert(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Typed views of one expert's tensors (no copy)."""
        return self.layout.unpack(self[key])

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """A layer's experts as stacked typed views: name -> [E, *shape] (strided, no copy)."""
        rows = self.arena[layer * self.num_experts : (layer + 1) * self.num_experts]
        return self.layout.views(rows)

    def pin(self) -> None:
        if not self.pinned:
            self.pinned = pin_tensor(self.arena)

    def close(self) -> None:
        if self.pinned:
            unpin_tensor(self.arena)
            self.pinned = False


class FileStore(_ExpertKeys):
    """The `host_store="mmap"` backend: every expert stays in the checkpoint files, and the OS page cache is the
    RAM tier. ``store[(layer, e)]`` reads the expert's byte ranges (`os.preadv`, nothing mapped, so the
    process's resident memory does not grow with the experts it has touched) into a new [B] buffer laid out as
    `layout`; copies into cache slots read through a bounded staging ring instead (`staging`: pinned on CUDA,
    prefetches read ahead on worker threads).

    Args:
        ranges: (layer, expert) -> per tensor of `layout.specs`, the [(file, offset, nbytes)] that make it.
    """

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, checkpoint, ranges: dict):
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.checkpoint = checkpoint
        self.ranges = ranges
        self.pinned = False
        self._rings: list = []

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        if key not in self.ranges:
            raise KeyError(key)
        buffer = torch.empty(self.layout.nbytes, dtype=torch.uint8)  # [B]
        self.read_into(key, buffer)
        return buffer

    def read_into(self, key: tuple[int, int], buffer: torch.Tensor) -> None:
        for spec, parts in zip(self.layout.specs, self.ranges[key]):
            at = self.layout.offsets[spec.name]
            for file, offset, nbytes in parts:
                self.checkpoint.read_range(file, offset, buffer[at : at + nbytes])
                at += nbytes

    @property
    def nbytes(self) -> int:
        return 0  # host memory held: none (the files and the page cache hold the experts)

    def expert(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self.layout.unpack(self[key])

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """A layer's experts read into one new [E, B] buffer, as typed views name -> [E, *shape]."""
        rows = torch.empty(self.num_experts, self.layout.nbytes, dtype=torch.uint8)  # [E, B]
        for e in range(self.num_experts):
            self.read_into((layer, e), rows[e])
        return self.layout.views(rows)

    def staging(self, engine, pinned: bool = False, size: int = 8, workers: int = 2):
        """The bounded ring copies read through (`runtime.staging.StagingRing`; pinned on CUDA), closed with
        the store."""
        from .staging import StagingRing

        ring = StagingRing(self, engine, size=size, pinned=pinned, workers=workers)
        self._rings.append(ring)
        return ring

    def pin(self) -> None:
        pass  # copies go through a staging ring, pinned on CUDA (`staging`)

    def close(self) -> None:
        for ring in self._rings:
            ring.close()
        self._rings.clear()
        self.checkpoint.close()

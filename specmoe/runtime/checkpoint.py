"""Safetensors checkpoints read tensor by tensor, and where each expert's bytes are in them.

`SafetensorsCheckpoint` parses the shards' headers (`model.safetensors.index.json` or every `*.safetensors`) and
reads any tensor, or any byte range of one, with `os.preadv` into memory the caller owns: nothing is mapped,
so reading a tensor costs that tensor's bytes and the OS page cache keeps the file.

`ExpertPlan` maps a transformers model's fused expert parameters (`experts.gate_up_proj [E, 2I, H]`, ...) to the
checkpoint keys they come from, with transformers' own key conversions (`rename_source_key` over the model's
`get_model_conversion_mapping`): the hub's per-expert keys (`experts.3.gate_proj.weight`, merged and
concatenated), or fused keys stored as they are. An expert whose tensors are plain byte ranges of the files
(dim-0 slices of fused tensors, dim-0 concatenations of per-expert ones, same dtype) is "direct": a copy can be
served straight from the files. Anything else (transposes, other concatenations, a dtype change) is built with
tensor ops, expert by expert.
"""

# Shape legend: E experts, I intermediate, H hidden, B bytes per expert (padded)

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """One tensor in a shard: the file, dtype, shape and absolute byte offset of its data."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (for preadv)."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


class SafetensorsCheckpoint:
    """The safetensors shards of a checkpoint directory.

    Raises:
        FileNotFoundError: no safetensors weights (e.g. only pickled .bin files, which specmoe does not read).
        ValueError: a malformed header or an unsupported dtype.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            files = sorted({self.directory / f for f in weight_map.values()})
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.directory} has no safetensors weights (model.safetensors or {INDEX}); "
                                    "specmoe reads safetensors only: re-save the model with save_pretrained")
        self.entries: dict[str, Entry] = {}
        self._fds: dict[Path, int] = {}
        self._open_lock = threading.Lock()
        for f in files:
            self._read_header(f)

    def _read_header(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {INDEX} but missing")
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        base = 8 + size
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}, which specmoe cannot read")
            start, end = info["data_offsets"]
            self.entries[key] = Entry(path, DTYPES[info["dtype"]], tuple(info["shape"]), base + start, end - start)

    def keys(self):
        return self.entries.keys()

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._open_lock:  # read-ahead workers call this too
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_range(self, file: Path, offset: int, out: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor `out` with the bytes of `file` from `offset`."""
        view = _as_bytes(out)
        done = 0
        while done < len(view):
            n = os.preadv(self._fd(file), [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{file}: unexpected end of file at byte {offset + done}")
            done += n

    def read(self, key: str) -> torch.Tensor:
        """One tensor, in a new CPU tensor of its own."""
        e = self.entries[key]
        out = torch.empty(e.shape, dtype=e.dtype)
        if e.nbytes:
            self.read_range(e.file, e.start, out)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# ---- where the experts are --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """A source of one expert tensor: checkpoint key, and the expert's index into it (fused) or None."""

    key: str
    index: int | None


@dataclass
class TensorRecipe:
    """How one model expert parameter (all E experts) is made from checkpoint tensors."""

    sources: list[dict[int, str]] | None  # per-expert keys: per source pattern, expert -> key
    fused_key: str | None  # or one tensor [E, ...] stored as the model holds it
    cat_dim: int | None  # per-expert concatenation dim of the sources
    transpose: tuple[int, int] | None  # per-expert transpose after concatenation


def _conversions(model: nn.Module):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    try:
        mapping = get_model_conversion_mapping(model)
    except Exception as err:  # noqa: BLE001 - a model class transformers has no mapping for
        logger.info("no conversion mapping for %s (%s): keys are read as they are", type(model).__name__, err)
        mapping = []
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    return renamings, converters


def _per_expert_ops(converter) -> tuple[int | None, tuple[int, int] | None]:
    """(concatenation dim, transpose dims) of one expert, from a converter's operations on the stacked [E, ...]."""
    cat_dim, transpose = None, None
    for op in converter.operations:
        name = type(op).__name__
        if name == "MergeModulelist" and getattr(op, "dim", 0) == 0:
            continue
        if name == "Concatenate" and op.dim >= 1 and transpose is None:
            cat_dim = op.dim - 1
        elif name == "Transpose" and op.dim0 >= 1 and op.dim1 >= 1:
            transpose = (op.dim0 - 1, op.dim1 - 1)
        else:
            raise NotImplementedError(f"conversion {name}{vars(op)} of {converter.target_patterns}")
    return cat_dim, transpose


class ExpertPlan:
    """For every MoE layer's fused expert parameters: the checkpoint tensors they come from.

    Args:
        checkpoint: the shards.
        model: the model (on the meta device is enough), to learn transformers' conversions and its keys.
        expert_params: model key of each expert parameter, e.g. "model.layers.0.mlp.experts.gate_up_proj".

    Raises:
        NotImplementedError: a conversion specmoe does not replay (the message names it).
        KeyError: a parameter the checkpoint does not hold.
    """

    def __init__(self, checkpoint: SafetensorsCheckpoint, model: nn.Module, expert_params: list[str]):
        from transformers.core_model_loading import rename_source_key  # 5.17 has no apply_renamings

        self.checkpoint = checkpoint
        renamings, converters = _conversions(model)
        meta_keys = dict.fromkeys(model.state_dict().keys(), True)
        wanted = set(expert_params)
        self.plain: dict[str, str] = {}  # model key -> checkpoint key, one to one
        per_expert: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
        converter_of: dict[str, object] = {}
        for ckey in checkpoint.keys():
            model_key, pattern = rename_source_key(ckey, renamings, converters, model.base_model_prefix, meta_keys)
            if pattern is None:
                self.plain[model_key] = ckey
                continue
            converter = next(c for c in converters if pattern in c.source_patterns)
            regex = re.escape(pattern).replace(r"\*", r"(\d+)") + "$"
            renamed, _ = rename_source_key(ckey, renamings, [])  # the renamings alone, before any converter
            m = re.search(regex, renamed)
            if m is None or not m.groups():
                self.plain[model_key] = ckey  # a converter without an expert index: not an expert tensor
                continue
            per_expert[model_key][pattern][int(m.group(1))] = ckey
            converter_of[model_key] = converter
        self.recipes: dict[str, TensorRecipe] = {}
        for key in expert_params:
            if key in self.plain:
                self.recipes[key] = TensorRecipe(None, self.plain[key], None, None)
            elif key in per_expert:
                converter = converter_of[key]
                cat_dim, transpose = _per_expert_ops(converter)
                sources = [per_expert[key][p] for p in converter.source_patterns if p in per_expert[key]]
                self.recipes[key] = TensorRecipe(sources, None, cat_dim if len(sources) > 1 else None, transpose)
            else:
                raise KeyError(f"the checkpoint in {checkpoint.directory} has no tensors for {key}")
        self.nonexpert = {k: v for k, v in self.plain.items() if k not in wanted}

    def pieces(self, key: str, e: int) -> list[Piece]:
        r = self.recipes[key]
        if r.fused_key is not None:
            return [Piece(r.fused_key, e)]
        return [Piece(src[e], None) for src in r.sources]

    def direct_ranges(self, key: str, e: int, shape: tuple[int, ...], dtype: torch.dtype):
        """[(file, offset, nbytes)] whose bytes, concatenated, are expert e's tensor; None if not so stored."""
        r = self.recipes[key]
        if r.transpose is not None or (r.cat_dim not in (None, 0)):
            return None
        out, numel = [], 0
        for piece in self.pieces(key, e):
            entry = self.checkpoint.entries[piece.key]
            if entry.dtype != dtype:
                return None
            if piece.index is None:
                out.append((entry.file, entry.start, entry.nbytes))
                numel += entry.nbytes // dtype.itemsize
            else:
                per = entry.nbytes // entry.shape[0]
                if tuple(entry.shape[1:]) != tuple(shape):
                    return None
                out.append((entry.file, entry.start + piece.index * per, per))
                numel += per // dtype.itemsize
        n = 1
        for d in shape:
            n *= d
        return out if n == numel else None

    def expert_tensor(self, key: str, e: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Expert e's tensor, built from the checkpoint (a new CPU tensor)."""
        r = self.recipes[key]
        parts = []
        for piece in self.pieces(key, e):
            if piece.index is None:
                parts.append(self.checkpoint.read(piece.key))
            else:  # one expert's slice of a fused tensor
                entry = self.checkpoint.entries[piece.key]
                part = torch.empty(entry.shape[1:], dtype=entry.dtype)
                self.checkpoint.read_range(entry.file, entry.start + piece.index * (entry.nbytes // entry.shape[0]),
                                           part)
                parts.append(part)
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=r.cat_dim)
        if r.transpose is not None:
            t = t.transpose(*r.transpose)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{key} expert {e}: the checkpoint gives shape {tuple(t.shape)}, the model expects "
                             f"{tuple(shape)}")
        return t.to(dtype)

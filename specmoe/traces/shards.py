"""The on-disk format of routing traces: safetensors shards plus a JSON manifest, written atomically.

A trace directory holds

* ``shard-00000.safetensors``, ...: per token per MoE layer the top-k expert ids (int16, primary expert
  first) and routing weights (fp16), the hidden state entering the MoE layers asked for (fp16), and the
  sequence boundaries inside the shard. The metadata names the format and the geometry, so a foreign or
  mismatched shard is refused with its path in the message.
* ``routers.safetensors`` (optional): each MoE layer's router weight [E, H] (and bias), so that pre-gate
  baselines and router-initialised predictors can be built from the traces alone.
* ``manifest.json``, written last: model, geometry L/E/k/H, dtype, text source, hidden layers, and the list
  of shards with their token and sequence counts. A directory without one is an unfinished collection.

No pickle anywhere: tensors go through safetensors, everything else through JSON.
"""

# Shape legend: N tokens in a shard, S sequences in a shard, L MoE layers, k top-k, H hidden, E experts

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..geometry import MoEGeometry
from ..runtime.safetensors_header import contained
from ..io import read_json, read_safetensors, write_json, write_safetensors
from .routing import Routing

logger = logging.getLogger(__name__)

SHARD_FORMAT = "specmoe-routing-trace"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ROUTERS_NAME = "routers.safetensors"


TraceShard = Routing  # a shard is routing of whole sequences, with weights (every token its own pass)


def write_shard(path, shard: Routing, geometry: MoEGeometry) -> None:
    """Write one shard atomically (a reader sees no file or the whole file).

    Raises:
        ValueError: the shard's tensors do not match `geometry`.
    """
    shard.check(geometry, str(path))
    id_dtype = torch.int16 if geometry.num_experts < 2**15 else torch.int32
    tensors = {
        "ids": shard.ids.to(id_dtype),
        "weights": shard.weights.to(torch.float16),
        "offsets": shard.offsets.to(torch.int64),
    }
    tensors.update({f"hidden.{layer}": h.to(torch.float16) for layer, h in sorted(shard.hidden.items())})
    metadata = {"format": SHARD_FORMAT, "format_version": str(FORMAT_VERSION),
                "geometry": json.dumps(geometry.to_dict())}
    write_safetensors(path, tensors, metadata=metadata)


def read_shard(path, geometry: MoEGeometry | None = None) -> Routing:
    """Read and check one shard written by `write_shard`.

    Args:
        path: the shard file.
        geometry: the geometry the shard must have (default: the one it declares).

    Raises:
        FileNotFoundError: no such file. ValueError: truncated, not a specmoe trace shard, a newer format,
        or a geometry other than `geometry`; the message names the file.
    """
    path = Path(path)
    tensors, meta = read_safetensors(path, what="trace shard", with_metadata=True)
    if meta.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a specmoe routing-trace shard (metadata format={meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} has trace format {meta['format_version']}, newer than this specmoe "
                         f"({FORMAT_VERSION}); upgrade specmoe")
    try:
        declared = MoEGeometry.from_dict(json.loads(meta["geometry"]))
    except (KeyError, json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{path}: unreadable geometry in the shard metadata ({err})") from None
    if geometry is not None:
        geometry.check_matches(declared, what=f"trace shard {path}")
    missing = [name for name in ("ids", "weights", "offsets") if name not in tensors]
    if missing:
        raise ValueError(f"trace shard {path} lacks tensors {missing}")
    try:
        shard = Routing(
            ids=tensors["ids"].long(),
            weights=tensors["weights"].float(),
            seq_offsets=tensors["offsets"].long(),
            hidden={int(name.split(".", 1)[1]): t for name, t in tensors.items() if name.startswith("hidden.")},
        )
    except ValueError as err:
        raise ValueError(f"trace shard {path} is malformed: {err}") from None
    shard.check(declared, str(path))
    return shard


@dataclass(frozen=True)
class ShardInfo:
    file: str
    tokens: int
    sequences: int


@dataclass(frozen=True)
class TraceManifest:
    """What a trace directory holds.

    Args:
        model: the model's name or path.
        geometry: routing geometry L/E/k/H.
        dtype: the dtype the model ran in (e.g. "float32").
        source: where the text came from (paths, file counts, window length...), free-form JSON.
        hidden_layers: MoE layers whose entering hidden states were kept.
        shards: the shard files, in order.
        routers: file name of the saved router weights, or None.
    """

    model: str
    geometry: MoEGeometry
    dtype: str
    source: dict
    hidden_layers: tuple[int, ...] = ()
    shards: tuple[ShardInfo, ...] = ()
    routers: str | None = None

    def __post_init__(self):
        bad = [layer for layer in self.hidden_layers if not 0 <= layer < self.geometry.num_layers]
        if bad:
            raise ValueError(f"hidden_layers {bad} are not MoE layers of a model with "
                             f"{self.geometry.num_layers}; use layers 0..{self.geometry.num_layers - 1}")

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def num_sequences(self) -> int:
        return sum(s.sequences for s in self.shards)

    def to_dict(self) -> dict:
        return {
            "specmoe_trace": FORMAT_VERSION,
            "model": self.model,
            "geometry": self.geometry.to_dict(),
            "dtype": self.dtype,
            "source": self.source,
            "hidden_layers": list(self.hidden_layers),
            "routers": self.routers,
            "tokens": self.num_tokens,
            "sequences": self.num_sequences,
            "shards": [vars(s) for s in self.shards],
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> "TraceManifest":
        if not isinstance(data, dict) or "specmoe_trace" not in data:
            raise ValueError(f"{where} is not a specmoe trace manifest (no 'specmoe_trace' key)")
        if int(data["specmoe_trace"]) > FORMAT_VERSION:
            raise ValueError(f"{where} has trace format {data['specmoe_trace']}, newer than this specmoe")
        try:
            return cls(
                model=str(data["model"]),
                geometry=MoEGeometry.from_dict(data["geometry"]),
                dtype=str(data["dtype"]),
                source=dict(data.get("source") or {}),
                hidden_layers=tuple(int(x) for x in data.get("hidden_layers", ())),
                shards=tuple(ShardInfo(_inside(s["file"], where), int(s["tokens"]), int(s["sequences"]))
                             for s in data["shards"]),
                routers=_inside(data["routers"], where) if data.get("routers") is not None else None,
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where} is missing or has a malformed field ({err!r})") from None


def _inside(name, where: str) -> str:
    """A file name from a manifest, which must name a file inside the trace directory (never `..` or absolute)."""
    contained(Path(where).parent, name, where)
    return name


def read_manifest(directory) -> TraceManifest:
    """Read `directory/manifest.json`.

    Raises:
        FileNotFoundError: no manifest (not a trace directory, or a collection that did not finish).
        ValueError: the manifest is corrupt.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no trace manifest at {path}: not a trace directory, or its collection did not "
                                "finish (the manifest is written last); run `specmoe collect` again")
    return TraceManifest.from_dict(read_json(path, what="trace manifest"), where=str(path))


class TraceWriter:
    """Accumulate sequences and write them as shards of about `shard_tokens` tokens, then the manifest.

    Example:
        with TraceWriter(out, manifest) as w:
            w.add(ids, weights, hidden)      # one sequence: ids/weights [n, L, k], hidden {layer: [n, H]}

    Args:
        directory: where to write; an existing trace there is replaced only with `overwrite`.
        manifest: model, geometry, dtype, source and hidden layers (its shards are filled in here).
        shard_tokens: target tokens per shard.
        overwrite: replace a trace already in `directory`.

    Raises:
        FileExistsError: `directory` already holds a trace and `overwrite` is False.
    """

    def __init__(self, directory, manifest: TraceManifest, shard_tokens: int = 1 << 16, overwrite: bool = False):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.directory = Path(directory)
        old = sorted(self.directory.glob("shard-*.safetensors")) + [self.directory / MANIFEST_NAME]
        if any(p.exists() for p in old):
            if not overwrite:
                raise FileExistsError(f"{self.directory} already holds a routing trace; pass overwrite=True "
                                      "to replace it, or choose another directory")
            for p in old:  # the manifest first: a crash midway leaves an unfinished (refused) directory
                p.unlink(missing_ok=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest
        self.shard_tokens = shard_tokens
        self._shards: list[ShardInfo] = []
        self._pending: list[tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]] = []
        self._pending_tokens = 0

    def add(self, ids: torch.Tensor, weights: torch.Tensor, hidden: dict[int, torch.Tensor] | None = None) -> None:
        """Add one sequence: ids/weights [n, L, k], hidden {layer: [n, H]} for the manifest's hidden layers."""
        hidden = hidden or {}
        if set(hidden) != set(self.manifest.hidden_layers):
            raise ValueError(f"hidden states given for layers {sorted(hidden)}, the manifest promises "
                             f"{list(self.manifest.hidden_layers)}")
        if ids.shape[0] == 0:
            raise ValueError("a sequence needs at least one token")
        self._pending.append((ids.cpu(), weights.cpu(), {k: v.cpu() for k, v in hidden.items()}))
        self._pending_tokens += ids.shape[0]
        if self._pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Write the pending sequences as one shard."""
        if not self._pending:
            return
        lengths = torch.tensor([ids.shape[0] for ids, _, _ in self._pending])
        shard = Routing(
            ids=torch.cat([p[0] for p in self._pending]),
            weights=torch.cat([p[1] for p in self._pending]),
            seq_offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            hidden={layer: torch.cat([p[2][layer] for p in self._pending]) for layer in self.manifest.hidden_layers},
        )
        name = f"shard-{len(self._shards):05d}.safetensors"
        write_shard(self.directory / name, shard, self.manifest.geometry)
        self._shards.append(ShardInfo(name, shard.num_tokens, shard.num_sequences))
        logger.info("wrote %s (%d tokens, %d sequences)", name, shard.num_tokens, shard.num_sequences)
        self._pending, self._pending_tokens = [], 0

    def close(self) -> TraceManifest:
        """Write the last shard and the manifest. Returns the manifest."""
        self.flush()
        if not self._shards:
            raise ValueError(f"no sequences were added; nothing to write to {self.directory}")
        self.manifest = replace(self.manifest, shards=tuple(self._shards))
        write_json(self.directory / MANIFEST_NAME, self.manifest.to_dict())
        return self.manifest

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()


def write_routers(path, routers) -> None:
    """Save each MoE layer's router (RouterWeights: weight [E, H], bias [E] or None) as safetensors."""
    tensors = {}
    for layer, router in enumerate(routers):
        tensors[f"router.{layer}.weight"] = router.weight.float()
        if router.bias is not None:
            tensors[f"router.{layer}.bias"] = router.bias.float()
    write_safetensors(path, tensors, metadata={"format": "specmoe-routers"})

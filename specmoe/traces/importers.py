"""Import routing that other systems recorded (no hidden states) into a specmoe trace directory.

Three input formats, each read record by record and checked before anything is written:

* ``jsonl``: the interchange format, one JSON object per line, one line per token per MoE layer::

      {"seq": "prompt-7", "token": 0, "layer": 0, "experts": [3, 7], "weights": [0.61, 0.39]}

  ``seq`` (string or int) names the sequence (one prompt's prefill + decode, in token order); ``token`` is
  the 0-based position inside it; ``layer`` the 0-based MoE layer (dense layers not counted); ``experts``
  the k routed expert ids; ``weights`` (optional) their routing weights, used to put the primary expert
  first. Lines may come in any order. An optional first line ``{"specmoe_routing": 1, "model": ...,
  "num_experts": E, "hidden_size": H}`` names the model (command-line options win). A vLLM or SGLang user
  writes it from a hook on the router's top-k (e.g. one line per row of ``topk_ids`` per layer call).
* ``moe-beyond``: the CSVs of github.com/ngavhane/moe-beyond (DeepSeek-V2-Lite-Chat), one file per prompt,
  header ``Layer ID,Batch Number,Token,Activated Expert IDs``, layers 1-based, each layer's tokens in order
  (a block per layer), expert ids not in rank order, no weights. One sequence per (file, batch number).
* ``speculative-moe``: the vLLM-logger JSONL of github.com/Mario928/speculative-moe (Mixtral-8x7B-Instruct),
  records ``{"problem_id", "layer", "token_idx", "experts", "gating_probs"}``, layers 0-based.

Every sequence must have records for MoE layers 0..L-1 and, per layer, tokens 0..n-1 without gaps or
repeats; the same k everywhere. A sequence whose layers end at different tokens (the vLLM logger drops a
few final rows) is cut to the tokens every layer has (`ragged="truncate"`, with a warning) or refused.
Where no weights are given, 1/k is written for each expert and the manifest says so.
"""

# Shape legend: R records of a sequence, n tokens of a sequence, L MoE layers, k top-k, E experts

from __future__ import annotations

import csv
import itertools
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..geometry import MoEGeometry
from .shards import TraceManifest, TraceWriter

logger = logging.getLogger(__name__)

MOE_BEYOND_HEADER = ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]
RAGGED = ("truncate", "error")


@dataclass(frozen=True)
class SourceFormat:
    """What is known about a format's model when the input does not say.

    Args:
        model: model id recorded by default.
        num_experts: E of that model (None: the largest id + 1, with a warning).
        hidden_size: H of that model (None: 1, with a warning).
        layer_base: the index of the first MoE layer in the files.
        ranked: whether expert ids come primary first (or carry weights that rank them).
    """

    model: str
    num_experts: int | None
    hidden_size: int | None
    layer_base: int
    ranked: bool


FORMATS: dict[str, SourceFormat] = {
    "jsonl": SourceFormat("unknown", None, None, 0, True),
    "moe-beyond": SourceFormat("deepseek-ai/DeepSeek-V2-Lite-Chat", 64, 2048, 1, False),
    "speculative-moe": SourceFormat("mistralai/Mixtral-8x7B-Instruct-v0.1", 8, 4096, 0, True),
}


class RoutingImportError(ValueError):
    """Input that cannot be imported; the message names the file and line."""


class _Sequence:
    """The records of one sequence, gathered in any order, then checked and laid out as [n, L, k]."""

    def __init__(self, name: str):
        self.name = name
        self.layers: list[int] = []
        self.tokens: list[int] = []
        self.ids: list[list[int]] = []
        self.weights: list[list[float]] | None = []
        self.origin: list[str] = []  # "file:line" of each record, for error messages

    def add(self, layer: int, token: int, ids: list[int], weights: list[float] | None, where: str = "") -> None:
        self.origin.append(where)
        self.layers.append(layer)
        self.tokens.append(token)
        self.ids.append(ids)
        if weights is None:
            self.weights = None
        elif self.weights is not None:
            self.weights.append(weights)

    def build(self, ragged: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """-> (ids [n, L, k] primary first where weights rank them, weights [n, L, k] or None, tokens dropped).

        Raises:
            RoutingImportError: missing layers, repeated or skipped tokens, or (ragged="error") layers of
            different lengths.
        """
        where = f"sequence {self.name!r}"
        layer = torch.tensor(self.layers)  # [R]
        token = torch.tensor(self.tokens)  # [R]
        ids = torch.tensor(self.ids, dtype=torch.long)  # [R, k]
        # Sizes come from the records (R), never from the values in them: one "token": 10**9 is a gap, not a
        # 10**9-element allocation.
        present, counts = torch.unique(layer, return_counts=True)  # [<=R] sorted layers, records per layer
        L = int(present[-1]) + 1
        if present.numel() != L:
            have = set(present.tolist())
            missing = list(itertools.islice((i for i in range(L) if i not in have), 8))
            raise RoutingImportError(f"{where}: no records for MoE layers {missing} (it has layers up to {L - 1}, "
                                     f"{self.origin[int(layer.argmax())]})")
        width = int(token.max()) + 1
        key = layer * width + token  # [R] (L <= R, so no overflow)
        uniq, inverse, per_key = torch.unique(key, return_inverse=True, return_counts=True)
        if uniq.numel() != key.numel():
            twice = (per_key[inverse] > 1).nonzero().flatten()  # records of repeated (layer, token)s
            dup = int(key[twice[0]])
            raise RoutingImportError(f"{where}: layer {dup // width} token {dup % width} appears more than once "
                                     f"({self.origin[int(twice[0])]} and {self.origin[int(twice[1])]})")
        last = torch.full((L,), -1).scatter_reduce(0, layer, token, "amax")  # [L] the last token of each layer
        gaps = (last + 1 != counts).nonzero().flatten().tolist()
        if gaps:
            lay = gaps[0]
            rows = (layer == lay).nonzero().flatten()  # this layer's records
            tokens, order = token[rows].sort()  # distinct (no repeats, checked above)
            hole = int((tokens != torch.arange(tokens.numel())).nonzero()[0])
            after = self.origin[int(rows[order[hole]])]  # the first record past the hole
            raise RoutingImportError(f"{where}: layer {lay} has no record for token {hole} but has later tokens "
                                     f"(token {int(tokens[hole])} at {after}, up to {int(last[lay])}); tokens must "
                                     "be 0..n-1 without gaps")
        n = int(counts.min())
        if int(counts.max()) != n:
            if ragged == "error":
                raise RoutingImportError(f"{where}: layers have {n}..{int(counts.max())} tokens (layer "
                                         f"{int(counts.argmin())} ends first); pass --ragged truncate to keep the "
                                         "tokens every layer has")
        keep = token < n
        dropped = int((~keep).sum())
        out = torch.full((n, L, ids.shape[1]), -1, dtype=torch.long)
        out[token[keep], layer[keep]] = ids[keep]
        if self.weights is None:
            return out, None, dropped
        w = torch.zeros(n, L, ids.shape[1])
        w[token[keep], layer[keep]] = torch.tensor(self.weights, dtype=torch.float32)[keep]
        order = w.argsort(dim=-1, descending=True, stable=True)  # primary (largest weight) first
        return out.gather(-1, order), w.gather(-1, order), dropped


class _Checker:
    """Per-record checks shared by the readers: k is the same everywhere, ids within [0, E), no repeats."""

    def __init__(self, num_experts: int | None):
        self.num_experts = num_experts
        self.k: int | None = None
        self.k_where = ""
        self.max_id = -1
        self.skipped: list[str] = []  # empty input files

    def ids(self, ids, weights, where: str) -> tuple[list[int], list[float] | None]:
        if not isinstance(ids, list) or not ids or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise RoutingImportError(f"{where}: experts must be a non-empty list of ints, got {ids!r}")
        if self.k is None:
            self.k, self.k_where = len(ids), where
        elif len(ids) != self.k:
            raise RoutingImportError(f"{where}: {len(ids)} experts, but {self.k_where} has {self.k}; every token "
                                     "and layer must route the same top-k")
        if len(set(ids)) != len(ids):
            raise RoutingImportError(f"{where}: expert ids {ids} repeat an expert")
        low, high = min(ids), max(ids)
        if low < 0 or (self.num_experts is not None and high >= self.num_experts):
            raise RoutingImportError(f"{where}: expert ids {ids} outside [0, {self.num_experts or 'E'}); "
                                     "pass --num-experts if the model has more experts")
        self.max_id = max(self.max_id, high)
        if weights is not None:
            if not isinstance(weights, list) or len(weights) != len(ids) or \
                    not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
                raise RoutingImportError(f"{where}: weights must be a list of {len(ids)} numbers, got {weights!r}")
            weights = [float(w) for w in weights]
        return ids, weights


def _int_field(record: dict, name: str, where: str, base: int = 0) -> int:
    value = record.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RoutingImportError(f"{where}: field {name!r} must be an int, got {value!r}")
    if value < base:
        raise RoutingImportError(f"{where}: {name} {value} is below {base} (the first index in this format)")
    return value - base


def _lines(path: Path, progress: bool) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text file, with a progress bar over its bytes."""
    with open(path, encoding="utf-8") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                                 desc=f"read {path.name}", disable=not progress) as bar:
        for number, line in enumerate(f, 1):
            bar.update(len(line.encode("utf-8")))
            if line.strip():
                yield number, line


def read_jsonl(paths: Sequence[Path], fmt: str, checker: _Checker,
               progress: bool = True) -> tuple[list[_Sequence], dict]:
    """(sequences of the interchange JSONL (fmt "jsonl") or the speculative-moe logger JSONL in the order they
    first appear, the header record or {})."""
    names = {"jsonl": ("seq", "token", "layer", "experts", "weights"),
             "speculative-moe": ("problem_id", "token_idx", "layer", "experts", "gating_probs")}[fmt]
    seq_key, token_key, layer_key, ids_key, weights_key = names
    base = FORMATS[fmt].layer_base
    sequences: dict[str, _Sequence] = {}
    header: dict = {}
    for path in paths:
        for number, line in _lines(path, progress):
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RoutingImportError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise RoutingImportError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if "specmoe_routing" in record:
                if fmt != "jsonl" or number != 1 or sequences:
                    raise RoutingImportError(f"{where}: a specmoe_routing header must be the first line of the "
                                             "first file")
                bad = [k for k in ("num_experts", "hidden_size") if k in record and
                       (not isinstance(record[k], int) or isinstance(record[k], bool) or record[k] < 1)]
                if bad:
                    raise RoutingImportError(f"{where}: header fields {bad} must be positive ints")
                header = record
                continue
            missing = [k for k in (seq_key, token_key, layer_key, ids_key) if k not in record]
            if missing:
                raise RoutingImportError(f"{where}: missing fields {missing} (a {fmt} record has "
                                         f"{', '.join(names)})")
            seq = record[seq_key]
            if not isinstance(seq, (str, int)) or isinstance(seq, bool):
                raise RoutingImportError(f"{where}: {seq_key} must be a string or an int, got {seq!r}")
            layer = _int_field(record, layer_key, where, base)
            token = _int_field(record, token_key, where)
            ids, weights = checker.ids(record[ids_key], record.get(weights_key), where)
            sequences.setdefault(str(seq), _Sequence(str(seq))).add(layer, token, ids, weights, where)
    return list(sequences.values()), header


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_moe_beyond(paths: Sequence[Path], checker: _Checker, progress: bool = True):
    """Sequences of MoE-Beyond CSVs: one per (file, batch number), files in natural order (prompt_2 before
    prompt_10). Each layer's rows are its tokens in order; the token text must agree across layers."""
    for path in tqdm(paths, desc="read CSVs", unit="file", disable=not progress or len(paths) < 2):
        sequences: dict[str, _Sequence] = {}
        texts: dict[tuple[str, int], list[str]] = {}  # (batch, layer) -> token texts in order
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None:
                logger.warning("%s is empty; skipped", path)
                checker.skipped.append(str(path))
                continue
            if header != MOE_BEYOND_HEADER:
                raise RoutingImportError(f"{path}:1: header {header!r} is not MoE-Beyond's {MOE_BEYOND_HEADER!r}")
            for number, row in enumerate(rows, 2):
                where = f"{path}:{number}"
                if len(row) != 4:
                    raise RoutingImportError(f"{where}: {len(row)} columns, expected 4")
                try:
                    layer, batch = int(row[0]) - 1, row[1].strip()
                    ids = json.loads(row[3])
                except ValueError:
                    raise RoutingImportError(f"{where}: unreadable layer {row[0]!r} or expert list {row[3]!r}") from None
                if layer < 0:
                    raise RoutingImportError(f"{where}: Layer ID {row[0]} is below 1 (MoE-Beyond layers are 1-based)")
                ids, _ = checker.ids(ids, None, where)
                column = texts.setdefault((batch, layer), [])
                column.append(row[2])
                name = f"{path.stem}" if batch == "0" else f"{path.stem}/batch{batch}"
                sequences.setdefault(batch, _Sequence(name)).add(layer, len(column) - 1, ids, None, where)
        if not sequences:
            raise RoutingImportError(f"{path}: no rows after the header")
        for (batch, layer), column in texts.items():
            first = texts.get((batch, 0))
            if first is not None and column[: len(first)] != first[: len(column)]:
                at = next(i for i, (a, b) in enumerate(zip(column, first)) if a != b)
                raise RoutingImportError(f"{path}: layer {layer + 1} token {at} is {column[at]!r}, layer 1 has "
                                         f"{first[at]!r}; each layer's rows must list the same tokens in order")
        yield from sequences.values()


def input_files(inputs: Sequence, fmt: str) -> list[Path]:
    """Files named by `inputs` (files, or directories: *.csv for moe-beyond, *.jsonl otherwise), in natural
    order.

    Raises:
        FileNotFoundError: a path does not exist, or a directory holds no such file.
    """
    pattern = "*.csv" if fmt == "moe-beyond" else "*.jsonl"
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(p.glob(pattern), key=_natural_key)
            if not found:
                raise FileNotFoundError(f"no {pattern} files in {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"routing input not found: {p}")
    return files


def import_routing(fmt: str, inputs: Sequence, out, *, model: str | None = None, num_experts: int | None = None,
                   hidden_size: int | None = None, dtype: str = "unknown", max_sequences: int | None = None,
                   ragged: str = "truncate", shard_tokens: int = 1 << 16, overwrite: bool = False,
                   progress: bool = True) -> TraceManifest:
    """Read routing in `fmt` from `inputs` and write a trace directory (shards + manifest, no hidden states).

    Args:
        fmt: "jsonl" (the interchange format), "moe-beyond" or "speculative-moe" (see the module docstring).
        inputs: files or directories.
        out: the trace directory to write.
        model, num_experts, hidden_size: the model's id and geometry (default: the format's model, or the
            JSONL header; E falls back to the largest id + 1 with a warning).
        dtype: the dtype the model ran in, if known.
        max_sequences: import only the first N sequences.
        ragged: "truncate" or "error" for a sequence whose layers end at different tokens.
        shard_tokens, overwrite: as for `TraceWriter`.

    Returns:
        The manifest written.

    Raises:
        RoutingImportError (a ValueError): malformed input, named by file and line or sequence.
        FileNotFoundError: an input does not exist. FileExistsError: `out` holds a trace and not `overwrite`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown routing format {fmt!r}; choose one of {sorted(FORMATS)}")
    if ragged not in RAGGED:
        raise ValueError(f"ragged must be one of {RAGGED}, got {ragged!r}")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
    spec = FORMATS[fmt]
    files = input_files(inputs, fmt)
    checker = _Checker(num_experts)
    if fmt == "moe-beyond":
        reader, header = read_moe_beyond(files, checker, progress), {}  # lazily, file by file
    else:
        reader, header = read_jsonl(files, fmt, checker, progress)
    sequences, names, dropped = [], [], 0
    for seq in reader:
        if max_sequences is not None and len(sequences) == max_sequences:
            break
        ids, weights, cut = seq.build(ragged)
        if sequences and ids.shape[1] != sequences[0][0].shape[1]:
            raise RoutingImportError(f"sequence {seq.name!r} has {ids.shape[1]} MoE layers, sequence {names[0]!r} "
                                     f"has {sequences[0][0].shape[1]}")
        if ids.shape[0] == 0:
            raise RoutingImportError(f"sequence {seq.name!r}: no token is routed at every layer")
        if cut:
            logger.warning("sequence %r: its layers end at different tokens; kept the first %d tokens, dropped %d "
                           "records", seq.name, ids.shape[0], cut)
        sequences.append((ids, weights))
        names.append(seq.name)
        dropped += cut
    if not sequences:
        raise RoutingImportError(f"no routing records in {[str(f) for f in files]}")
    model = model or header.get("model") or spec.model
    E = num_experts or header.get("num_experts") or spec.num_experts
    if E is None:
        E = checker.max_id + 1
        logger.warning("the number of experts is not given; using the largest id + 1 = %d (pass --num-experts)", E)
    elif checker.max_id >= E:
        raise RoutingImportError(f"expert id {checker.max_id} is outside [0, {E}); pass --num-experts")
    H = hidden_size or header.get("hidden_size") or spec.hidden_size
    if H is None:
        H = 1
        logger.warning("the hidden size is not given; recorded as 1 (pass --hidden-size so that predictors "
                       "trained on this trace match the model)")
    weighted = sequences[0][1] is not None and all(w is not None for _, w in sequences)
    L, k = sequences[0][0].shape[1:]
    geometry = MoEGeometry(num_layers=L, num_experts=int(E), top_k=k, hidden_size=int(H))
    source = {
        "format": fmt, "inputs": [str(p) for p in inputs], "files": len(files), "sequences": len(sequences),
        "sequence_ids": names, "hidden_states": False,
        "weights": "recorded" if weighted else "none in the input (1/k written)",
        "ids_ranked": bool(weighted or spec.ranked), "layer_base_in_input": spec.layer_base,
        "ragged": ragged, "records_dropped": dropped, "max_sequences": max_sequences,
        "empty_files_skipped": checker.skipped,
    }
    manifest = TraceManifest(model=model, geometry=geometry, dtype=dtype, source=source)
    with TraceWriter(out, manifest, shard_tokens=shard_tokens, overwrite=overwrite) as writer:
        for ids, weights in sequences:
            writer.add(ids, weights if weighted else torch.full(ids.shape, 1.0 / k))
    return writer.manifest

"""Checked reading of what names and describes safetensors files: a path inside a directory, one file's header.

Everything a file or an index says is input: a `model.safetensors.index.json` or a trace manifest names files
*inside* its directory (an absolute name or one with `..` that leaves it is refused, never opened), and a header
is believed only once its length fits the file, it parses as a JSON object, and its tensors' byte ranges lie
inside the file. Each failure is a `ValueError` (or `FileNotFoundError`) of one line that names the file.

`check_checkpoint` runs these checks over a checkpoint directory before transformers' `from_pretrained` reads
it (whose own errors are tracebacks without the file's name).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header
INDEX = "model.safetensors.index.json"


def contained(directory, name, what: str) -> Path:
    """`directory / name`, where `name` (read from a file: an index, a manifest) must stay inside `directory`.

    The check is on the name, not on where symlinks lead (a hub cache's snapshot links into its blob store).

    Raises:
        ValueError: `name` is not a string, is absolute, or climbs out with `..`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: file name {name!r} is not a non-empty string")
    if os.path.isabs(name) or Path(name).drive:
        raise ValueError(f"{what}: file {name!r} is an absolute path; only files inside {directory} are read")
    norm = os.path.normpath(name)
    if norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
        raise ValueError(f"{what}: file {name!r} points outside {directory}; only files inside it are read")
    return Path(directory) / norm


def read_header(path) -> tuple[dict, int]:
    """The header of safetensors file `path`, checked against the file's size.

    Returns:
        (header: tensor name -> {"dtype", "shape", "data_offsets"}, plus "__metadata__" if present;
         the byte offset where the data starts).

    Raises:
        FileNotFoundError: no such file. ValueError: too short, a header length past the file's end, a header
        that is not a JSON object, or a tensor whose bytes lie past the end (truncated); the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: {size} bytes, shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{path} is truncated or not a safetensors file: its header claims {n} bytes, the file "
                             f"has {size}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    base = 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            info["dtype"], tuple(info["shape"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: tensor {key!r} has a malformed header entry") from None
        if not 0 <= start <= end or base + end > size:
            raise ValueError(f"{path} is truncated: tensor {key!r} needs bytes up to {base + end}, the file has "
                             f"{size}")
    return header, base


def checkpoint_files(directory) -> list[Path]:
    """The safetensors shards of a checkpoint directory: those its index names (each inside the directory), or
    every `*.safetensors` in it. Empty when there are none."""
    directory = Path(directory)
    index = directory / INDEX
    if not index.is_file():
        return sorted(directory.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{index} is not a safetensors index ({err})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: 'weight_map' is not an object")
    return sorted({contained(directory, f, str(index)) for f in weight_map.values()})


def check_checkpoint(directory) -> None:
    """Check every safetensors shard of `directory` (names and headers; no tensor data is read).

    Raises:
        FileNotFoundError: a shard the index lists is missing. ValueError: as `contained` / `read_header`.
    """
    for f in checkpoint_files(directory):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is listed in {Path(directory) / INDEX} but missing")
        read_header(f)


def check_model_dir(directory) -> None:
    """What a command checks before transformers reads a model directory: config.json, then every shard.

    Raises:
        FileNotFoundError: no config.json, or no safetensors weights. ValueError: as `check_checkpoint`.
    """
    directory = Path(directory)
    config = directory / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{directory} is not a model directory (no config.json); pass what save_pretrained "
                                "writes, or a hub id")
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            raise ValueError("not a JSON object")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{config} is not a model config ({err})") from None
    if not checkpoint_files(directory):
        raise FileNotFoundError(f"{directory} has no safetensors weights (model.safetensors or {INDEX}); specmoe "
                                "reads safetensors only: re-save the model with save_pretrained")
    check_checkpoint(directory)

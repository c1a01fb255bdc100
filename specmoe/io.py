"""Atomic file writes and checked reads for the project's formats: JSON and safetensors, never pickle."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a finished file gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, data) -> None:
    """Write JSON atomically (a reader sees the old file or the whole new one)."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")

    _atomic(Path(path), write)


def write_text(path, text: str) -> None:
    """Write text atomically (markdown reports and the like)."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_bytes(path, data: bytes) -> None:
    """Write bytes atomically (rendered PNGs and the like)."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def read_json(path, what: str = "JSON file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err})") from None


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors atomically with safetensors (contiguous CPU copies)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path, what: str = "safetensors file", with_metadata: bool = False):
    """Read every tensor of a safetensors file (and, with `with_metadata`, its string metadata too).

    Returns:
        {name: tensor}, or ({name: tensor}, {key: str}) with `with_metadata`.

    Raises:
        FileNotFoundError: no such file. ValueError: truncated or not safetensors; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        tensors = load_file(str(path))
        if not with_metadata:
            return tensors
        with safe_open(str(path), framework="pt") as f:
            return tensors, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{what} {path} is truncated or not a safetensors file ({err})") from None

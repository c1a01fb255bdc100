"""Atomic file writes and checked reads for the project's formats: JSON and safetensors, never pickle."""

from __future__ import annotations

import json
import os
import shutil
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


def check_out_dir(path, overwrite: bool, option: str = "--out") -> None:
    """The one rule of every command that writes a directory, checked before any work: an existing `path` that
    is not an empty directory is refused unless `overwrite` (--overwrite) is given.

    Raises:
        FileExistsError: `path` is a file, or a non-empty directory and not `overwrite`.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{option} {path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{option} {path} exists and is not empty; pass --overwrite to replace what this "
                              "command writes there, or choose another directory")


def check_outputs(directory, names, overwrite: bool, option: str = "--out") -> None:
    """The rule of every command that writes named files into an output directory, checked before any work: a
    file it would write that is already there is refused unless `overwrite` (--overwrite); other files in the
    directory are left alone.

    Raises:
        FileExistsError: `directory` is a file, or holds one of `names` and not `overwrite`.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{option} {directory} is a file, not a directory")
    there = [n for n in names if (directory / n).exists()]
    if there and not overwrite:
        raise FileExistsError(f"{option} {directory} already holds {', '.join(there)}; pass --overwrite to replace "
                              "them, or choose another directory")


def check_stem(name, option: str = "--name") -> None:
    """A file stem given on the command line names files inside the output directory, never a path.

    Raises:
        ValueError: `name` is empty, '.', '..', or has a directory part.
    """
    if name is not None and (not name or Path(name).name != name or name in (".", "..")):
        raise ValueError(f"{option} {name!r} must be a plain file stem (no directories): the files go into --out")


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
    """Save tensors atomically with safetensors (contiguous CPU copies).

    Raises:
        OSError: the file could not be written (a full disk, ...); the message names it.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp):
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as err:  # safetensors reports I/O errors (ENOSPC, EFBIG) as its own type
            raise OSError(f"could not write {path}: {err}") from None

    _atomic(Path(path), write)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False


def write_directory(path, fill, replaceable=lambda p: True) -> None:
    """Write a directory atomically: `fill(tmp)` writes its files into a new directory beside `path`, which then
    takes `path`'s place in one rename (a reader, or a process killed midway, sees the old directory whole or
    the new one whole, never a mix of their files).

    Args:
        path: the directory to write.
        fill: ``fill(tmp: Path)`` writes the files.
        replaceable: ``replaceable(path) -> bool`` for an existing, non-empty `path`: whether it may be replaced.

    Raises:
        FileExistsError: `path` exists and is not a directory, or `replaceable` says no.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not replaceable(path))):
        raise FileExistsError(f"{path} exists and holds other files; choose another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        try:
            fill(tmp)
        except OSError as err:  # name the files where the user asked for them, not the temporary directory
            raise OSError(str(err).replace(str(tmp), str(path))) from None
        os.chmod(tmp, 0o777 & ~_UMASK)
        if not path.exists():
            os.rename(tmp, path)
        elif not _exchange(tmp, path):  # no atomic swap here: old aside, new in, old removed
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            tmp = old
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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

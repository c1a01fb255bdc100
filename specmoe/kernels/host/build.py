"""Build and load the host experts kernels (`experts.cpp`): compiled with g++ at first use, cached, loaded by ctypes.

One source (`experts.cpp`, with the headers it includes), three builds: ``avx512`` (AVX-512 F/BW/VL, FMA, F16C), ``avx2`` (AVX2, FMA, F16C) and ``scalar``
(portable C++, no vector flags). The one that runs is chosen at run time from the CPU's flags
(``/proc/cpuinfo``), or forced with ``SPECMOE_HOST_ISA=avx512|avx2|scalar`` (``off``: no kernel, the torch
path). Builds are cached in ``$SPECMOE_CACHE_DIR`` (default ``~/.cache/specmoe``) under ``host_kernels/``, named
by the ISA and a hash of the source, flags and compiler, and written atomically (a temporary file, then
``os.replace``), so concurrent first uses are safe. No compiler, a failed build or an unknown CPU: one log line
and `load` returns None.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("experts.cpp")
HEADERS = tuple(SOURCE.with_name(n) for n in ("vec.h", "tiles.h", "prequant_tiles.h", "q8_tiles.h"))  # included by SOURCE
ISAS = ("avx512", "avx2", "scalar")
FLAGS = {
    "avx512": ["-DISA_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-DISA_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "scalar": [],
}
NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}, "avx2": {"avx2", "fma", "f16c"},
         "scalar": set()}
COMMON = ["-O3", "-std=c++17", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-w"]

_LOCK = threading.Lock()
_LOADED: dict[str, ctypes.CDLL | None] = {}
_SAID: set[str] = set()


def _once(msg: str, *args) -> None:
    text = msg % args
    if text not in _SAID:
        _SAID.add(text)
        logger.warning(text)


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_isa() -> str | None:
    """The build this CPU runs: SPECMOE_HOST_ISA if set, else the widest whose flags it has; None for "off"
    or a CPU that is not x86-64 Linux (then the scalar build is not assumed to be wanted either)."""
    forced = os.environ.get("SPECMOE_HOST_ISA", "").strip().lower()
    if forced:
        if forced == "off":
            return None
        if forced not in ISAS:
            raise ValueError(f"SPECMOE_HOST_ISA must be one of {ISAS + ('off',)}, got {forced!r}")
        return forced
    flags = cpu_flags()
    if not flags:
        return "scalar"
    return next(isa for isa in ISAS if NEEDS[isa] <= flags)


def cache_dir() -> Path:
    root = os.environ.get("SPECMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "specmoe")
    return Path(root) / "host_kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def library_path(isa: str, compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    texts = [f.read_text() for f in (SOURCE, *HEADERS)]
    key = hashlib.sha256("\n".join([*texts, " ".join(COMMON + FLAGS[isa]), *version]).encode())
    return cache_dir() / f"experts-{isa}-{key.hexdigest()[:16]}.so"


def build(isa: str) -> Path:
    """Compile `experts.cpp` for `isa` into the cache (if not there yet). Returns the library's path.

    Raises:
        RuntimeError: no compiler, or the compiler failed (its message included).
    """
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++, or $CXX) found")
    path = library_path(isa, compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *COMMON, *FLAGS[isa], str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built host experts kernel %s", path)
    return path


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    c = ctypes
    lib.specmoe_host_isa.restype = c.c_char_p
    lib.specmoe_host_scratch.restype = c.c_int64
    lib.specmoe_host_scratch.argtypes = [c.c_int64, c.c_int64, c.c_int64, c.c_int]
    lib.specmoe_host_experts.restype = c.c_int
    lib.specmoe_host_experts.argtypes = [
        c.c_int, c.c_int, c.c_int, c.c_int64, c.c_int64, c.c_int64, c.c_int64, c.c_void_p,  # fmt .. x
        c.c_int64, c.c_void_p, c.c_void_p, c.c_int64, c.c_void_p,  # k, ids, weights, n, chosen
        c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int,  # gate_up, down, out, scratch, threads
        c.c_void_p, c.c_int,  # act_params, q8 (int8 activations)
    ]
    lib.specmoe_read_sum.restype = c.c_double
    lib.specmoe_read_sum.argtypes = [c.c_void_p, c.c_int64, c.c_int]
    return lib


def load(isa: str | None = None) -> ctypes.CDLL | None:
    """The host kernels library for `isa` (default: `choose_isa()`), built on first use; None, with one log
    line, where it cannot be had (no compiler, a failed build, SPECMOE_HOST_ISA=off)."""
    isa = isa or choose_isa()
    if isa is None:
        _once("host experts kernel off (SPECMOE_HOST_ISA=off); experts on the host run the model's torch code")
        return None
    with _LOCK:
        if isa not in _LOADED:
            try:
                _LOADED[isa] = _declare(ctypes.CDLL(str(build(isa))))
            except (RuntimeError, OSError) as err:
                _LOADED[isa] = None
                _once("host experts kernel (%s) unavailable: %s; experts on the host run the model's torch code",
                      isa, err)
        return _LOADED[isa]

"""Launch configurations of the fused experts kernel as data: JSON per device, keyed by shape and token bucket.

``configs/default.json`` holds untuned defaults per token bucket. ``configs/<device slug>.json`` (written by
``benchmarks/autotune_moe_kernel.py`` on that GPU) holds, per shape and bucket, the best configuration found
and whether the kernel beat transformers' experts implementations there. The runtime only prefers the
kernel where such a measured entry says so; everywhere else it keeps the model's own implementation and
logs that once.

File format (``format`` 1)::

    {"format": 1, "device_name": "NVIDIA H100 80GB HBM3", "environment": {...}, "settings": {...},
     "shapes": {"bfloat16/H4096/I14336/k2": {"1": {"config": {"block_t": 1, ...}, "faster": true,
                                                     "kernel_us": 41.0, "grouped_mm_us": 63.2, ...}}}}

A bucket ``"n"`` holds measurements at n tokens; a call with T tokens uses the smallest bucket >= T
(the largest bucket past the end).
"""

# Shape legend: T tokens, H hidden, I intermediate, k top-k

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..io import read_json

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_FILE = CONFIG_DIR / "default.json"
FORMAT = 1
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _pow2(n: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


@dataclass(frozen=True)
class MoEKernelConfig:
    """How the fused experts kernel is launched.

    Args:
        block_t: routed (token, expert) pairs per program. 1 runs one pair per program with no sorting
            (decode); 16 or more sorts pairs by expert and uses tensor-core dots (prefill).
        block_k: tile of H in the gate/up reduction.
        block_i: tile of I per program (the grid's second axis).
        block_h: tile of H in the down projection's output.
        num_warps, num_stages: Triton launch options.
    """

    block_t: int = 16
    block_k: int = 64
    block_i: int = 64
    block_h: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if not (_pow2(self.block_t) and (self.block_t == 1 or self.block_t >= 16)):
            raise ValueError(f"block_t must be 1 or a power of two >= 16 (tensor-core dots), got {self.block_t!r}")
        for name in ("block_k", "block_i", "block_h"):
            value = getattr(self, name)
            if not (_pow2(value) and value >= 16):
                raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")
        if not (isinstance(self.num_stages, int) and 1 <= self.num_stages <= 8):
            raise ValueError(f"num_stages must be an int in 1..8, got {self.num_stages!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "launch config") -> "MoEKernelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(names)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None


def shape_key(dtype: torch.dtype, hidden: int, intermediate: int, top_k: int) -> str:
    """'bfloat16/H4096/I14336/k2': what a tuned entry is keyed by (besides the device and token bucket)."""
    return f"{str(dtype).removeprefix('torch.')}/H{hidden}/I{intermediate}/k{top_k}"


def bucket_of(tokens: int, buckets) -> int:
    """The smallest bucket >= tokens, or the largest bucket."""
    buckets = sorted(buckets)
    return next((b for b in buckets if b >= tokens), buckets[-1])


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3' (the config file's stem)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def device_name_of(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _read_buckets(table: dict, where: str, parse) -> dict[int, object]:
    out = {}
    for bucket, entry in table.items():
        try:
            b = int(bucket)
        except ValueError:
            raise ValueError(f"{where}: token bucket {bucket!r} is not an integer") from None
        out[b] = parse(entry, f"{where} bucket {bucket}")
    if not out:
        raise ValueError(f"{where}: no token buckets")
    return out


@dataclass(frozen=True)
class TunedEntry:
    config: MoEKernelConfig
    faster: bool | None  # None: not compared
    figures: dict  # the timings the decision came from (microseconds)


def _tuned(entry: dict, where: str) -> TunedEntry:
    if not isinstance(entry, dict) or "config" not in entry:
        raise ValueError(f"{where}: expected an object with a 'config'")
    faster = entry.get("faster")
    if faster is not None and not isinstance(faster, bool):
        raise ValueError(f"{where}: 'faster' must be true, false or absent, got {faster!r}")
    figures = {k: v for k, v in entry.items() if k not in ("config", "faster")}
    return TunedEntry(MoEKernelConfig.from_dict(entry["config"], where), faster, figures)


class LaunchConfigs:
    """The launch table for one device: tuned entries where measured, defaults elsewhere."""

    def __init__(self, device_name: str, defaults: dict[int, MoEKernelConfig],
                 tuned: dict[str, dict[int, TunedEntry]], source: str | None):
        self.device_name = device_name
        self.defaults = defaults
        self.tuned = tuned
        self.source = source  # the device file read, or None
        self._logged: set = set()

    def _entry(self, key: str, tokens: int) -> TunedEntry | None:
        table = self.tuned.get(key)
        if table is None:
            if key not in self._logged:
                self._logged.add(key)
                logger.info("no tuned launch config for %s on %s (%s); using untuned defaults. Tune with "
                            "benchmarks/autotune_moe_kernel.py on that GPU", key, self.device_name,
                            self.source or "no config file for this device")
            return None
        return table[bucket_of(tokens, table)]

    def config_for(self, key: str, tokens: int) -> MoEKernelConfig:
        """The launch config for a shape key (see `shape_key`) at T tokens."""
        entry = self._entry(key, tokens)
        return entry.config if entry is not None else self.defaults[bucket_of(tokens, self.defaults)]

    def kernel_faster(self, key: str, tokens: int) -> bool | None:
        """Whether the kernel measured faster than the model's implementation (None: never measured)."""
        entry = self._entry(key, tokens)
        return None if entry is None else entry.faster


def read_defaults(path: Path = DEFAULT_FILE) -> dict[int, MoEKernelConfig]:
    data = read_json(path, "default launch configs")
    if data.get("format") != FORMAT or not isinstance(data.get("defaults"), dict):
        raise ValueError(f"default launch configs {path}: expected format {FORMAT} with a 'defaults' object")
    return _read_buckets(data["defaults"], str(path), MoEKernelConfig.from_dict)


def read_device_file(path: Path) -> tuple[str, dict[str, dict[int, TunedEntry]]]:
    """Read a tuned device file. Returns (device name, {shape key: {bucket: entry}})."""
    data = read_json(path, "tuned launch configs")
    if data.get("format") != FORMAT or not isinstance(data.get("shapes"), dict):
        raise ValueError(f"tuned launch configs {path}: expected format {FORMAT} with a 'shapes' object; "
                         "re-run benchmarks/autotune_moe_kernel.py")
    tuned = {key: _read_buckets(table, f"{path} shape {key}", _tuned) for key, table in data["shapes"].items()}
    return str(data.get("device_name")), tuned


_CACHE: dict[str, LaunchConfigs] = {}


def launch_configs(device: torch.device | str, config_dir: Path | None = None) -> LaunchConfigs:
    """The launch table for `device` (cached per device name): its tuned file if there is one, else defaults.

    Raises:
        ValueError: a config file that is not valid JSON or not in the expected format (named in the message).
    """
    name = device_name_of(device)
    directory = Path(config_dir) if config_dir is not None else CONFIG_DIR
    cache_key = f"{directory}::{name}"
    if cache_key not in _CACHE:
        own = directory / DEFAULT_FILE.name
        defaults = read_defaults(own if own.is_file() else DEFAULT_FILE)
        path = directory / f"{device_slug(name)}.json"
        tuned, source = {}, None
        if path.is_file():
            _, tuned = read_device_file(path)
            source = str(path)
        else:
            logger.info("no tuned launch configs for %s (looked for %s): untuned defaults, no speed measurements",
                        name, path)
        _CACHE[cache_key] = LaunchConfigs(name, defaults, tuned, source)
    return _CACHE[cache_key]


def clear_cache() -> None:
    """Forget loaded tables (after writing a new config file)."""
    _CACHE.clear()

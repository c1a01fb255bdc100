"""The reference model's text: the Python standard library's own sources, already on every machine.

The file list is fixed and sorted, and each file goes to train or validation by a seeded hash of its path
relative to the stdlib root, so a file's side never depends on which other files a Python version ships.
`CorpusSplit.describe()` records what the text was (Python version, file counts, bytes, a fingerprint).
"""

from __future__ import annotations

import hashlib
import logging
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Directories left out: installed packages, bytecode, and test suites (encoding torture tests, huge data).
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class CorpusConfig:
    """Which files make the corpus and how they split.

    Args:
        root: directory scanned for `*.py` files (default: this interpreter's standard library).
        val_fraction: share of files held out for validation, in (0, 0.5].
        seed: salt of the per-file hash that decides the split.
        max_file_bytes: files larger than this are skipped (generated tables, not prose or code).
    """

    root: Path | None = None
    val_fraction: float = 0.05
    seed: int = 0
    max_file_bytes: int = 1_000_000

    def __post_init__(self):
        if not 0.0 < self.val_fraction <= 0.5:
            raise ValueError(f"CorpusConfig.val_fraction must be in (0, 0.5], got {self.val_fraction}")
        if self.max_file_bytes < 1:
            raise ValueError(f"CorpusConfig.max_file_bytes must be >= 1, got {self.max_file_bytes}")
        if self.root is not None:
            object.__setattr__(self, "root", Path(self.root))

    @property
    def resolved_root(self) -> Path:
        return self.root if self.root is not None else stdlib_root()


@dataclass(frozen=True)
class CorpusSplit:
    """Files of the corpus, split by file. Paths are relative to `root`, sorted."""

    root: Path
    train: tuple[Path, ...]
    val: tuple[Path, ...]
    config: CorpusConfig = field(repr=False)

    def texts(self, split: str) -> list[str]:
        """The decoded contents of the files of `split` ("train" or "val"), in order."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return [(self.root / p).read_text(encoding="utf-8") for p in getattr(self, split)]

    def describe(self) -> dict:
        """What the text was, for training.json and benchmark results."""
        digest = hashlib.sha256()
        nbytes = {}
        for split in ("train", "val"):
            total = 0
            for p in getattr(self, split):
                data = (self.root / p).read_bytes()
                total += len(data)
                digest.update(f"{split}:{p.as_posix()}:".encode())
                digest.update(hashlib.sha256(data).digest())
            nbytes[split] = total
        return {
            "source": "Python standard library sources (*.py), test suites excluded",
            "root": str(self.root),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "train_files": len(self.train),
            "val_files": len(self.val),
            "train_bytes": nbytes["train"],
            "val_bytes": nbytes["val"],
            "split": f"by file: sha256(seed:relative path) -> val if below {self.config.val_fraction}",
            "seed": self.config.seed,
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "max_file_bytes": self.config.max_file_bytes,
            "fingerprint": digest.hexdigest()[:16],
        }


def _is_val(relpath: Path, config: CorpusConfig) -> bool:
    h = hashlib.sha256(f"{config.seed}:{relpath.as_posix()}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < config.val_fraction


def _readable(path: Path, limit: int) -> bool:
    if path.stat().st_size > limit:
        return False
    try:
        path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return True


def load_corpus(config: CorpusConfig | None = None) -> CorpusSplit:
    """Scan the corpus root and split its files.

    Args:
        config: which files and how to split (default: the standard library, 5% of files held out).

    Returns:
        The split, with sorted relative paths.

    Raises:
        FileNotFoundError: the root does not exist or holds no usable `*.py` files.
    """
    config = config or CorpusConfig()
    root = config.resolved_root
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {root} is not a directory; pass CorpusConfig(root=...)")
    files = sorted(
        p.relative_to(root)
        for p in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file()
    )
    files = [p for p in files if _readable(root / p, config.max_file_bytes)]
    if not files:
        raise FileNotFoundError(f"no readable *.py files under {root}")
    val = tuple(p for p in files if _is_val(p, config))
    train = tuple(p for p in files if not _is_val(p, config))
    if not val or not train:
        raise ValueError(f"{len(files)} files under {root} gave an empty split; change CorpusConfig.val_fraction")
    logger.info("corpus %s: %d train files, %d val files", root, len(train), len(val))
    return CorpusSplit(root, train, val, config)

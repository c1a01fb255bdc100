"""`--model` / `load_offloaded` accept a local directory or a Hugging Face hub id.

A hub id resolves through `huggingface_hub.snapshot_download` to a directory of the local cache, fetching only
what specmoe reads (config, safetensors weights and their index, tokenizer files; never pickled `.bin`), and
respecting `HF_HUB_OFFLINE` / `HF_HUB_CACHE`: offline, a model already in the cache loads with no network.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

# What specmoe reads from a model repository.
ALLOW_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(spec: str) -> bool:
    """'org/name' (and not an existing path)."""
    return bool(_HUB_ID.fullmatch(str(spec))) and not Path(spec).exists()


def resolve_model(spec, *, revision: str | None = None, cache_dir=None) -> Path:
    """A local model directory for `spec`: the directory itself, or a hub id's snapshot in the local cache.

    Raises:
        FileNotFoundError: neither an existing directory nor a hub id that is (or, online, can be) in the cache.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(str(spec)):
        raise FileNotFoundError(f"model {str(spec)!r} is neither a local directory nor a hub id like 'org/name'")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        local = snapshot_download(str(spec), revision=revision, cache_dir=cache_dir,
                                  allow_patterns=list(ALLOW_PATTERNS), local_files_only=offline)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"hub model {spec!r} is not in the local cache ({cache_dir or constants.HF_HUB_CACHE})"
            + (" and HF_HUB_OFFLINE is set: unset it to download, or download it elsewhere first" if offline else
               " and could not be downloaded (no network?)")) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"hub model {spec!r} does not exist (or is gated: log in with `hf auth login`)") \
            from None
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"hub model {spec!r} could not be fetched: {err}") from None
    logger.info("model %s -> %s", spec, local)
    return Path(local)


def has_tokenizer(directory) -> bool:
    directory = Path(directory)
    return any((directory / name).is_file() for name in TOKENIZER_FILES)

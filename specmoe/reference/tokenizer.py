"""A byte-level BPE tokenizer trained with `tokenizers` on the corpus, saved as a transformers tokenizer."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"  # separates documents; also the pad token


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                    model_max_length: int = 512):
    """Train a byte-level BPE tokenizer (no unknown tokens: every byte has a token).

    Args:
        texts: the training documents.
        vocab_size: size of the vocabulary, EOS included; at least 257 (the byte alphabet and EOS).
        min_frequency: a pair must occur this often to be merged.
        model_max_length: the longest input the model takes (its position limit).

    Returns:
        A `transformers.PreTrainedTokenizerFast` with EOS as its eos and pad token.

    Raises:
        ValueError: a vocabulary too small for the byte alphabet.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + EOS), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    logger.info("trained a BPE tokenizer with %d tokens", tok.get_vocab_size())
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   model_max_length=model_max_length)


def load_tokenizer(path):
    """Load a tokenizer saved by `save_pretrained` from a local directory (nothing is downloaded).

    Raises:
        FileNotFoundError: `path` has no tokenizer.json.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)

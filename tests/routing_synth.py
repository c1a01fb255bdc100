"""A synthetic routing process with structure predictors can learn, and a character tokenizer for tiny models."""

from __future__ import annotations

import torch

from specmoe import MoEGeometry
from specmoe.traces import RoutingTrace


def synthetic_trace(L: int = 4, E: int = 16, k: int = 2, H: int = 32, sequences: int = 60, length: int = 32,
                    noise: float = 0.1, seed: int = 0) -> RoutingTrace:
    """Routing where layer l+1's expert set is a fixed permutation of layer l's (and the next token's layer 0
    follows this token's last layer), except with probability `noise` a fresh random set. The hidden state
    entering layer l is a noisy code of the experts routed at the following layer."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(E, generator=g) for _ in range(L)])  # [L, E] layer l -> l+1
    code = torch.randn(L, E, H, generator=g)
    N = sequences * length
    ids = torch.zeros(N, L, k, dtype=torch.long)
    fresh = torch.rand(N, L, generator=g) < noise
    cur = None
    for i in range(N):
        if i % length == 0:
            cur = torch.randperm(E, generator=g)[:k]
        for layer in range(L):
            ids[i, layer] = cur
            cur = torch.randperm(E, generator=g)[:k] if fresh[i, layer] else perm[layer][cur]
    hidden = {}
    for layer in range(L):
        following = ids[:, layer + 1] if layer + 1 < L else torch.cat([ids[1:, 0], ids[-1:, 0]])  # [N, k]
        hidden[layer] = (code[layer][following].sum(1) + 0.5 * torch.randn(N, H, generator=g)).half()
    weights = torch.softmax(torch.randn(N, L, k, generator=g), -1).sort(-1, descending=True).values
    return RoutingTrace(MoEGeometry(L, E, k, H), ids, weights, torch.arange(0, N + 1, length), hidden)


def char_tokenizer(vocab_size: int = 96):
    """A character-level PreTrainedTokenizerFast with ids < vocab_size (builds in milliseconds)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)][: vocab_size - 1]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")

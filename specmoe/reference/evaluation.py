"""Language-model quality on held-out windows: the model's loss and a unigram baseline, in nats per token."""

# Shape legend: N windows, T tokens per window, V vocabulary

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate_loss(model, windows: torch.Tensor, batch_size: int = 32, progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats/token) of `model` over `windows` [N, T] (no padding).

    The load-balancing loss is left out: this is the language-model loss only.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc="val loss", disable=not progress, leave=False):
        x = windows[i : i + batch_size].to(device)  # [b, T]
        logits = model(input_ids=x, output_router_logits=False).logits.float()  # [b, T, V]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


def unigram_loss(train_stream: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the windows' predicted tokens under the training stream's token
    frequencies (add-one smoothed): what a model that ignores context would score."""
    counts = torch.bincount(train_stream.long(), minlength=vocab_size).double() + 1.0  # [V]
    logp = counts.log() - math.log(counts.sum().item())
    targets = windows[:, 1:].flatten()  # the same positions evaluate_loss scores
    return float(-logp[targets].mean())

"""The one training config and learning-rate schedule: how every training loop in specmoe optimises.

The predictors' loop (`training.loop.train_predictor`) and the reference model's recipe
(`reference.train.train`) both take a `TrainConfig`; each keeps only what it trains on elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (AdamW, warm-up + cosine schedule, validation, budget).

    Args:
        steps: optimizer steps at most; None: train until `max_minutes` (the schedule follows the clock).
        max_minutes: wall-clock budget (None: no limit); with both, the schedule follows whichever is further.
        batch_size: rows per step (the predictors' (token, layer) rows, the reference model's windows).
        lr: peak learning rate (AdamW), reached after `warmup_steps`.
        min_lr_ratio: the cosine decays from `lr` to `lr * min_lr_ratio`.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        grad_clip: gradient norm clip.
        eval_every: steps between validations.
        patience: validations without improvement before stopping early (loops that stop early).
        val_tokens: validation tokens.
        seed: seeds the weights, the batches, the validation sample and dropout.
        device: "cpu", "cuda", ...; None: CUDA when present, else CPU.
    """

    steps: int | None = 3000
    max_minutes: float | None = None
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 250
    patience: int = 4
    val_tokens: int = 1024
    seed: int = 0
    device: str | None = None

    def __post_init__(self):
        if self.steps is None and self.max_minutes is None:
            raise ValueError("TrainConfig needs steps or max_minutes (or both); got neither")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"TrainConfig.steps must be >= 1 (or None with max_minutes), got {self.steps}")
        for name in ("batch_size", "eval_every", "patience", "val_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0 or not self.grad_clip > 0:
            raise ValueError(f"TrainConfig needs lr > 0, weight_decay >= 0, warmup_steps >= 0, grad_clip > 0; got "
                             f"lr={self.lr}, weight_decay={self.weight_decay}, warmup_steps={self.warmup_steps}, "
                             f"grad_clip={self.grad_clip}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"TrainConfig.max_minutes must be > 0 or None, got {self.max_minutes}")

    def progress(self, step: int, elapsed_s: float, budget_s: float | None = None) -> float:
        """How far the run is, 0 -> 1: the larger of the step and the time fractions (a run cut short by the
        clock still ends at the low learning rate). `budget_s` overrides `max_minutes` (e.g. the part of the
        budget left for the loop)."""
        budget = budget_s if budget_s is not None else (60 * self.max_minutes if self.max_minutes else None)
        by_steps = step / self.steps if self.steps else 0.0
        by_time = elapsed_s / budget if budget else 0.0
        return max(by_steps, by_time)

    def lr_factor(self, step: int, progress: float) -> float:
        """The schedule: linear warm-up over `warmup_steps`, times a cosine from 1 to `min_lr_ratio` as
        `progress` goes 0 -> 1."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        cos = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
        return warm * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cos)

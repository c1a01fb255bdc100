"""The one training loop of every trainable predictor: AdamW, warm-up + cosine schedule, BCE on multi-hot
targets, early stopping on validation recall@k, seeded, with a progress bar. CPU by default, CUDA when
present.

Each step draws a batch of (token, source MoE layer l) rows from the training trace, uniformly; the
targets are the experts routed at layers l+1..l+D (the next token's first layers for targets past the last
layer). The schedule is `TrainConfig.lr_factor`, the one every training loop uses.
"""

# Shape legend: B batch tokens, E experts, k top-k, D lookahead, L MoE layers

from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..predictors.trainable import TrainablePredictor
from ..traces.dataset import RoutingTrace
from .config import TrainConfig
from .metrics import PredictionMetrics

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run did: validation curve, best step, and why it stopped."""

    best_step: int
    best_val_recall: float
    initial_val_recall: float
    steps_run: int
    stopped: str  # "steps", "early_stopping" or "time"
    wall_s: float
    device: str
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def bce_loss(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean BCE of logits [B, D, E] against multi-hot routed ids [B, D, k] (-1 = none) over valid [B, D]."""
    E = logits.shape[-1]
    hot = torch.zeros(*ids.shape[:2], E + 1, device=logits.device)
    hot.scatter_(2, torch.where(ids >= 0, ids, E), 1.0)
    per = F.binary_cross_entropy_with_logits(logits, hot[..., :E], reduction="none").mean(-1)  # [B, D]
    w = valid.float()
    return (per * w).sum() / w.sum().clamp(min=1.0)


def source_layers(predictor: TrainablePredictor) -> list[int]:
    """The layers that have at least one target (all of them when the predictor wraps into the next token)."""
    L = predictor.geometry.num_layers
    return list(range(L if predictor.wrap else L - 1))


@torch.no_grad()
def validate(predictor: TrainablePredictor, trace: RoutingTrace, tokens: torch.Tensor,
             batch_size: int = 4096) -> tuple[float, float]:
    """(mean recall@k over every valid (token, target) pair, mean BCE loss) on `tokens` of `trace`, each at
    every source layer."""
    was_training = predictor.module.training
    predictor.module.eval()
    geo = predictor.geometry
    metrics = PredictionMetrics(geo.top_k, geo.num_experts, multiples=(1,), top_n=(1,))
    layers = torch.tensor(source_layers(predictor)).repeat_interleave(tokens.numel())  # [R]
    rows = tokens.repeat(len(source_layers(predictor)))  # [R]
    loss_sum, loss_n = 0.0, 0
    for start in range(0, rows.numel(), batch_size):
        lay, tok = layers[start : start + batch_size], rows[start : start + batch_size]
        ids, valid = predictor.train_targets(trace, lay, tok)  # [B, D, k], [B, D]
        logits = predictor.train_logits(trace, lay, tok).float().cpu()  # [B, D, E]
        n = int(valid.sum())
        loss_sum += bce_loss(logits, ids, valid).item() * n
        loss_n += n
        metrics.add(logits[valid], ids[valid])
    predictor.module.train(was_training)
    return metrics.result()["recall@k"], loss_sum / max(loss_n, 1)


def train_predictor(predictor: TrainablePredictor, train: RoutingTrace, val: RoutingTrace,
                    config: TrainConfig = TrainConfig(), progress: bool = True) -> TrainResult:
    """Train `predictor` in place on `train`, keep the weights with the best validation recall@k.

    The untrained weights are validated too (step 0), so a predictor that starts at a baseline (the
    hidden-state predictor's pre-gate) ends no worse than it on validation.

    Returns:
        A TrainResult (the predictor holds the best weights, in eval mode).

    Raises:
        ValueError: traces of another geometry, or empty traces.
    """
    geo = predictor.geometry
    for name, trace in (("train", train), ("val", val)):
        geo.check_matches(trace.geometry, what=f"{name} trace")
        if trace.num_tokens == 0:
            raise ValueError(f"the {name} trace is empty")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    val_tokens = torch.randperm(val.num_tokens, generator=gen)[: config.val_tokens].sort().values
    module = predictor.module.to(device)
    opt = torch.optim.AdamW(predictor.param_groups(config.lr), lr=config.lr, weight_decay=config.weight_decay)
    base_lrs = [group["lr"] for group in opt.param_groups]
    budget = 60 * config.max_minutes if config.max_minutes is not None else None

    layers = torch.tensor(source_layers(predictor))
    start = time.perf_counter()
    recall0, loss0 = validate(predictor, val, val_tokens)
    history = [{"step": 0, "val_recall@k": recall0, "val_loss": loss0, "elapsed_s": time.perf_counter() - start}]
    best = (recall0, 0, copy.deepcopy(module.state_dict()))
    bad_evals, stopped, running, step = 0, "steps", None, 0
    module.train()
    steps = range(1, config.steps + 1) if config.steps else itertools.count(1)
    bar = tqdm(steps, total=config.steps, desc=f"train {predictor.kind}", unit="step", disable=not progress)
    for step in bar:
        factor = config.lr_factor(step - 1, config.progress(step - 1, time.perf_counter() - start))
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * factor
        tok = torch.randint(train.num_tokens, (config.batch_size,), generator=gen)
        lay = layers[torch.randint(len(layers), (config.batch_size,), generator=gen)]
        ids, valid = predictor.train_targets(train, lay, tok)
        loss = bce_loss(predictor.train_logits(train, lay, tok), ids.to(device), valid.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        out_of_time = budget is not None and time.perf_counter() - start > budget
        if step % config.eval_every == 0 or step == config.steps or out_of_time:
            recall, vloss = validate(predictor, val, val_tokens)
            history.append({"step": step, "train_loss": running, "val_recall@k": recall, "val_loss": vloss,
                            "lr": opt.param_groups[0]["lr"], "elapsed_s": time.perf_counter() - start})
            bar.set_postfix(loss=f"{running:.4f}", val_recall=f"{recall:.4f}", best=f"{max(best[0], recall):.4f}")
            logger.info("step %d: train loss %.4f, val recall@k %.4f", step, running, recall)
            if recall > best[0]:
                best, bad_evals = (recall, step, copy.deepcopy(module.state_dict())), 0
            else:
                bad_evals += 1
            if out_of_time:
                stopped = "time"
                break
            if bad_evals >= config.patience:
                stopped = "early_stopping"
                break
    bar.close()
    module.load_state_dict(best[2])
    module.eval()
    predictor.reset()  # drop inference tensors prepared from older weights
    return TrainResult(best_step=best[1], best_val_recall=best[0], initial_val_recall=recall0, steps_run=step,
                       stopped=stopped, wall_s=time.perf_counter() - start, device=str(device), history=history)

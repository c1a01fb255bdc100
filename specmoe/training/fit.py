"""Build and fit a predictor of a named kind on trace splits: counting for `history`, the training loop for
`interlayer`, `affinity` and `hidden` (the latter started from the model's routers when the trace saved them)."""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch

from ..predictors import AffinityPredictor, HiddenStatePredictor, HistoryPredictor, InterLayerPredictor, Predictor
from ..traces.dataset import RoutingTrace
from .loop import TrainConfig, train_predictor

logger = logging.getLogger(__name__)

TRAINABLE = {"interlayer": InterLayerPredictor, "hidden": HiddenStatePredictor, "affinity": AffinityPredictor}
KINDS = ("history", *TRAINABLE)


def build_predictor(kind: str, train: RoutingTrace, lookahead: int = 2, wrap: bool = True, seed: int = 0,
                    **options) -> Predictor:
    """A fresh predictor of `kind` for `train`'s geometry (history: already counted on `train`).

    Args:
        kind: "history", "interlayer", "affinity" or "hidden".
        train: the training split (geometry, routers, and for history the counts).
        lookahead, wrap: target layers l+1..l+lookahead, and whether to cross into the next token.
        seed: seeds the initial weights.
        options: the predictor's own arguments (e.g. context=3, dim=128, router_init=True).

    Raises:
        ValueError: an unknown kind, or router_init asked for a trace that saved no routers.
    """
    if kind == "history":
        return HistoryPredictor.fit(train, lookahead=lookahead, wrap=wrap, **options)
    if kind not in TRAINABLE:
        raise ValueError(f"unknown predictor kind {kind!r}; choose one of {KINDS}")
    torch.manual_seed(seed)
    predictor = TRAINABLE[kind](train.geometry, lookahead=lookahead, wrap=wrap, **options)
    if kind == "hidden" and predictor.router_init:
        if train.routers is None:
            raise ValueError("router_init needs the model's routers, and this trace saved none; pass "
                             "router_init=False (--no-router-init) or collect again")
        predictor.init_from_routers(train.routers)
    return predictor


def fit_predictor(kind: str, splits: dict[str, RoutingTrace], lookahead: int = 2, wrap: bool = True,
                  config: TrainConfig = TrainConfig(), progress: bool = True, **options) -> tuple[Predictor, dict]:
    """Build a predictor of `kind` and fit it on splits["train"] (early stopping on splits["val"]).

    Returns:
        (the predictor, a JSON-able record of the fit: kind, options, train config and TrainResult).
    """
    predictor = build_predictor(kind, splits["train"], lookahead, wrap, seed=config.seed, **options)
    record = {"kind": kind, "lookahead": lookahead, "wrap": wrap, "options": options,
              "train_tokens": splits["train"].num_tokens, "val_tokens": splits["val"].num_tokens}
    if kind in TRAINABLE:
        result = train_predictor(predictor, splits["train"], splits["val"], config, progress=progress)
        record.update(train_config=asdict(config), result=result.to_dict(), parameters=predictor.num_parameters())
        logger.info("%s: val recall@k %.4f (start %.4f) after %d steps (%s)", kind, result.best_val_recall,
                    result.initial_val_recall, result.steps_run, result.stopped)
    return predictor, record

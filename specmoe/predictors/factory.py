"""One way to build a predictor from a name: what every CLI, benchmark and the demo call.

    make_predictor("none")                                  # None: demand fetching only, no prefetching
    make_predictor("pregate", lookahead=2)                  # the training-free pre-gate
    make_predictor("random", seed=3)                        # the floor
    make_predictor("oracle", routing=passes)                # the ceiling: replays recorded routing
    make_predictor("path/to/saved", geometry=geometry)      # a trained predictor saved with save_predictor

Options keep the classes' own defaults (the pre-gate does not wrap into the next token unless `wrap=True`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..geometry import MoEGeometry
from .base import Predictor, load_predictor
from .oracle import OraclePredictor, RandomPredictor
from .pregate import PreGatePredictor

BUILTIN = ("none", "pregate", "random", "oracle")


def make_predictor(name: str | Path, *, lookahead: int = 1, geometry: MoEGeometry | None = None,
                   routing: Sequence[torch.Tensor] | None = None, seed: int = 0,
                   wrap: bool | None = None) -> Predictor | None:
    """The predictor called `name`, or None for "none".

    Args:
        name: one of "none", "pregate", "random", "oracle", or a directory holding a saved predictor.
        lookahead: MoE layers ahead to score (built-in predictors; a saved one keeps its own).
        geometry: the model's geometry; a saved predictor built for another one is refused.
        routing: recorded routing to replay, one [T, L, k] tensor per pass ("oracle" only).
        seed: the random predictor's seed.
        wrap: the pre-gate also scores the next token's first layers (default: PreGatePredictor's, off).

    Raises:
        ValueError: "oracle" without routing, or a name that is neither built in nor a directory.
        FileNotFoundError / ValueError: from `load_predictor` for a bad saved predictor.
    """
    key = str(name)
    if key == "none":
        return None
    if key == "pregate":
        return PreGatePredictor(lookahead=lookahead, **({} if wrap is None else {"wrap": wrap}))
    if key == "random":
        return RandomPredictor(seed=seed, lookahead=lookahead)
    if key == "oracle":
        if routing is None:
            raise ValueError("the oracle predictor replays recorded routing: pass routing= (a Routing, e.g. "
                             "specmoe.traces.capture_routing(...).routing(), or one [T, L, k] tensor per forward pass)")
        return OraclePredictor(routing, lookahead=lookahead)
    if not Path(key).exists():
        raise ValueError(f"unknown predictor {key!r}: give one of {', '.join(BUILTIN)} or the directory of a "
                         "saved predictor (specmoe train --out DIR)")
    return load_predictor(key, geometry=geometry)

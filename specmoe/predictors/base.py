"""The predictor protocol, a registry of predictor types, and save/load (config.json + model.safetensors).

A predictor is policy: it scores the experts of upcoming MoE layers and never touches streams or caches.
The runtime calls it once per MoE layer, between the router and the experts:

    scores = predictor.predict(layer, hidden, history)

* ``hidden [T, H]``: the hidden state entering MoE layer ``layer`` (what its router sees);
* ``history [T, layer + 1, k]``: expert ids routed at MoE layers ``0..layer`` in this forward pass, the
  current layer included (it has just been routed); -1 where a layer did not run in this pass;
* returns ``{target: scores [T, E]}`` for targets ``> layer``. A target ``>= L`` names layer ``target - L``
  of the next forward pass (the next token), so that the last layers of token t can prefetch for the first
  layers of token t+1. Higher score = more likely routed; the runtime prefetches the best few.

Around those calls: ``bind(geometry, routers)`` once, ``reset()`` at each generate call, and
``start_pass(index)`` as each forward pass starts (index from 0 after the reset; the runtime's one pass-start
signal, so no predictor guesses passes). A `stateful` predictor (one that keeps earlier passes' routing, e.g.
`affinity`) is also shown the routing by ``observe(layer, history)`` at the calls where the runtime skips
``predict`` (prefetch admission), and replays run it pass by pass.
"""

# Shape legend: T tokens, E experts, H hidden, L MoE layers, k top-k

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch

from ..geometry import MoEGeometry
from ..io import read_json, read_safetensors, write_directory, write_json, write_safetensors

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

PREDICTORS: dict[str, type["Predictor"]] = {}

# Kinds that read the hidden state entering a layer; the others need only the routing history, so they run on
# routing-only traces (`specmoe import-routing`), where the hidden state is absent.
READS_HIDDEN = frozenset({"pregate", "hidden"})


def top_candidates(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Each row's m best-scored experts, best first (ties: the lower id first), -1 for any that scores no more
    than its row's minimum: a constant row (e.g. all zero, as the oracle leaves rows it knows nothing about)
    names none. scores [..., E] -> [..., m]. Runs where the scores are (no host sync)."""
    vals, idx = scores.float().sort(dim=-1, descending=True, stable=True)  # [..., E]
    return torch.where(vals > vals[..., -1:], idx, -1)[..., :m]  # [..., m]; vals[..., -1:] is the row's minimum


def rank_by_votes(top: list[int], m: int) -> list[int]:
    """How the runtime and the simulator order one target layer's prefetch candidates: `top` holds each token's
    m best-scored experts, best first (flattened [T * m], -1 where a token names fewer, see `top_candidates`);
    every token votes 1 + (m - rank) / (m + 1) for each of them, so experts chosen by more tokens come first,
    then by their best rank; ties keep first appearance."""
    votes: dict[int, float] = {}
    for j, e in enumerate(top):
        if e >= 0:
            votes[e] = votes.get(e, 0.0) + 1.0 + (m - j % m) / (m + 1)
    return sorted(votes, key=votes.__getitem__, reverse=True)


def register_predictor(name: str):
    """Class decorator: make a predictor type loadable by `load_predictor` under `name`."""

    def deco(cls):
        if name in PREDICTORS and PREDICTORS[name] is not cls:
            raise ValueError(f"predictor type {name!r} is registered twice")
        cls.kind = name
        PREDICTORS[name] = cls
        return cls

    return deco


class Predictor:
    """Base class of speculation predictors (see the module docstring for the protocol).

    Subclasses implement `predict`, and for persistence `config` / `state_tensors` / `from_config`.
    """

    kind: ClassVar[str] = "base"
    # True: `predict` reads routing of earlier passes that it kept since `reset` (the previous tokens), so a replay
    # runs the passes in order, one call per layer, as the runtime does; False: a call depends on its arguments
    # only, and replays may batch many tokens into one call.
    stateful: ClassVar[bool] = False

    def __init__(self, lookahead: int = 1, geometry: MoEGeometry | None = None):
        if not isinstance(lookahead, int) or lookahead < 1:
            raise ValueError(f"lookahead must be an int >= 1, got {lookahead!r}")
        self.lookahead = lookahead
        self.geometry = geometry  # set at training (fixed) or at bind (training-free predictors)

    # --- protocol -------------------------------------------------------------------------------
    def bind(self, geometry: MoEGeometry, routers: Sequence = ()) -> None:
        """Attach to a model: its geometry, and its routers (RouterWeights per MoE layer) if needed.

        Raises:
            ValueError: the predictor was built for another geometry.
        """
        if self.geometry is not None:
            geometry.check_matches(self.geometry, what=f"{type(self).__name__}")
        self.geometry = geometry

    def reset(self) -> None:
        """A new generate call begins."""

    def start_pass(self, index: int) -> None:
        """Forward pass `index` (counted from 0 at the last `reset`) starts: the runtime marks pass starts (one
        forward pre-hook on the model), so a predictor never guesses them from layer order or token counts."""

    def predict(self, layer: int, hidden: torch.Tensor, history: torch.Tensor) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def observe(self, layer: int, history: torch.Tensor) -> None:
        """Layer `layer` was routed (history as for `predict`) but the runtime does not want scores at this call
        (prefetch admission skips it): called for `stateful` predictors only, which keep the routing they see."""

    def targets(self, layer: int, wrap: bool = True) -> list[int]:
        """Target layers layer+1 .. layer+lookahead (past the last layer only if `wrap`)."""
        last = self.geometry.num_layers * (2 if wrap else 1)
        return [t for t in range(layer + 1, layer + 1 + self.lookahead) if t < last]

    # --- persistence ----------------------------------------------------------------------------
    def config(self) -> dict:
        return {"lookahead": self.lookahead}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_config(cls, config: dict, tensors: dict[str, torch.Tensor], geometry: MoEGeometry | None):
        return cls(geometry=geometry, **config)

    def save(self, path) -> None:
        save_predictor(self, path)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def save_predictor(predictor: Predictor, path, extra_json: dict[str, dict] | None = None) -> Path:
    """Write the directory `path`: config.json, model.safetensors and the files of `extra_json` (name -> JSON
    data, e.g. a training log), all at once (`io.write_directory`: a process killed midway leaves the old
    predictor whole, never the old config with the new weights).

    Raises:
        FileExistsError: `path` exists and is neither empty nor a predictor directory (it has no config.json).
        OSError: the files could not be written (a full disk, ...).
    """
    path = Path(path)
    geometry = predictor.geometry.to_dict() if predictor.geometry is not None else None
    config = {"specmoe_predictor": predictor.kind, "format_version": FORMAT_VERSION, "geometry": geometry,
              "config": predictor.config()}

    def fill(tmp: Path) -> None:
        write_safetensors(tmp / WEIGHTS_NAME, predictor.state_tensors(), metadata={"format": "pt"})
        for name, data in (extra_json or {}).items():
            write_json(tmp / name, data)
        write_json(tmp / CONFIG_NAME, config)

    write_directory(path, fill, replaceable=lambda p: (p / CONFIG_NAME).is_file())
    return path


def load_predictor(path, geometry: MoEGeometry | None = None) -> Predictor:
    """Load a predictor saved by `save_predictor`.

    Args:
        path: the directory holding config.json and model.safetensors.
        geometry: the model's geometry; when given, a predictor built for another one is refused.

    Raises:
        FileNotFoundError: a file is missing. ValueError: a file is corrupt, of an unknown predictor type,
        or the geometry does not match.
    """
    path = Path(path)
    meta = read_json(path / CONFIG_NAME, what="predictor config")
    kind = meta.get("specmoe_predictor") if isinstance(meta, dict) else None
    if kind is None:
        raise ValueError(f"{path / CONFIG_NAME} is not a specmoe predictor config (no 'specmoe_predictor' key)")
    if kind not in PREDICTORS:
        raise ValueError(f"{path / CONFIG_NAME}: unknown predictor type {kind!r}; known: {sorted(PREDICTORS)}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_NAME} has format {meta['format_version']}, newer than this specmoe")
    saved = MoEGeometry.from_dict(meta["geometry"]) if meta.get("geometry") else None
    if geometry is not None and saved is not None:
        geometry.check_matches(saved, what=f"predictor at {path}")
    tensors = read_safetensors(path / WEIGHTS_NAME, what="predictor weights")
    return PREDICTORS[kind].from_config(meta.get("config", {}), tensors, saved)

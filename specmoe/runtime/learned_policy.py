"""Applying a trained eviction scorer: a policy that evicts the expert predicted to be needed farthest ahead.

Belady's MIN evicts the expert whose next use is farthest in the future. Decode visits the MoE layers in a
cycle, so the next use of a cached expert (l, e) seen from layer c is d + L * (n - 1) layer steps ahead, where
d = (l - c - 1) % L + 1 is known (when layer l comes round) and n (how many visits of l until e is routed
there again, 1 = the next) is not. `LearnedPolicy` predicts log n from a handful of features of (l, e) in the
visits of its own layer, with a tiny MLP trained offline to imitate Belady's key on a user's routing
(`specmoe.training.eviction`: a relaxed Belady, as Learning Relaxed Belady does for CDN caches), and evicts
the largest predicted d + L * (n - 1). Experts the predictor wants and experts of the current layer touched
this step are kept.

The features of layer l change only when layer l is visited, so the MLP runs once per MoE layer call on that
layer's E experts (`observe`); a victim is a gather over the slots (`victim`). The policy directory holds
`config.json` (features, geometry) and `model.safetensors` (the MLP), written by `save_learned_policy`
(atomically: a new directory beside, then renamed) and read by `load_learned_policy`, which `make_policy`
calls for a directory path.
"""

# Shape legend: L MoE layers, E experts, S slots, F features, J frequency horizons, D hidden width of the MLP

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..io import read_json, read_safetensors, write_json, write_safetensors
from .policies import ScoredPolicy

POLICY_KIND = "learned-eviction"
FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
DECAYS = (0.5, 0.8, 0.95, 0.99)  # frequency horizons: exponential averages per visit of the layer
MAX_RECENCY = 255  # visits since the last use, capped
MAX_VISITS = 256  # label cap: n in [1, MAX_VISITS]
HEADS = 8  # P(n <= j) for j = 1..HEADS
RULES = ("density", "farthest")
FEATURES = ("log_recency", *(f"log_freq_{d}" for d in DECAYS), "freq_rank", "layer_position", "warm")


class LayerFeatures:
    """Per (layer, expert) state in visits of its layer, and the features of one layer's experts.

    Args:
        num_layers, num_experts, top_k: the routing geometry (top_k normalises frequencies to mean 1).
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        L, E = num_layers, num_experts
        self.L, self.E, self.k = L, E, top_k
        self.decays = np.array(DECAYS)  # [J]
        self.freq = np.full((L, E, len(DECAYS)), top_k / E)  # [L, E, J]
        self.last = np.full((L, E), -MAX_RECENCY, dtype=np.int64)  # [L, E] visit at which it was last routed
        self.visits = np.zeros(L, dtype=np.int64)  # [L]
        self._position = np.arange(L) / max(L - 1, 1)  # [L]
        self._scale = E / top_k

    def observe(self, layer: int, used) -> np.ndarray:
        """Layer `layer` was visited and routed to `used` (expert ids); returns its features [E, F]."""
        visits = self.visits[layer] + 1
        self.visits[layer] = visits
        row = self.freq[layer]  # [E, J]
        row *= self.decays
        if len(used):
            row[used] += 1 - self.decays
            self.last[layer, used] = visits
        out = np.empty((self.E, len(FEATURES)))
        out[:, 0] = np.minimum(visits - self.last[layer], MAX_RECENCY)
        out[:, 1:1 + len(DECAYS)] = row * self._scale
        np.log1p(out[:, :1 + len(DECAYS)], out=out[:, :1 + len(DECAYS)])
        out[:, 5] = np.argsort(np.argsort(row[:, 2])) / self.E
        out[:, 6] = self._position[layer]
        out[:, 7] = min(visits, 64) / 64
        return out


class MLPScorer:
    """Predictions from features: tanh(x W1 + b1) W2 + b2 on standardised inputs (numpy, float64). Output 0 is
    log n; output j (1..H) the logit of P(n <= j).

    Args:
        weights: "mean" [F], "std" [F], "w1" [F, D], "b1" [D], "w2" [D, 1 + H], "b2" [1 + H] (numpy arrays).
    """

    NAMES = ("mean", "std", "w1", "b1", "w2", "b2")

    def __init__(self, weights: dict[str, np.ndarray]):
        F = len(FEATURES)
        w = {n: np.asarray(weights[n], dtype=np.float64) for n in self.NAMES}
        if w["mean"].shape != (F,) or w["std"].shape != (F,) or w["w1"].shape[0] != F:
            raise ValueError(f"learned eviction weights have {w['w1'].shape[0]} inputs, this specmoe uses {F}")
        self.w = w
        self._w1 = w["w1"] / w["std"][:, None]  # standardisation folded into the first layer
        self._b1 = w["b1"] - (w["mean"] / w["std"]) @ w["w1"]
        if w["w2"].ndim != 2 or w["w2"].shape[1] != HEADS + 1 or w["b2"].shape != (HEADS + 1,):
            raise ValueError(f"learned eviction weights need {HEADS + 1} outputs, got w2 {w['w2'].shape}")
        self._w2, self._b2 = w["w2"], w["b2"]

    def __call__(self, x: np.ndarray) -> np.ndarray:  # [N, F] -> [N, 1 + H]
        return np.tanh(x @ self._w1 + self._b1) @ self._w2 + self._b2


class LearnedPolicy(ScoredPolicy):
    """Evict by the trained scorer's predictions of each resident expert's next use (see the module docstring).

    Rules (chosen at training, on the training routing's held-out tail):

    * "farthest": evict the largest predicted next use d + L * (n - 1), n = exp(predicted log n);
    * "density": evict the fewest expected hits per slot-step within `horizon` visits of its layer (as
      hit-density does one visit ahead): P(n <= h) / (d + L * (E[min(n, h)] - 1)).

    Args:
        scorer: maps features [E, F] to predictions [E, 1 + H] (`MLPScorer`).
        geometry: {"num_layers", "num_experts", "top_k"} it was trained on; checked when bound to a cache.
        rule / horizon: as above.
        info: what the policy directory said about its training (kept for reports).
        cost_s: seconds per MoE layer call the simulator charges: the measured cost of this policy's work
            (observe, touch, victim) beyond the default's, which the compute model's wrapper_s already holds.
    """

    name = "learned"

    def __init__(self, scorer: MLPScorer, geometry: dict, rule: str = "density", horizon: int = 4,
                 affinity: tuple[np.ndarray, np.ndarray] | None = None, info: dict | None = None,
                 cost_s: float = 0.0):
        if rule not in RULES or not 1 <= horizon <= HEADS:
            raise ValueError(f"need rule in {RULES} and 1 <= horizon <= {HEADS}, got {rule!r}, {horizon}")
        L, E = geometry["num_layers"], geometry["num_experts"]
        if affinity is not None and (affinity[0].shape != (L, E, E) or affinity[1].shape != (3,)):
            raise ValueError(f"affinity must be [{L}, {E}, {E}] and mix [3], got {affinity[0].shape}, "
                             f"{affinity[1].shape}")
        super().__init__()
        self.affinity = affinity
        self.scorer, self.geometry, self.info = scorer, dict(geometry), dict(info or {})
        self.rule, self.horizon = rule, horizon
        self.host_s_per_call = float(cost_s)
        self.cache = None
        self.layer: int | None = None
        self.predicted = frozenset()
        self._score: np.ndarray | None = None

    def bind(self, cache, num_layers: int) -> None:
        if cache is self.cache:
            return
        L, E = num_layers, cache.num_experts
        want = (self.geometry["num_layers"], self.geometry["num_experts"])
        if (L, E) != want:
            raise ValueError(f"learned eviction policy was trained for L={want[0]} E={want[1]}, the model has "
                             f"L={L} E={E}: train one on this model's routing (specmoe train --policy learned)")
        S = cache.num_slots
        self.cache, self.L, self.E = cache, L, E
        self.state = LayerFeatures(L, E, self.geometry["top_k"])
        self.within = np.zeros((L, E, self.horizon))  # [L, E, h] P(n <= j) predicted at the layer's last visit
        self.hit = np.ones((L, E))  # [L, E] density: P(n <= h); farthest: 1
        self.ahead = np.zeros((L, E))  # [L, E] predicted steps past the layer's next visit (L * (n - 1))
        self.slot_layer = np.full(S, -1, dtype=np.int64)  # [S], -1: empty
        self.slot_expert = np.zeros(S, dtype=np.int64)  # [S]

    def observe(self, layer: int, predicted, routed=()) -> None:
        if self.cache is None:
            return
        self.layer, self.predicted, self._score = layer, predicted, None
        out = self.scorer(self.state.observe(layer, list(routed)))  # [E, 1 + H]
        if self.rule == "farthest":
            self.ahead[layer] = self.L * np.expm1(np.clip(out[:, 0], 0.0, np.log(MAX_VISITS)))
            return
        h = self.horizon
        within = np.maximum.accumulate(1.0 / (1.0 + np.exp(-out[:, 1:h + 1])), axis=1)  # [E, h] P(n <= j)
        self.within[layer] = within
        self._density(layer, within)
        nxt = layer + 1
        if self.affinity is not None and nxt < self.L and len(routed):
            # this token's routing here sharpens P(n = 1) of the next layer's experts (visited next step)
            table, (a, b, c) = self.affinity
            base = self.within[nxt]  # [E, h]
            q1 = np.clip(base[:, 0], 1e-4, 1 - 1e-4)
            z = a * np.log(q1 / (1 - q1)) + b * table[layer][list(routed)].mean(0) + c
            p1 = 1.0 / (1.0 + np.exp(-z))  # [E]
            self._density(nxt, p1[:, None] + (1 - p1[:, None]) * (base - q1[:, None]) / (1 - q1[:, None]))

    def _density(self, layer: int, within: np.ndarray) -> None:
        """hit and ahead of `layer`'s experts from within [E, h] = P(n <= j), j = 1..h."""
        self.hit[layer] = within[:, -1]
        self.ahead[layer] = self.L * (self.horizon - 1 - within[:, :-1].sum(1))  # L * (E[min(n, h)] - 1)

    def touch(self, slot: int) -> None:
        super().touch(slot)
        if self.cache is not None:
            self.slot_layer[slot], self.slot_expert[slot] = self.cache.key_of[slot]
            if self._score is not None:
                self._score[slot] = np.inf  # holds an expert of the current layer now: kept this step

    def forget(self, slot: int) -> None:
        super().forget(slot)
        if self.cache is not None:
            self.slot_layer[slot] = -1

    def _scores(self) -> np.ndarray:
        """[S] keep value (lowest: evicted first), inf for kept slots."""
        occupied = self.slot_layer >= 0
        layers = np.where(occupied, self.slot_layer, 0)
        experts = self.slot_expert
        steps = ((layers - self.layer - 1) % self.L) + 1 + self.ahead[layers, experts]
        score = -steps if self.rule == "farthest" else self.hit[layers, experts] / steps
        score = self._keep_predicted(score)
        score[~occupied] = np.inf
        return score


def is_policy_dir(path) -> bool:
    """Whether `path` is a directory holding a learned eviction policy's config."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def save_learned_policy(path, weights: dict[str, np.ndarray], geometry: dict, info: dict) -> Path:
    """Write the policy directory `path` (config.json + model.safetensors) atomically: into a new directory
    beside it, then renamed over it (a reader sees the old policy or the whole new one). `weights`: the
    MLP's (`MLPScorer.NAMES`), and optionally "affinity" [L, E, E] with "mix" [3]."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write_safetensors(tmp / WEIGHTS_NAME, {n: torch.as_tensor(np.asarray(w, dtype=np.float32))
                                               for n, w in weights.items()}, metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, {"specmoe_policy": POLICY_KIND, "format_version": FORMAT_VERSION,
                                       "geometry": dict(geometry), "features": list(FEATURES),
                                       "decays": list(DECAYS), **info})
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.replace(path, old / "policy")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_learned_policy(path, geometry=None) -> LearnedPolicy:
    """A fresh `LearnedPolicy` from a directory `save_learned_policy` wrote.

    Args:
        geometry: the model's routing geometry (an `MoEGeometry` or dict); when given, another one is refused.

    Raises:
        FileNotFoundError: a file is missing. ValueError: not a learned policy, a newer format, other features,
        or another geometry.
    """
    path = Path(path)
    meta = read_json(path / CONFIG_NAME, what="eviction policy config")
    if not isinstance(meta, dict) or meta.get("specmoe_policy") != POLICY_KIND:
        raise ValueError(f"{path / CONFIG_NAME} is not a learned eviction policy (no specmoe_policy: {POLICY_KIND})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_NAME} has format {meta['format_version']}, newer than this specmoe")
    if meta.get("features") != list(FEATURES) or meta.get("decays") != list(DECAYS):
        raise ValueError(f"{path} was trained on features {meta.get('features')}, this specmoe computes "
                         f"{list(FEATURES)}: train it again")
    saved = meta["geometry"]
    if geometry is not None:
        have = geometry if isinstance(geometry, dict) else geometry.to_dict()
        diffs = [f"{k}: policy has {saved[k]}, model has {have[k]}" for k in ("num_layers", "num_experts", "top_k")
                 if k in have and saved.get(k) != have[k]]
        if diffs:
            raise ValueError(f"eviction policy at {path} was trained for another routing geometry ({'; '.join(diffs)})")
    tensors = read_safetensors(path / WEIGHTS_NAME, what="eviction policy weights")
    missing = [n for n in MLPScorer.NAMES if n not in tensors]
    if missing:
        raise ValueError(f"{path / WEIGHTS_NAME} lacks {missing}")
    scorer = MLPScorer({n: tensors[n].double().numpy() for n in MLPScorer.NAMES})
    rule = meta.get("rule", {})
    affinity = ((tensors["affinity"].double().numpy(), tensors["mix"].double().numpy())
                if "affinity" in tensors and "mix" in tensors else None)
    return LearnedPolicy(scorer, saved, rule=rule.get("name", "density"), horizon=int(rule.get("horizon", 4)),
                         affinity=affinity,
                         info=meta.get("training"), cost_s=meta.get("cost", {}).get("charged_s", 0.0))

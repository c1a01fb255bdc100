"""Applying a trained eviction table: a policy that keeps the experts of the most expected hits per slot-step.

Belady's MIN evicts the expert whose next use is farthest in the future. Decode visits the MoE layers in a
cycle, so the next use of a cached expert (l, e) seen from layer c is d + L * (n - 1) layer steps ahead, where
d = (l - c - 1) % L + 1 is known (when layer l comes round) and n (how many visits of l until e is routed
there again, 1 = the next) is not. `LearnedPolicy` looks n up: each (layer, expert) falls in a cell of a small
table by its routing frequency at three horizons, in visits of its own layer (`LayerState`), and the table holds the distribution of n that Belady's key had in that cell on a user's
training routing (`specmoe.training.eviction` counts it: a relaxed Belady over several visits, as Learning
Relaxed Belady does for CDN caches). The victim is the lowest expected hits per slot-step within `horizon`
visits of its layer, P(n <= h) / (d + L * (E[min(n, h)] - 1)) (hit density, as LHD does for web caches).
Experts the predictor wants and experts of the current layer touched this step are kept.

The table sees each expert's own history only. Where training found it gains (`specmoe.training.eviction`), a
transition lift adds what the other experts routed at the layer's latest visit say: lift[l, e', e] =
P(e routed at l's next visit | e' routed at its latest) / P(e routed at l), counted on the training routing;
when layer l is visited, its experts' P(n <= h) are multiplied by the mean lift over the experts it routed,
raised to a power (`LiftRule`), until it is visited again (the current token's routing at the other layers was
measured too: multiplied in the same way it lowered the hit rate).

The table goes on learning from the routing it serves (`OnlineLabels`, by the directory's `OnlineRule`): each
visit's label becomes known HORIZON visits later at the latest, and every few passes the counts move the trained
table, so a policy trained on little routing (Mixtral's 81 development tokens) adapts to the sequence it runs.

Cost (the hot path's budget is per MoE layer call): a layer call moves only its own layer's E cells (a dozen
numpy operations on E values, `observe`); a victim is a gather over the S slots, once per call; the online
labels are two list appends per call and, every `period` passes, a few operations on [visits, E] arrays.

The policy directory holds `config.json` (cells, geometry, horizon, training record, measured cost) and
`model.safetensors` (the table), written by `save_learned_policy` (atomically: a new directory beside, then
renamed) and read by `load_learned_policy`, which `make_policy` calls for a directory path.
"""

# Shape legend: L MoE layers, E experts, S slots, J frequency horizons, B table cells, H visits the table resolves

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import read_json, read_safetensors, write_json, write_safetensors
from .policies import ScoredPolicy

POLICY_KIND = "learned-eviction"
FORMAT_VERSION = 3  # 1: an MLP on visit features (retired); 2: no transition lift (still read)
READ_VERSIONS = (2, 3)
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
DECAYS = (0.5, 0.8, 0.98)  # frequency horizons: exponential averages per visit of the layer (0.5: recency)
FREQ_BUCKETS = (8, 8, 8)  # per horizon: buckets 1/FREQ_SCALE wide in units of the layer's mean k / E, the last open
FREQ_SCALE = 2.0
HORIZON = 8  # the table's columns: P(n = j) for j = 1..HORIZON, then P(n > HORIZON)
HORIZONS = (1, 2, 4)  # rules training may choose
CELLS = int(np.prod(FREQ_BUCKETS))
FEATURES = tuple(f"freq_{d}" for d in DECAYS)  # the table's axes, recorded in config.json


class LayerState:
    """Per (layer, expert) routing frequencies at several horizons in visits of its layer (the fastest one
    stands for recency), and the table cell of each.

    Args:
        num_layers, num_experts, top_k: the routing geometry (top_k normalises frequencies to mean 1).
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        L, E = num_layers, num_experts
        self.L, self.E = L, E
        scale = FREQ_SCALE * E / top_k  # frequencies are kept in bucket units
        self.decays = np.array(DECAYS)  # [J]
        self.keep = (1.0 - self.decays) * scale  # [J] what a routed visit adds
        self.freq = np.full((L, E, len(DECAYS)), top_k / E * scale)  # [L, E, J]
        self._caps = np.array(FREQ_BUCKETS) - 1e-9  # [J] below the last bucket's end
        self._strides = np.cumprod((1, *FREQ_BUCKETS[::-1]))[::-1][1:].copy()  # [J] cell strides (int)
        self._buckets = np.empty((E, len(DECAYS)))  # [E, J] scratch
        self.cell = np.stack([self._cells(layer) for layer in range(L)])  # [L, E]

    def _cells(self, layer: int) -> np.ndarray:  # [E] int
        buckets = np.minimum(self.freq[layer], self._caps, out=self._buckets)  # [E, J]
        return np.dot(buckets.astype(np.int64), self._strides)

    def observe(self, layer: int, used) -> np.ndarray:
        """Layer `layer` was visited and routed to `used` (expert ids: an int array or a list); returns its
        experts' cells [E]."""
        row = self.freq[layer]  # [E, J] (a view: updated in place)
        row *= self.decays
        if len(used):
            row[used] += self.keep
        cell = self.cell[layer] = self._cells(layer)
        return cell


def pass_routing(stream, num_experts: int) -> np.ndarray:
    """[P, L, E] bool: the experts each pass of a routing stream (`specmoe.traces.routing.Routing`) routed at each
    MoE layer: the visits training labels and the ceilings replay."""
    ids = stream.ids.numpy()  # [N, L, k]
    off = stream.pass_offsets.numpy()
    used = np.zeros((len(off) - 1, ids.shape[1], num_experts), dtype=bool)  # [P, L, E]
    pass_of = np.repeat(np.arange(len(off) - 1), np.diff(off))  # [N]
    t, layer, e = np.nonzero(ids >= 0)
    used[pass_of[t], layer, ids[t, layer, e]] = True
    return used


def keep_terms(table: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """From table [B, H + 1] (P(n = j), j = 1..H, then n > H): P(n <= h) [B] and E[min(n, h)] - 1 [B]."""
    within = np.cumsum(table[:, :horizon], 1)  # [B, h] P(n <= j)
    return within[:, -1], horizon - 1 - within[:, :-1].sum(1)


@dataclass(frozen=True)
class OnlineRule:
    """How the served routing moves the table: every `period` passes (period * L layer calls), the visits whose
    label is known are counted, and each cell's row becomes (prior * trained row + its online counts) / (prior +
    their sum); the online counts decay by `decay` at each refresh."""

    prior: float = 200.0
    decay: float = 1.0
    period: int = 16

    def __post_init__(self):
        if self.prior <= 0 or not 0 < self.decay <= 1 or self.period < 1:
            raise ValueError(f"online rule needs prior > 0, 0 < decay <= 1 and period >= 1, got {self}")


class OnlineLabels:
    """Belady's label, learned from the routing as it is served. Each layer's visits (routed ids, the cells
    they left) wait in a buffer; at a refresh, every waiting visit with HORIZON visits after it gets its label
    per expert (n: the first later visit that routes it, 1..HORIZON, else past HORIZON) and is counted, and the
    last HORIZON visits wait on. A layer call writes one row; the labels are a few operations on [L, visits, E]
    arrays per refresh. Deterministic: the runtime and the simulator that drive one policy through the same
    calls get one table."""

    def __init__(self, L: int, E: int, rule: OnlineRule):
        H = HORIZON
        self.L, self.E, self.rule, self.cols = L, E, rule, H + 1
        cap = rule.period + 2 * H  # visits a layer may hold (more than a period's: they wait for a refresh)
        self.used = np.zeros((L, cap, E), dtype=bool)  # [L, V, E] routed at each waiting visit
        self.cells = np.zeros((L, cap, E), dtype=np.int64)  # [L, V, E] the cells each waiting visit left
        self.waiting = np.zeros(L, dtype=np.int64)  # [L] waiting visits per layer
        self.counts = np.zeros((CELLS, H + 1))  # [B, H + 1] online counts
        self._parts: list[np.ndarray] = []
        self._calls, self._due = 0, rule.period * L

    def add(self, layer: int, routed, cell: np.ndarray) -> bool:
        """Layer `layer`'s visit routed `routed` and left its experts in `cell` [E]; True when the table is due
        for a refresh."""
        v = int(self.waiting[layer])
        if v == self.used.shape[1]:  # this layer came round more often than the others: label it alone now
            self._label(slice(layer, layer + 1))
            v = int(self.waiting[layer])
        self.used[layer, v, routed] = True
        self.cells[layer, v] = cell
        self.waiting[layer] = v + 1
        self._calls += 1
        return self._calls % self._due == 0

    def _label(self, layers) -> None:
        """Count every known label of `layers` (a slice of layers with equally many waiting visits, V > H) and
        keep their last HORIZON visits waiting."""
        H = HORIZON
        V = int(self.waiting[layers][0])
        R = V - H  # visits with H visits after them
        if R <= 0:
            return
        used = self.used[layers]  # [n, cap, E] (a view)
        column = np.full(used[:, :R].shape, H, dtype=np.int64)  # [n, R, E] past H
        for j in range(H, 0, -1):  # the nearest later visit that routes it wins
            column[used[:, j : j + R]] = j - 1
        column += self.cells[layers][:, :R] * self.cols
        self._parts.append(column.ravel())
        used[:, :H] = used[:, R:V]
        used[:, H:V] = False
        cells = self.cells[layers]
        cells[:, :H] = cells[:, R:V].copy()
        self.waiting[layers] = H

    def table(self, trained: np.ndarray) -> np.ndarray:
        """[B, H + 1] the trained table moved by the counts so far (after counting what is known)."""
        counts = self.counts
        if self.rule.decay < 1:
            counts *= self.rule.decay
        waiting = self.waiting
        if np.all(waiting == waiting[0]):  # decode: every layer visited alike, all at once
            self._label(slice(0, self.L))
        else:
            for layer in range(self.L):
                self._label(slice(layer, layer + 1))
        if self._parts:
            counts += np.bincount(np.concatenate(self._parts), minlength=counts.size).reshape(counts.shape)
            self._parts.clear()
        prior = self.rule.prior
        return (prior * trained + counts) / (prior + counts.sum(1, keepdims=True))


@dataclass(frozen=True)
class LiftRule:
    """How the transition lift moves a visited layer's P(n <= h): times (mean lift over the routed experts) ** power."""

    power: float = 1.0

    def __post_init__(self):
        if not self.power > 0:
            raise ValueError(f"the lift's power must be > 0, got {self.power}")


class LearnedPolicy(ScoredPolicy):
    """Evict by the trained table's distribution of each resident expert's next use (see the module docstring).

    Args:
        table: [CELLS, HORIZON + 1] P(n = j) per cell (rows sum to 1).
        geometry: {"num_layers", "num_experts", "top_k"} it was trained on; checked when bound to a cache.
        horizon: h of the rule (1 .. HORIZON).
        info: what the policy directory said about its training (kept for reports).
        cost_s: seconds per MoE layer call the simulator charges: the measured cost of this policy's work
            (observe, touch, victim) beyond the default's, which the compute model's wrapper_s already holds.
        online: the rule by which the table goes on learning from the routing it serves (`OnlineRule`, or its
            fields as a dict; None: the trained table as it is).
        lift: [L, E, E] the transition lift (see the module docstring; None: none), applied by `lift_rule`
            (`LiftRule` or its fields as a dict).
    """

    name = "learned"

    def __init__(self, table: np.ndarray, geometry: dict, horizon: int = 2, info: dict | None = None,
                 cost_s: float = 0.0, online: OnlineRule | dict | None = None, lift: np.ndarray | None = None,
                 lift_rule: LiftRule | dict | None = None):
        table = np.asarray(table, dtype=np.float64)
        if table.shape != (CELLS, HORIZON + 1) or not np.all(table >= 0):
            raise ValueError(f"the eviction table must be [{CELLS}, {HORIZON + 1}] of probabilities, got "
                             f"{table.shape}: train it again with this specmoe")
        if not 1 <= horizon <= HORIZON:
            raise ValueError(f"need 1 <= horizon <= {HORIZON}, got {horizon}")
        super().__init__()
        self.table, self.geometry, self.info = table, dict(geometry), dict(info or {})
        self.horizon = horizon
        self.online = OnlineRule(**online) if isinstance(online, dict) else online
        self.lift_rule = LiftRule(**lift_rule) if isinstance(lift_rule, dict) else (lift_rule or LiftRule())
        self.lift = None
        if lift is not None:
            L, E = geometry["num_layers"], geometry["num_experts"]
            lift = np.asarray(lift, dtype=np.float64)
            if lift.shape != (L, E, E) or not np.all(lift > 0):
                raise ValueError(f"the transition lift must be [{L}, {E}, {E}] of positive ratios, got {lift.shape}")
            self.lift = lift ** self.lift_rule.power  # [L, E, E]
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
        self._bind_slots(cache, L, E)
        self.state = LayerState(L, E, self.geometry["top_k"])
        hit, extra = keep_terms(self.table, self.horizon)
        self._hit_of, self._ahead_of = hit, L * extra  # [B] per cell: P(n <= h), steps past the next visit
        # per (layer, expert), flat, then one entry for an empty slot: hit inf (never a victim), nothing ahead
        self.hit = np.append(hit[self.state.cell.ravel()], np.inf)  # [L * E + 1]
        self.ahead = np.append(self._ahead_of[self.state.cell.ravel()], 0.0)  # [L * E + 1]
        if self.online is not None:
            self._labels = OnlineLabels(L, E, self.online)
        self._lifted = np.ones(L * E) if self.lift is not None else None  # [L * E] the lift in force per expert
        self._k = self.geometry["top_k"]
        self._lift_k = None if self.lift is None else self.lift / self._k  # [L, E, E]: summed over k routed, the mean
        self._score_buf, self._steps_buf = np.empty(cache.num_slots), np.empty(cache.num_slots)  # [S] scratch

    def observe(self, layer: int, predicted, routed=()) -> None:
        if self.cache is None:
            return
        self.layer, self.predicted, self._score = layer, predicted, None
        cell = self.state.observe(layer, routed)
        if self.online is not None and self._labels.add(layer, routed, cell):
            self._refresh()
        lo = layer * self.E
        hit = self._hit_of.take(cell, out=self.hit[lo : lo + self.E])  # into the layer's entries (views)
        if self.horizon > 1:  # within one visit nothing lies past the next: ahead stays 0
            self._ahead_of.take(cell, out=self.ahead[lo : lo + self.E])
        if self._lifted is not None:  # the mean lift over the routed experts (lift holds 1 / k of it)
            lifted = self._lifted[lo : lo + self.E]
            if len(routed):
                np.add.reduce(self._lift_k[layer].take(routed, 0), 0, out=lifted)
                if len(routed) != self._k:
                    lifted *= self._k / len(routed)
                hit *= lifted
            else:
                lifted.fill(1.0)

    def _refresh(self) -> None:
        """The table moved by the served routing's labels (`OnlineLabels.table`): every cell's terms again."""
        table = self._labels.table(self.table)
        hit, extra = keep_terms(table, self.horizon)
        self._hit_of, self._ahead_of = hit, self.L * extra
        cells = self.state.cell.ravel()
        self.hit[:-1] = self._hit_of.take(cells)
        if self._lifted is not None:
            self.hit[:-1] *= self._lifted
        self.ahead[:-1] = self._ahead_of.take(cells)

    def _scores(self) -> np.ndarray:
        """[S] expected hits per slot-step (lowest: evicted first), inf for kept and empty slots."""
        flat, score, steps = self.slot_flat, self._score_buf, self._steps_buf  # buffers reused every call
        self._steps[self.layer].take(self.slot_layer, out=steps)
        if self.horizon > 1:
            steps += self.ahead.take(flat, out=score)
        np.divide(self.hit.take(flat, out=score), steps, out=score)
        return self._keep_predicted(score)


def is_policy_dir(path) -> bool:
    """Whether `path` is a directory holding a learned eviction policy's config."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def save_learned_policy(path, table: np.ndarray, geometry: dict, info: dict, lift: np.ndarray | None = None) -> Path:
    """Write the policy directory `path` (config.json + model.safetensors) atomically: into a new directory
    beside it, then renamed over it (a reader sees the old policy or the whole new one)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tensors = {"table": torch.as_tensor(np.asarray(table, dtype=np.float32))}
        if lift is not None:
            tensors["lift"] = torch.as_tensor(np.asarray(lift, dtype=np.float32))
        write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, {"specmoe_policy": POLICY_KIND, "format_version": FORMAT_VERSION,
                                       "geometry": dict(geometry), "features": list(FEATURES),
                                       "cells": _cells_config(), **info})
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


def _cells_config() -> dict:
    return {"decays": list(DECAYS), "freq_buckets": list(FREQ_BUCKETS),
            "freq_scale": FREQ_SCALE, "horizon": HORIZON}


def load_learned_policy(path, geometry=None) -> LearnedPolicy:
    """A fresh `LearnedPolicy` from a directory `save_learned_policy` wrote.

    Args:
        geometry: the model's routing geometry (an `MoEGeometry` or dict); when given, another one is refused.

    Raises:
        FileNotFoundError: a file is missing. ValueError: not a learned policy, another format, other table
        cells, or another geometry.
    """
    path = Path(path)
    meta = read_json(path / CONFIG_NAME, what="eviction policy config")
    if not isinstance(meta, dict) or meta.get("specmoe_policy") != POLICY_KIND:
        raise ValueError(f"{path / CONFIG_NAME} is not a learned eviction policy (no specmoe_policy: {POLICY_KIND})")
    if meta.get("format_version", 0) not in READ_VERSIONS:
        raise ValueError(f"{path / CONFIG_NAME} has format {meta.get('format_version')}, this specmoe reads "
                         f"{' or '.join(map(str, READ_VERSIONS))}: train it again (specmoe train --policy learned)")
    if meta.get("features") != list(FEATURES) or meta.get("cells") != _cells_config():
        raise ValueError(f"{path} was trained on table cells {meta.get('cells')}, this specmoe uses "
                         f"{_cells_config()}: train it again")
    saved = meta["geometry"]
    if geometry is not None:
        have = geometry if isinstance(geometry, dict) else geometry.to_dict()
        diffs = [f"{k}: policy has {saved[k]}, model has {have[k]}" for k in ("num_layers", "num_experts", "top_k")
                 if k in have and saved.get(k) != have[k]]
        if diffs:
            raise ValueError(f"eviction policy at {path} was trained for another routing geometry ({'; '.join(diffs)})")
    tensors = read_safetensors(path / WEIGHTS_NAME, what="eviction policy weights")
    if "table" not in tensors:
        raise ValueError(f"{path / WEIGHTS_NAME} lacks the table")
    rule = meta.get("rule", {})
    try:
        online = OnlineRule(**rule["online"]) if rule.get("online") else None
    except TypeError:
        raise ValueError(f"{path / CONFIG_NAME} has an online rule this specmoe does not read: "
                         f"{rule['online']}") from None
    lift = None
    if rule.get("lift"):
        if "lift" not in tensors:
            raise ValueError(f"{path / CONFIG_NAME} names a transition lift, {path / WEIGHTS_NAME} lacks it")
        lift = tensors["lift"].double().numpy()
    try:
        lift_rule = LiftRule(**rule["lift"]) if rule.get("lift") else None
    except TypeError:
        raise ValueError(f"{path / CONFIG_NAME} has a lift rule this specmoe does not read: {rule['lift']}") from None
    return LearnedPolicy(tensors["table"].double().numpy(), saved, horizon=int(rule.get("horizon", 2)),
                         info=meta.get("training"), cost_s=meta.get("cost", {}).get("charged_s", 0.0),
                         online=online, lift=lift, lift_rule=lift_rule)

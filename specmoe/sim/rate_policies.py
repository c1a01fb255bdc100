"""Eviction by routing rate, for the ceilings of learned eviction (`benchmarks/eviction_ceilings.py`): how well a
policy could do if it knew each cached (layer, expert)'s routing rate, and how close a rate estimated from history
alone gets.

At layer c, a resident expert (l, e) is next needed d = (l - c - 1) % L + 1 layer steps ahead at the earliest (the
steps table of `ScoredPolicy`). Both policies evict the lowest rate / d: expected hits per slot-step.

* `RateOraclePolicy` (simulator only: it reads the routing's future): the true share of the visits of layer l that
  route e over a window from l's next visit: its next `window` visits (W = 1: exactly the next visit's use), or
  the rest of the sequence that visit is in (window None: a frequency oracle).
* `HistoryRatePolicy`: a linear estimate of that rate from exponentially decayed counts of e's routing at
  several decays (decay 0: routed at the latest visit), with weights per layer fitted by least squares on
  training routing (`fit_history_rates`): what the table of `learned_policy` could at best learn from those
  features, as a ranking.
* `BlendedRatePolicy`: a mix of the two, for the error a rate estimate may have to reach a goal
  (`history_error` measures the history estimate's).
"""

# Shape legend: P passes, L MoE layers, E experts, S slots, J decays, W window (visits)

from __future__ import annotations

import numpy as np

from ..runtime.learned_policy import pass_routing as routed_array  # [P, L, E] bool: each pass's routing
from ..runtime.policies import ScoredPolicy

__all__ = ["BlendedRatePolicy", "FutureRates", "HistoryRatePolicy", "RateOraclePolicy", "fit_history_rates",
           "history_error", "routed_array", "sequence_ends"]

HISTORY_DECAYS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)


def sequence_ends(stream) -> np.ndarray:
    """[P] the pass after the last pass of the sequence each pass is in."""
    off = stream.pass_offsets.numpy()
    starts = np.searchsorted(off, stream.seq_offsets.numpy()[1:], side="left")  # [S] pass index of each end
    return starts[np.searchsorted(starts, np.arange(len(off) - 1), side="right")]


class _RatePolicy(ScoredPolicy):
    """Shared: bound to a cache, observes calls; `_rates(flat)` gives the rate of the slots' experts."""

    def __init__(self):
        super().__init__()
        self.cache = None
        self.layer: int | None = None
        self.predicted = frozenset()
        self._score = None
        self.now = 0

    def bind(self, cache, num_layers: int) -> None:
        if cache is self.cache:
            return
        self._bind_slots(cache, num_layers, cache.num_experts)

    def observe(self, layer: int, predicted, routed=()) -> None:
        if self.cache is None:
            return
        self.layer, self.predicted, self._score = layer, predicted, None

    def observe_time(self, now: int) -> None:
        self.now = now  # pass * L + layer (the scheduler's clock)

    def _scores(self) -> np.ndarray:
        flat, layers = self.slot_flat, self.slot_layer
        score = self._rates(flat, layers) / self._steps[self.layer][layers]
        score[layers < 0] = np.inf
        return self._keep_predicted(score)


class FutureRates:
    """The true routing rate of experts over a window from their layer's next visit (read from the future).

    Args:
        used: [P, L, E] the routing of the stream the simulator replays (`routed_array`).
        window: visits of each layer the rate is taken over, from its next visit (None: to its sequence's end).
        ends: [P] `sequence_ends` of the stream (needed for window None).
    """

    def __init__(self, used: np.ndarray, window: int | None = 16, ends: np.ndarray | None = None):
        if window is None and ends is None:
            raise ValueError("the frequency oracle (window None) needs the sequences' ends")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        P, L, E = used.shape
        self.P, self.L, self.window = P, L, window
        self.ends = None if ends is None else np.append(np.asarray(ends, dtype=np.int64), P)  # [P + 1]
        cum = np.zeros((P + 1, L * E + 1), dtype=np.float32)  # [P + 1, L * E + 1]: the last column: empty slots
        np.cumsum(used.reshape(P, L * E), 0, out=cum[1:, :-1])
        self.cum = cum.ravel()
        self.cols = L * E + 1

    def rates(self, now: int, flat: np.ndarray, layers: np.ndarray) -> np.ndarray:
        """[S] at clock `now` (pass * L + layer), the rate of experts `flat` (layer * E + expert) of `layers`."""
        t, c = divmod(now, self.L)
        a = np.minimum(t + (layers <= c), self.P)  # [S] the pass of the next visit of each slot's layer
        b = self.ends[a] if self.window is None else np.minimum(a + self.window, self.P)
        n = np.maximum(b - a, 1)
        return (self.cum[b * self.cols + flat] - self.cum[a * self.cols + flat]) / n


class RateOraclePolicy(_RatePolicy):
    """Evict the lowest true rate / d (see the module docstring); arguments as `FutureRates`'."""

    def __init__(self, used: np.ndarray, window: int | None = 16, ends: np.ndarray | None = None):
        super().__init__()
        self.future = FutureRates(used, window, ends)
        self.name = "oracle rate, " + ("rest of the sequence" if window is None else f"next {window} visits")

    def _rates(self, flat, layers) -> np.ndarray:
        return self.future.rates(self.now, flat, layers)


class HistoryRatePolicy(_RatePolicy):
    """Evict the lowest estimated rate / d; the estimate is weights[l] . [counts at each decay, 1].

    Args:
        weights: [L, J + 1] per layer (`fit_history_rates`).
        decays: [J] the decays of the counts (per visit of the layer).
    """

    def __init__(self, weights: np.ndarray, decays=HISTORY_DECAYS, name: str = "history rate"):
        super().__init__()
        self.weights, self.decays = np.asarray(weights, dtype=np.float64), np.asarray(decays, dtype=np.float64)
        self.name = name

    def bind(self, cache, num_layers: int) -> None:
        if cache is self.cache:
            return
        super().bind(cache, num_layers)
        L, E, J = num_layers, cache.num_experts, len(self.decays)
        if self.weights.shape != (L, J + 1):
            raise ValueError(f"history weights are {self.weights.shape}, the model needs [{L}, {J + 1}]")
        self.counts = np.zeros((L, E, J))  # [L, E, J]
        self.rate = np.append(self._estimate(np.arange(L)).ravel(), 0.0)  # [L * E + 1]

    def _estimate(self, layers) -> np.ndarray:  # [n, E]
        return np.einsum("nej,nj->ne", self.counts[layers], self.weights[layers, :-1]) + self.weights[layers, -1:]

    def observe(self, layer: int, predicted, routed=()) -> None:
        if self.cache is None:
            return
        super().observe(layer, predicted, routed)
        row = self.counts[layer]  # [E, J]
        row *= self.decays
        if len(routed):
            row[list(routed)] += 1.0 - self.decays
        E = self.E
        self.rate[layer * E : (layer + 1) * E] = row @ self.weights[layer, :-1] + self.weights[layer, -1]

    def _rates(self, flat, layers) -> np.ndarray:
        return self.rate[flat]


class BlendedRatePolicy(HistoryRatePolicy):
    """Evict the lowest (share * true rate + (1 - share) * history estimate) / d: an estimate whose error is
    (1 - share) times the history estimate's (`history_error`), between history (share 0) and the oracle (1).

    Args:
        future: `FutureRates` of the replayed stream. weights, decays: as `HistoryRatePolicy`'s.
    """

    def __init__(self, future: FutureRates, weights: np.ndarray, share: float, decays=HISTORY_DECAYS):
        if not 0 <= share <= 1:
            raise ValueError(f"share must be in [0, 1], got {share}")
        super().__init__(weights, decays, name=f"blend {share:g}")
        self.future, self.share = future, share

    def _rates(self, flat, layers) -> np.ndarray:
        return self.share * self.future.rates(self.now, flat, layers) + (1 - self.share) * self.rate[flat]


def history_error(used: np.ndarray, weights: np.ndarray, window: int, decays=HISTORY_DECAYS,
                  chunk: int = 1000) -> dict:
    """On routing `used` [P, L, E]: the root mean square error of the history estimate (`HistoryRatePolicy`'s,
    after each visit) against the true rate over the next `window` visits, and that of the per-layer mean rate
    (the spread a ranking has to explain): {"rmse", "rmse_mean"}."""
    P, L, E = used.shape
    d = np.asarray(decays, dtype=np.float64)
    state = np.zeros((L, E, len(d)))
    mean = used.mean((0, 2))[:, None]  # [L, 1]
    sq = sq_mean = 0.0
    n = 0
    for s in range(0, P - 1, chunk):
        e = min(s + chunk, P - 1)
        est = np.empty((e - s, L, E))
        for t in range(s, e):
            state *= d
            state += used[t][..., None] * (1.0 - d)
            est[t - s] = np.einsum("lej,lj->le", state, weights[:, :-1]) + weights[:, -1:]
        span = used[s + 1 : min(e + window, P)].astype(np.int32)
        cum = np.concatenate([np.zeros((1, L, E), np.int32), np.cumsum(span, 0)])
        a = np.arange(e - s)
        b = np.minimum(a + window, cum.shape[0] - 1)
        y = (cum[b] - cum[a]) / np.maximum(b - a, 1)[:, None, None]
        sq += float(((est - y) ** 2).sum())
        sq_mean += float(((mean - y) ** 2).sum())
        n += y.size
    return {"rmse": (sq / max(n, 1)) ** 0.5, "rmse_mean": (sq_mean / max(n, 1)) ** 0.5}


def fit_history_rates(used: np.ndarray, window: int = 16, decays=HISTORY_DECAYS, per_layer: bool = True,
                      ridge: float = 1e-3, single: bool = False, chunk: int = 1000) -> np.ndarray:
    """[L, J + 1] least-squares weights predicting each expert's rate over its layer's next `window` visits (fewer
    at the stream's end) from the decayed counts after a visit, on training routing `used` [P, L, E]: per layer, or
    one fit shared by every layer. `single`: per layer, the one decay (with a scale and an offset) of the smallest
    squared error. The normal equations are summed over chunks of passes (the features of 78k passes would not
    fit in memory)."""
    P, L, E = used.shape
    d = np.asarray(decays, dtype=np.float64)
    J = len(d)
    G = np.zeros((L, J + 1, J + 1))  # [L, J + 1, J + 1] sum of x x^T
    g = np.zeros((L, J + 1))  # [L, J + 1] sum of x y
    yy = np.zeros(L)  # [L] sum of y^2
    state = np.zeros((L, E, J))
    for s in range(0, P - 1, chunk):
        e = min(s + chunk, P - 1)  # visits s..e-1, each with a future
        X = np.empty((e - s, L, E, J + 1))
        X[..., J] = 1.0
        for t in range(s, e):
            state *= d
            state += used[t][..., None] * (1.0 - d)
            X[t - s, ..., :J] = state
        span = used[s + 1 : min(e + window, P)].astype(np.int32)  # the futures of visits s..e-1
        cum = np.concatenate([np.zeros((1, L, E), np.int32), np.cumsum(span, 0)])  # [., L, E]
        a = np.arange(e - s)  # visit s + i's future starts at pass s + i + 1, row i of cum
        b = np.minimum(a + window, cum.shape[0] - 1)
        y = (cum[b] - cum[a]) / np.maximum(b - a, 1)[:, None, None]  # [C, L, E]
        G += np.einsum("clej,clek->ljk", X, X)
        g += np.einsum("clej,cle->lj", X, y)
        yy += np.einsum("cle,cle->l", y, y)
    if not per_layer:
        G, g, yy = (np.broadcast_to(v.sum(0), v.shape).copy() for v in (G, g, yy))
    out = np.zeros((L, J + 1))
    for layer in range(L):
        n = G[layer, J, J]
        if single:  # the decay whose two-column fit leaves the least squared error
            best = None
            for j in range(J):
                cols = [j, J]
                Gs = G[layer][np.ix_(cols, cols)] + ridge * n * np.eye(2)
                w = np.linalg.solve(Gs, g[layer, cols])
                err = yy[layer] - 2 * w @ g[layer, cols] + w @ G[layer][np.ix_(cols, cols)] @ w
                if best is None or err < best[0]:
                    best = (err, cols, w)
            out[layer, best[1]] = best[2]
        else:
            out[layer] = np.linalg.solve(G[layer] + ridge * n * np.eye(J + 1), g[layer])
    return out

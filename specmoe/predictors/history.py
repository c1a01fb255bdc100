"""History predictor: expert frequencies and layer-to-layer transition counts, learned from traces by counting.

Layers are numbered on one "flat" axis across tokens: step i * L + l is MoE layer l of token i, so layer t
of the next token is step L + t, and every transition has a distance delta = target step - source step.
For each source layer s and distance delta the predictor counts how often expert j routed at s is followed by
expert e at s + delta, and scores a target layer with a naive-Bayes sum over the known source layers:

    score(e @ t) = log P(e @ t) + sum_{s in last C layers} sum_{j routed at s} [log P(e @ t | j @ s) - log P(e @ t)]
"""

# Shape legend: T tokens, N trace tokens, E experts, L MoE layers, k top-k, C context, D lookahead,
# G = C - 1 + D distances

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..geometry import MoEGeometry
from .base import Predictor, register_predictor


@register_predictor("history")
class HistoryPredictor(Predictor):
    """Counts-based predictor (no gradient training; fit it with `HistoryPredictor.fit(trace, ...)`).

    Args:
        geometry: the model's routing geometry.
        lookahead: D, target layers l+1..l+D.
        context: C, how many known layers (l, l-1, ...) vote. The naive-Bayes sum counts correlated
            evidence twice, and one pair never seen together vetoes an expert: on reference-model traces C=2
            and C=3 ranked worse than C=1, the default.
        wrap: also score the next token's first layers.
        alpha: additive smoothing of the counts.
        prior: [L, E] counts of expert e routed at layer l (zeros before fitting).
        pairs: [L, G, E, E] counts of expert j at layer s followed by expert e at step s + delta (delta = 1..G).
    """

    def __init__(self, geometry: MoEGeometry, lookahead: int = 2, context: int = 1, wrap: bool = True,
                 alpha: float = 0.5, prior: torch.Tensor | None = None, pairs: torch.Tensor | None = None):
        if geometry is None:
            raise ValueError("HistoryPredictor needs the model's geometry (MoEGeometry)")
        if context < 1 or alpha <= 0:
            raise ValueError(f"context must be >= 1 and alpha > 0, got context={context}, alpha={alpha}")
        super().__init__(lookahead, geometry)
        L, E = geometry.num_layers, geometry.num_experts
        if lookahead > L:
            raise ValueError(f"lookahead {lookahead} exceeds the {L} MoE layers; use at most that")
        self.context, self.wrap, self.alpha = context, bool(wrap), float(alpha)
        G = context - 1 + lookahead
        self.prior = torch.zeros(L, E) if prior is None else prior.float()  # [L, E]
        self.pairs = torch.zeros(L, G, E, E) if pairs is None else pairs.float()  # [L, G, E, E]
        if tuple(self.prior.shape) != (L, E) or tuple(self.pairs.shape) != (L, G, E, E):
            raise ValueError(f"HistoryPredictor counts have shapes {tuple(self.prior.shape)} / "
                             f"{tuple(self.pairs.shape)}, expected [{L}, {E}] / [{L}, {G}, {E}, {E}]")
        self._tables()

    def _tables(self) -> None:
        """log P(e @ t) [L, E] and PMI tables [L, G, E, E] from the counts (recomputed after fitting/loading)."""
        L, E = self.geometry.num_layers, self.geometry.num_experts
        a = self.alpha
        self.log_prior = ((self.prior + a) / (self.prior + a).sum(-1, keepdim=True)).log()  # [L, E]
        cond = ((self.pairs + a) / (self.pairs + a).sum(-1, keepdim=True)).log()  # [L, G, E, E]
        G = self.pairs.shape[1]
        target_layer = (torch.arange(L)[:, None] + torch.arange(1, G + 1)[None]) % L  # [L, G]
        pmi = cond - self.log_prior[target_layer][:, :, None, :]  # [L, G, E, E]
        self.pmi = torch.cat([pmi, torch.zeros(L, G, 1, E)], dim=2)  # row E: an unrouted (-1) source votes 0
        self._device = torch.device("cpu")
        self._index_cache: dict = {}

    @classmethod
    @torch.no_grad()
    def fit(cls, trace, lookahead: int = 2, context: int = 1, wrap: bool = True, alpha: float = 0.5,
            progress: bool = True) -> "HistoryPredictor":
        """Count routing in `trace` (a specmoe.traces.RoutingTrace): frequencies and transitions.

        Transitions into the next token are counted only between tokens of one sequence.
        """
        geo = trace.geometry
        pred = cls(geo, lookahead=lookahead, context=context, wrap=wrap, alpha=alpha)
        L, E = geo.num_layers, geo.num_experts
        ids = trace.ids  # [N, L, k]
        N = ids.shape[0]
        for layer in range(L):
            routed = ids[:, layer].flatten()
            pred.prior[layer] = torch.bincount(routed[routed >= 0], minlength=E).float()
        G = pred.pairs.shape[1]
        seq = trace.sequence_of()  # [N]
        jobs = [(s, g) for s in range(L) for g in range(1, G + 1) if wrap or s + g < L]
        for s, g in tqdm(jobs, desc="count transitions", disable=not progress, leave=False):
            q, t = divmod(s + g, L)  # target: layer t of token i + q
            if q > 0:
                src_tok = torch.nonzero(seq[: N - q] == seq[q:]).flatten() if N > q else torch.zeros(0, dtype=torch.long)
            else:
                src_tok = torch.arange(N)
            src, dst = ids[src_tok, s], ids[src_tok + q, t]  # [n, k] each
            pair = (src[:, :, None] * E + dst[:, None, :]).flatten()  # [n * k * k]
            ok = ((src[:, :, None] >= 0) & (dst[:, None, :] >= 0)).flatten()
            pred.pairs[s, g - 1] = torch.bincount(pair[ok], minlength=E * E).view(E, E).float()
        pred._tables()
        return pred

    def _index(self, layer: int, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """For `layer`: table rows [n_targets, c] of (source s, distance t - s), target layers [n_targets], targets."""
        key = (layer, device)
        if key not in self._index_cache:
            L, G = self.geometry.num_layers, self.pmi.shape[1]
            targets = self.targets(layer, wrap=self.wrap)
            sources = range(max(0, layer - self.context + 1), layer + 1)
            rows = torch.tensor([[s * G + (t - s - 1) for s in sources] for t in targets], dtype=torch.long)
            self._index_cache[key] = (rows.to(device), torch.tensor([t % L for t in targets], device=device), targets)
        return self._index_cache[key]

    @torch.no_grad()
    def predict(self, layer: int, hidden: torch.Tensor, history: torch.Tensor) -> dict[int, torch.Tensor]:
        E = self.geometry.num_experts
        device = history.device
        if self._device != device:
            self.log_prior, self.pmi, self._device = self.log_prior.to(device), self.pmi.to(device), device
        rows, target_layers, targets = self._index(layer, device)  # [n, c], [n]
        if not targets:
            return {}
        known = history[:, layer + 1 - rows.shape[1] : layer + 1].remainder(E + 1)  # [T, c, k]; -1 -> E (votes 0)
        index = rows[None, :, :, None] * (E + 1) + known[:, None]  # [T, n, c, k]
        score = self.pmi.view(-1, E)[index].sum((2, 3)) + self.log_prior[target_layers]  # [T, n, E]
        return {t: score[:, i] for i, t in enumerate(targets)}

    def config(self) -> dict:
        return {"lookahead": self.lookahead, "context": self.context, "wrap": self.wrap, "alpha": self.alpha}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"prior": self.prior, "pairs": self.pairs}

    @classmethod
    def from_config(cls, config, tensors, geometry):
        missing = {"prior", "pairs"} - set(tensors)
        if missing:
            raise ValueError(f"HistoryPredictor weights lack {sorted(missing)}")
        return cls(geometry, prior=tensors["prior"], pairs=tensors["pairs"], **config)

"""Affinity predictor: a logistic model per (source layer, lookahead) over routing the runtime already knows.

Layers are numbered on one flat axis across tokens (step i * L + l is MoE layer l of token i). At layer l of
token i, predicting target t = l + d (d = 1..D; t >= L is layer t - L of the next token), the inputs are
multi-hots of the k experts routed at S known steps ("slots"):

* C recent slots: steps l, l-1, ..., l-C+1 (the layers just routed; before layer 0 they are the previous
  token's last layers): the experts of nearby layers that tend to be chosen together (cross-layer affinity);
* P token slots: the target's own layer in each of the P tokens before the target's token (the previous
  token's routing at layer t for t < L): experts repeat from one token to the next.

    logits[e] = b[l, d, e] + sum_{slot s} sum_{j routed at s} W[l, d, s, j, e]      (+ relu(sum U[...]) @ V[l, d])

trained with binary cross-entropy on the routed multi-hot (the one loop, `training.loop.train_predictor`), so
sigmoid(logit) is a calibrated probability of use. A slot with no routing (before the sequence's first token, or
a layer not yet routed in this pass) contributes its own learned row ("none"). With `hidden > 0` a small hidden
layer adds interactions between slots. One call is a dozen aten ops whatever T is (cheap at batch 1).

The token slots need the previous tokens' routing at layers later than l, which a prefill pass has not routed
yet but a decode step knows from the passes before it: the predictor keeps the last P tokens' routing since its
last `reset` (what it saw in `predict`, or in `observe` at the calls where admission skips it), so it is
`stateful`, and replays run it pass by pass as the runtime does (`sim.predictions`, `training.evaluate`). Tokens of one pass are
taken as consecutive positions of one sequence (batch-1 prefill, or one decode token); with a batch of several
sequences the token slots read neighbouring sequences (worse guesses, never a wrong result).
"""

# Shape legend: B rows, T tokens of a pass, E experts, L MoE layers, k top-k, D lookahead, S slots, P token slots,
# Q earlier tokens kept, H hidden width

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import MoEGeometry
from .base import register_predictor
from .trainable import TrainablePredictor


def slot_offsets(L: int, D: int, context: int, tokens: int) -> torch.Tensor:
    """[L, D, S] each slot's step relative to layer 0 of the current token (negative: earlier tokens)."""
    layer = torch.arange(L)[:, None, None]
    d = torch.arange(1, D + 1)[None, :, None]
    recent = (layer - torch.arange(context)[None, None, :]).expand(L, D, context)
    same = layer + d - L * torch.arange(1, tokens + 1)[None, None, :]  # layer t of the P tokens before t's token
    return torch.cat([recent, same], dim=2)


class AffinityNet(nn.Module):
    """The tables of `AffinityPredictor`: W [L * D * S * (E + 1), E] (row E of each slot: none), b [L, D, E], and
    with H > 0: U [L * D * S * (E + 1), H], c [L, D, H], V [L, D, H, E]."""

    def __init__(self, L: int, E: int, D: int, S: int, hidden: int):
        super().__init__()
        self.L, self.E, self.D, self.S, self.H = L, E, D, S, hidden
        rows = L * D * S * (E + 1)
        self.weight = nn.Embedding(rows, E)
        nn.init.zeros_(self.weight.weight)
        self.bias = nn.Parameter(torch.zeros(L, D, E))
        if hidden:
            self.up = nn.Embedding(rows, hidden)
            nn.init.normal_(self.up.weight, std=0.1)
            self.up_bias = nn.Parameter(torch.zeros(L, D, hidden))
            self.down = nn.Parameter(torch.zeros(L, D, hidden, E))
        # first table row of (layer, d, slot): [L, D, S]
        self.register_buffer("base", torch.arange(L * D * S).view(L, D, S) * (E + 1), persistent=False)

    def forward(self, layers: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """layers [B] source layers, ids [B, D, S, k] routed experts of each slot (-1: none) -> logits [B, D, E]."""
        B, D, S, k = ids.shape
        rows = (ids.remainder(self.E + 1) + self.base[layers][..., None]).view(B, D, S * k)  # [B, D, S*k]
        out = self.weight(rows).sum(2) + self.bias[layers]  # [B, D, E]
        if self.H:
            h = F.relu(self.up(rows).sum(2) + self.up_bias[layers])  # [B, D, H]
            out = out + (h[:, :, None, :] @ self.down[layers]).squeeze(2)  # [B, D, E]
        return out


@register_predictor("affinity")
class AffinityPredictor(TrainablePredictor):
    """Logistic (optionally one hidden layer) model of the next layers' experts from the routing of the last
    `context` layers and of the target layer in the `tokens` tokens before (see the module docstring).

    Args:
        geometry: the model's routing geometry.
        lookahead: D, target layers l+1..l+D.
        context: C, recent layers l, l-1, ... used (>= 1).
        tokens: P, earlier tokens whose routing at the target layer is used (>= 0).
        wrap: predict the next token's first layers from the last layers.
        hidden: H, width of the hidden layer (0: logistic only).
        new: N <= P; > 0: trained on, and ranking, only the experts not routed at the target layer in the N tokens
            before (the others are masked out of the scores): what a copy can bring, at every rank of its list.
        confident: c in [0, 1); > 0: at decode, name only the experts of calibrated probability above c (the
            others' scores are raised to logit(c), the row's minimum, which names none): fewer candidates, each
            as likely as c or more to be used, so admission's per-rank precision is the confident one's. Training
            is unchanged (the same weights as without it).
    """

    stateful = True

    def __init__(self, geometry: MoEGeometry, lookahead: int = 1, context: int = 3, tokens: int = 2,
                 wrap: bool = True, hidden: int = 0, new: int = 0, confident: float = 0.0):
        super().__init__(geometry, lookahead, wrap)
        L = geometry.num_layers
        if not 1 <= context <= L or not 0 <= tokens <= 8 or hidden < 0 or not 0 <= new <= tokens \
                or not 0.0 <= confident < 1.0:
            raise ValueError(f"AffinityPredictor needs 1 <= context <= {L} (the MoE layers), 0 <= tokens <= 8, "
                             f"hidden >= 0, 0 <= new <= tokens and 0 <= confident < 1; got context={context}, "
                             f"tokens={tokens}, hidden={hidden}, new={new}, confident={confident}")
        self.context, self.tokens, self.hidden, self.new = int(context), int(tokens), int(hidden), int(new)
        self.confident = float(confident)
        # the logit of probability `confident`: decode scores under it are raised to it, to the row's minimum, which
        # `top_candidates` names none of
        self._floor = math.log(confident / (1.0 - confident)) if confident > 0 else None
        S = self.context + self.tokens
        self.module = AffinityNet(L, geometry.num_experts, lookahead, S, self.hidden)
        self.offsets = slot_offsets(L, lookahead, self.context, self.tokens)  # [L, D, S]
        self.keep = max(1, -int(self.offsets.min().div(L, rounding_mode="floor")))  # Q earlier tokens needed
        self._clear_state()

    # --- features ----------------------------------------------------------------------------------------------
    def _slot_ids(self, trace, layers, tokens) -> torch.Tensor:
        """[B, D, S, k] the routed experts of each row's slots (-1: before the sequence's first step)."""
        L, k = self.geometry.num_layers, self.geometry.top_k
        steps = tokens[:, None, None] * L + self.offsets[layers]  # [B, D, S] flat steps
        first = (trace.offsets[trace.sequence_of()[tokens]] * L)[:, None, None]  # the sequence's first step
        ids = trace.ids.reshape(-1, k)[steps.clamp(min=0)]  # [B, D, S, k]
        return torch.where((steps >= first)[..., None], ids, -1)

    def train_logits(self, trace, layers, tokens):
        """Rows (token `tokens[i]` of `trace`, source layer `layers[i]`), as a decode step sees them: every earlier
        step of the token's sequence is known."""
        ids = self._slot_ids(trace, layers, tokens).to(self.device)
        return self._masked(self.module(layers.to(self.device), ids), ids)

    def train_targets(self, trace, layers, tokens):
        """The routed targets (`RoutingTrace.targets`); with `new` > 0 only the experts not routed at the target
        layer in the `new` tokens before: those are what a copy can bring (the others are most likely resident)."""
        ids, valid = trace.targets(layers, tokens, self.lookahead, self.wrap)  # [B, D, k], [B, D]
        if not self.new:
            return ids, valid
        C = self.context
        recent = self._slot_ids(trace, layers, tokens)[:, :, C : C + self.new].flatten(2)  # [B, D, new * k]
        ids = torch.where((ids[..., None] == recent[:, :, None, :]).any(-1), -1, ids)
        return ids, valid & (ids >= 0).any(-1)

    MASKED = -30.0  # the logit of an expert `new` masks out (sigmoid: 1e-13)

    def _masked(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """With `new` > 0: logits [B, D, E] with the experts routed at the target layer in the `new` tokens before
        (ids [B, D, S, k], the token slots after the C recent ones) set to MASKED, so that the ranking names new
        experts only."""
        if not self.new:
            return logits
        E, C = self.geometry.num_experts, self.context
        recent = ids[:, :, C : C + self.new].flatten(2)  # [B, D, new * k]
        out = F.pad(logits, (0, 1))  # [B, D, E + 1]: column E takes the slots with no routing
        out = out.scatter(2, torch.where(recent >= 0, recent, E), self.MASKED)
        return out[..., :E]

    def prepare(self, layer):
        """(steps [1, D, S] of the slots in the rows `runtime_logits` builds, counted from the first earlier token;
        and for the logistic model its table offsets [D, S, 1] and bias [D, E], or None with a hidden layer)."""
        net = self.module
        rel = (self.offsets[layer] + self.keep * self.geometry.num_layers).to(self.device)[None]  # [1, D, S]
        return rel, (None if net.H else (net.base[layer][..., None], net.bias[layer].detach()))

    def runtime_logits(self, layer, hidden, history):
        """history [T, layer+1, k] of this pass; the earlier tokens come from the state kept since `reset`; with
        `confident`, the scores under its logit raised to it."""
        logits = self._runtime_logits(layer, history)
        return logits if self._floor is None else logits.clamp(min=self._floor)

    def _runtime_logits(self, layer, history):
        T, k, device = history.shape[0], self.geometry.top_k, history.device
        self.observe(layer, history)
        known = torch.cat([self._earlier(device), self._padded(history)]).view(-1, k)  # [(Q + T) * L, k]
        rel, logistic = self.prepared(layer)
        if T > 1:
            rel = rel + torch.arange(0, T * self.geometry.num_layers, self.geometry.num_layers, device=device)[:, None, None]
        ids = known[rel]  # [T, D, S, k]
        if logistic is None:
            return self._masked(self.module(torch.full((T,), layer, device=device), ids), ids)
        base, bias = logistic  # the logistic model in five ops: one table lookup over the T * D * S * k routed ids
        rows = (ids.remainder(self.geometry.num_experts + 1) + base).flatten(2)  # [T, D, S * k]
        return self._masked(F.embedding(rows, self.module.weight.weight).sum(2) + bias, ids)  # [T, D, E]

    # --- state across passes -----------------------------------------------------------------------------------
    def _clear_state(self) -> None:
        self._past: torch.Tensor | None = None  # [Q, L, k] routing of the Q tokens before this pass (-1: unknown)
        self._seen: torch.Tensor | None = None  # [T, l+1, k] this pass's routing as last seen (the runtime's own)
        self._seen_pass: int | None = None
        self._pass = 0

    def _earlier(self, device) -> torch.Tensor:
        if self._past is None:
            L, k = self.geometry.num_layers, self.geometry.top_k
            self._past = torch.full((self.keep, L, k), -1, dtype=torch.long, device=device)
        elif self._past.device != device:  # moved: what it saw stays
            self._past = self._past.to(device)
        return self._past

    def _padded(self, history: torch.Tensor) -> torch.Tensor:
        """history [T, l+1, k] -> [T, L, k], -1 at the layers not routed yet."""
        return F.pad(history.long(), (0, 0, 0, self.geometry.num_layers - history.shape[1]), value=-1)

    def observe(self, layer: int, history: torch.Tensor) -> None:
        """Keep (a reference to) this pass's routing so far: the runtime makes a new history tensor per pass, so
        it still holds this pass at the next `start_pass`."""
        self._seen, self._seen_pass = history, self._pass

    def reset(self) -> None:
        super().reset()
        self._clear_state()
        if not self.module.training:  # the per-layer tensors, made here rather than at a layer call
            self._prepared = {layer: self.prepare(layer) for layer in range(self.geometry.num_layers)}

    def start_pass(self, index: int) -> None:
        """The tokens of the pass that ended become the earlier tokens (only if it was the previous pass and the
        predictor ran in it; else nothing is known of them)."""
        if self._seen is not None and self._seen_pass == index - 1:
            seen = self._seen
            self._past = torch.cat([self._earlier(seen.device), self._padded(seen)])[-self.keep :]
        else:
            self._past = None
        self._seen, self._pass = None, index

    def config(self):
        out = {"lookahead": self.lookahead, "context": self.context, "tokens": self.tokens, "wrap": self.wrap,
               "hidden": self.hidden}
        # saved predictors without `new` or `confident` load as before
        return out | ({"new": self.new} if self.new else {}) | ({"confident": self.confident} if self.confident else {})

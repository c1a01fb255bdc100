"""One routing table for capture, traces, the oracle and the simulator: expert ids of every token of every
MoE layer, cut into sequences (text windows, prompts) and into forward passes (what the model ran at once).

`capture_routing` records one pass per forward call (a prefill of T tokens, then T=1 decode steps). A trace
directory holds sequences whose tokens were prefilled together; in a causal LM token t of a window is routed
exactly as if it had been decoded after tokens 0..t-1, so by default every token is its own (decode) pass.
The simulator re-exports this class as `specmoe.sim.RoutingStream`; trace shards (`TraceShard`) and loaded
traces (`RoutingTrace`, which adds the geometry, routers and manifest) are the same table.
"""

# Shape legend: N tokens, P passes, S sequences, L MoE layers, k top-k, H hidden, E experts

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import read_json, read_safetensors, write_json, write_safetensors


def _rising(off: torch.Tensor, n: int, name: str) -> None:
    if off.dim() != 1 or off.numel() < 1 or off[0] != 0 or off[-1] != n or bool((off[1:] <= off[:-1]).any()):
        raise ValueError(f"{name} must rise strictly from 0 to N={n}, got {off.tolist()[:8]}...")


def _lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.long().cumsum(0)])


@dataclass
class Routing:
    """Routing of N tokens, concatenated along tokens, in sequences and in forward passes.

    Args:
        ids: [N, L, k] expert ids, primary expert first where weights are known; -1 where not routed.
        pass_offsets: [P + 1] pass p is tokens pass_offsets[p]:pass_offsets[p+1] (default: every token is
            its own decode pass, as when text windows are replayed as decoding).
        hidden: {layer: [N, H]} hidden states entering those MoE layers (only hidden-state predictors need them).
        calls: optional grouping of passes into generate calls, each {"passes": n, ...} (to compare with
            timings of real generate calls); their "passes" must add up to P.
        num_experts: E of the model that routed it, when known (it then only matches shapes with that E).
        weights: [N, L, k] routing weights (0 where not routed), when known.
        seq_offsets: [S + 1] sequence s is tokens seq_offsets[s]:seq_offsets[s+1] (default: one sequence).
    """

    ids: torch.Tensor
    pass_offsets: torch.Tensor | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: list[dict] | None = None
    num_experts: int | None = None
    weights: torch.Tensor | None = None
    seq_offsets: torch.Tensor | None = None

    def __post_init__(self):
        if self.ids.dim() != 3:
            raise ValueError(f"ids must be [N, L, k], got shape {tuple(self.ids.shape)}")
        self.ids = self.ids.long()
        N = self.ids.shape[0]
        self.pass_offsets = torch.arange(N + 1) if self.pass_offsets is None else self.pass_offsets.long()
        _rising(self.pass_offsets, N, "pass_offsets")
        self.seq_offsets = torch.tensor([0, N]) if self.seq_offsets is None else self.seq_offsets.long()
        _rising(self.seq_offsets, N, "seq_offsets (sequence offsets)")
        if self.weights is not None and tuple(self.weights.shape) != tuple(self.ids.shape):
            raise ValueError(f"weights has shape {tuple(self.weights.shape)}, ids {tuple(self.ids.shape)}")
        for layer, h in self.hidden.items():
            if h.shape[0] != N:
                raise ValueError(f"hidden[{layer}] has {h.shape[0]} rows, ids has {N} tokens")
        top = int(self.ids.max()) if self.ids.numel() else -1
        if self.num_experts is not None and top >= self.num_experts:
            raise ValueError(f"ids route to expert {top}, but num_experts is {self.num_experts}")
        if self.calls is not None and sum(int(c["passes"]) for c in self.calls) != self.num_passes:
            raise ValueError(f"calls cover {sum(int(c['passes']) for c in self.calls)} passes, the routing has "
                             f"{self.num_passes}")

    # ---- shape ---------------------------------------------------------------------------------------
    @property
    def offsets(self) -> torch.Tensor:
        """[S + 1] the sequence offsets (`seq_offsets`)."""
        return self.seq_offsets

    @property
    def num_passes(self) -> int:
        return self.pass_offsets.numel() - 1

    @property
    def num_sequences(self) -> int:
        return self.seq_offsets.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.ids.shape[2]

    def pass_tokens(self) -> list[int]:
        return (self.pass_offsets[1:] - self.pass_offsets[:-1]).tolist()

    def passes(self) -> list[torch.Tensor]:
        """The per-pass routing [T, L, k] (views)."""
        off = self.pass_offsets.tolist()
        return [self.ids[a:b] for a, b in zip(off[:-1], off[1:])]

    def sequence_of(self) -> torch.Tensor:
        """[N] long: the sequence index of every token."""
        return torch.repeat_interleave(torch.arange(self.num_sequences), self.seq_offsets[1:] - self.seq_offsets[:-1])

    def matches(self, num_layers: int, top_k: int, num_experts: int) -> bool:
        """Whether a model of this routing geometry could have routed it (E must equal num_experts when the
        routing knows it, else exceed every id)."""
        if (self.num_layers, self.top_k) != (num_layers, top_k):
            return False
        if self.num_experts is not None:
            return self.num_experts == num_experts
        return self.ids.numel() == 0 or int(self.ids.max()) < num_experts

    def check_geometry(self, num_layers: int, top_k: int, num_experts: int, what: str = "model shape") -> None:
        """Raise ValueError unless the routing was made with this geometry (see `matches`)."""
        if not self.matches(num_layers, top_k, num_experts):
            theirs = f"L={self.num_layers} k={self.top_k}" + (f" E={self.num_experts}" if self.num_experts else
                                                               f" (experts up to {int(self.ids.max())})")
            raise ValueError(f"the routing stream has {theirs}, the {what} has L={num_layers} k={top_k} "
                             f"E={num_experts}; replay a trace recorded with that geometry")

    def check(self, geometry, where: str) -> None:
        """Raise ValueError (naming `where`) unless every tensor has the shape `geometry` (MoEGeometry)
        implies, weights included (a trace shard)."""
        L, E, k, H = geometry.num_layers, geometry.num_experts, geometry.top_k, geometry.hidden_size
        N = self.num_tokens
        problems = []
        if tuple(self.ids.shape) != (N, L, k):
            problems.append(f"ids has shape {tuple(self.ids.shape)}, expected [N, {L}, {k}]")
        if self.weights is None:
            problems.append("no routing weights")
        if N == 0:
            problems.append("no tokens")
        if N > 0 and self.ids.numel() and (int(self.ids.max()) >= E or int(self.ids.min()) < -1):
            problems.append(f"expert ids outside [-1, {E})")
        for layer, h in self.hidden.items():
            if not 0 <= layer < L or tuple(h.shape) != (N, H):
                problems.append(f"hidden.{layer} has shape {tuple(h.shape)}, expected [{N}, {H}] for a layer < {L}")
        if problems:
            raise ValueError(f"trace shard {where} does not match the geometry {geometry}: {'; '.join(problems)}")

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_passes(cls, passes: Sequence, calls: list[dict] | None = None,
                    num_experts: int | None = None) -> "Routing":
        """Passes in order: `capture_routing(...).passes` (one-pass Routing rows) or plain [T, L, k] tensors.
        Weights are kept when every pass has them, hidden layers that every pass has."""
        if not passes:
            raise ValueError("a routing stream needs at least one pass")
        ids = [p.ids if hasattr(p, "ids") else p for p in passes]
        offsets = _lengths_to_offsets(torch.tensor([int(x.shape[0]) for x in ids]))
        layers = set.intersection(*[set(getattr(p, "hidden", {}) or {}) for p in passes])
        hidden = {layer: torch.cat([p.hidden[layer] for p in passes]) for layer in sorted(layers)}
        weights = [getattr(p, "weights", None) for p in passes]
        weights = torch.cat(weights) if all(w is not None for w in weights) else None
        return cls(torch.cat([x.long() for x in ids]), offsets, hidden, calls, num_experts, weights)

    @classmethod
    def from_sequences(cls, ids: torch.Tensor, offsets: torch.Tensor | None = None,
                       hidden: dict[int, torch.Tensor] | None = None, num_experts: int | None = None,
                       weights: torch.Tensor | None = None) -> "Routing":
        """Sequences (text windows) replayed as decoding: every token is one pass.

        Args:
            ids: [N, L, k] routing of sequences concatenated.
            offsets: [S + 1] sequence boundaries.
            hidden: {layer: [N, H]} hidden states, if kept.
            num_experts: E of the model that routed it.
            weights: [N, L, k] routing weights, if known.
        """
        return cls(ids, None, dict(hidden or {}), num_experts=num_experts, weights=weights, seq_offsets=offsets)

    @classmethod
    def from_trace(cls, trace) -> "Routing":
        """A plain routing (decode passes) of a loaded trace (`RoutingTrace`, which already is one)."""
        return cls.from_sequences(trace.ids, trace.seq_offsets, trace.hidden, trace.num_experts, trace.weights)

    def _rows(self, index: torch.Tensor, pass_offsets, seq_offsets) -> "Routing":
        return Routing(self.ids[index], pass_offsets, {layer: h[index] for layer, h in self.hidden.items()},
                       num_experts=self.num_experts, weights=None if self.weights is None else self.weights[index],
                       seq_offsets=seq_offsets)

    def select_passes(self, start: int, stop: int | None = None) -> "Routing":
        """Passes start..stop-1 as a routing of their own (calls are dropped; sequences are cut at the ends)."""
        stop = self.num_passes if stop is None else stop
        a, b = int(self.pass_offsets[start]), int(self.pass_offsets[stop])
        inner = self.seq_offsets[(self.seq_offsets > a) & (self.seq_offsets < b)]
        seq = torch.cat([torch.tensor([a]), inner, torch.tensor([b])]) - a
        return self._rows(torch.arange(a, b), self.pass_offsets[start: stop + 1] - a, seq)

    def select_sequences(self, sequences: torch.Tensor | Iterable[int]) -> "Routing":
        """The routing of the given sequences only, in the given order, with the passes inside them.

        Raises:
            ValueError: a pass straddles a sequence boundary (passes cannot be cut).
        """
        seq = torch.as_tensor(list(sequences) if not isinstance(sequences, torch.Tensor) else sequences).long()
        starts, ends = self.seq_offsets[seq].tolist(), self.seq_offsets[seq + 1].tolist()
        index, passes, at = [], [torch.zeros(1, dtype=torch.long)], 0
        pass_set = self.pass_offsets
        for s, e in zip(starts, ends):
            cuts = pass_set[(pass_set >= s) & (pass_set <= e)]
            if cuts.numel() < 2 or int(cuts[0]) != s or int(cuts[-1]) != e:
                raise ValueError(f"a forward pass straddles sequence boundary {s} or {e}; select passes instead")
            index.append(torch.arange(s, e))
            passes.append(cuts[1:] - s + at)
            at += e - s
        index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        return self._rows(index, torch.cat(passes), _lengths_to_offsets(torch.tensor(ends) - torch.tensor(starts)))

    # ---- files ---------------------------------------------------------------------------------------
    def save(self, path, hidden: bool = True) -> None:
        """Write `path` (safetensors: ids, pass_offsets, hidden.<layer>) and, with calls, `path`.calls.json."""
        tensors = {"ids": self.ids, "pass_offsets": self.pass_offsets}
        if self.num_experts is not None:
            tensors["num_experts"] = torch.tensor(self.num_experts)
        if self.num_sequences > 1:
            tensors["seq_offsets"] = self.seq_offsets
        if hidden:
            tensors.update({f"hidden.{layer}": h for layer, h in self.hidden.items()})
        write_safetensors(path, tensors, metadata={"format": "specmoe-routing-stream"})
        if self.calls is not None:
            write_json(Path(str(path) + ".calls.json"), self.calls)

    @classmethod
    def load(cls, path) -> "Routing":
        """Read a routing written by `save`.

        Raises:
            FileNotFoundError / ValueError: a missing, truncated or foreign file (the message names it).
        """
        tensors = read_safetensors(path, what="routing stream")
        if "ids" not in tensors or "pass_offsets" not in tensors:
            raise ValueError(f"{path} is not a specmoe routing stream (no 'ids' / 'pass_offsets' tensors)")
        hidden = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("hidden.")}
        calls_path = Path(str(path) + ".calls.json")
        calls = read_json(calls_path, what="routing stream calls") if calls_path.is_file() else None
        try:
            num_experts = int(tensors["num_experts"]) if "num_experts" in tensors else None
            return cls(tensors["ids"], tensors["pass_offsets"], hidden, calls, num_experts,
                       seq_offsets=tensors.get("seq_offsets"))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

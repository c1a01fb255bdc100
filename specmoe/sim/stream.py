"""The simulator's input: a routing stream, the forward passes a model ran, in order, with their routing.

A stream is what `specmoe.traces.capture_routing` records (one pass per forward call: a prefill of T tokens,
then T=1 decode steps), or text windows replayed as decode: in a causal LM, token t of a prefilled window is
routed exactly as if it had been decoded after tokens 0..t-1, so every window of a trace is a decode stream
of its length (`RoutingStream.from_sequences`).
"""

# Shape legend: N tokens, P passes, L MoE layers, k top-k, H hidden

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import read_json, read_safetensors, write_json, write_safetensors


@dataclass
class RoutingStream:
    """Forward passes in execution order.

    Args:
        ids: [N, L, k] expert ids of every token of every pass, concatenated; -1 where not routed.
        pass_offsets: [P + 1] pass p is tokens pass_offsets[p]:pass_offsets[p+1].
        hidden: {layer: [N, H]} hidden states entering MoE layers (only needed to run hidden-state predictors).
        calls: optional grouping of passes into generate calls, each {"passes": n, ...} (used to compare with
            timings of real generate calls); their "passes" must add up to P.
        num_experts: E of the model that routed it, when known (a stream only matches shapes with that E).
    """

    ids: torch.Tensor
    pass_offsets: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: list[dict] | None = None
    num_experts: int | None = None

    def __post_init__(self):
        if self.ids.dim() != 3:
            raise ValueError(f"ids must be [N, L, k], got shape {tuple(self.ids.shape)}")
        self.ids = self.ids.long()
        self.pass_offsets = self.pass_offsets.long()
        off = self.pass_offsets
        if off.dim() != 1 or off.numel() < 1 or off[0] != 0 or off[-1] != self.ids.shape[0] or bool((off[1:] <= off[:-1]).any()):
            raise ValueError(f"pass_offsets must rise strictly from 0 to N={self.ids.shape[0]}, got {off.tolist()[:8]}...")
        for layer, h in self.hidden.items():
            if h.shape[0] != self.ids.shape[0]:
                raise ValueError(f"hidden[{layer}] has {h.shape[0]} rows, ids has {self.ids.shape[0]} tokens")
        top = int(self.ids.max()) if self.ids.numel() else -1
        if self.num_experts is not None and top >= self.num_experts:
            raise ValueError(f"ids route to expert {top}, but num_experts is {self.num_experts}")
        if self.calls is not None and sum(int(c["passes"]) for c in self.calls) != self.num_passes:
            raise ValueError(f"calls cover {sum(int(c['passes']) for c in self.calls)} passes, the stream has "
                             f"{self.num_passes}")

    @property
    def num_passes(self) -> int:
        return self.pass_offsets.numel() - 1

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

    def matches(self, num_layers: int, top_k: int, num_experts: int) -> bool:
        """Whether a model of this routing geometry could have routed the stream (E must equal num_experts
        when the stream knows it, else exceed every id)."""
        if (self.num_layers, self.top_k) != (num_layers, top_k):
            return False
        if self.num_experts is not None:
            return self.num_experts == num_experts
        return self.ids.numel() == 0 or int(self.ids.max()) < num_experts

    def check_geometry(self, num_layers: int, top_k: int, num_experts: int, what: str = "model shape") -> None:
        """Raise ValueError unless the stream was routed with this geometry (see `matches`)."""
        if not self.matches(num_layers, top_k, num_experts):
            theirs = f"L={self.num_layers} k={self.top_k}" + (f" E={self.num_experts}" if self.num_experts else
                                                               f" (experts up to {int(self.ids.max())})")
            raise ValueError(f"the routing stream has {theirs}, the {what} has L={num_layers} k={top_k} "
                             f"E={num_experts}; replay a trace recorded with that geometry")

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_passes(cls, passes: Sequence, calls: list[dict] | None = None,
                    num_experts: int | None = None) -> "RoutingStream":
        """From `capture_routing(...).passes` (RoutedPass objects) or plain [T, L, k] tensors, in order."""
        if not passes:
            raise ValueError("a routing stream needs at least one pass")
        ids = [p.ids if hasattr(p, "ids") else p for p in passes]
        offsets = torch.tensor([0] + [int(x.shape[0]) for x in ids]).cumsum(0)
        hidden: dict[int, list] = {}
        layers = set.intersection(*[set(getattr(p, "hidden", {}) or {}) for p in passes])
        for layer in sorted(layers):
            hidden[layer] = torch.cat([p.hidden[layer] for p in passes])
        return cls(torch.cat([x.long() for x in ids]), offsets, hidden, calls, num_experts)

    @classmethod
    def from_sequences(cls, ids: torch.Tensor, offsets: torch.Tensor | None = None,
                       hidden: dict[int, torch.Tensor] | None = None, num_experts: int | None = None) -> "RoutingStream":
        """Every token as one decode pass (teacher-forced text windows replayed as decoding).

        Args:
            ids: [N, L, k] routing of sequences concatenated.
            offsets: [S + 1] sequence boundaries (unused but checked: passes never straddle sequences anyway).
            hidden: {layer: [N, H]} hidden states, if kept.
            num_experts: E of the model that routed it.
        """
        if offsets is not None and (int(offsets[0]) != 0 or int(offsets[-1]) != ids.shape[0]):
            raise ValueError(f"sequence offsets must run from 0 to {ids.shape[0]}")
        return cls(ids, torch.arange(ids.shape[0] + 1), dict(hidden or {}), num_experts=num_experts)

    @classmethod
    def from_trace(cls, trace) -> "RoutingStream":
        """From a trace object with `.ids [N, L, k]`, `.offsets [S+1]`, `.hidden` and `.geometry`
        (specmoe.traces datasets)."""
        geometry = getattr(trace, "geometry", None)
        return cls.from_sequences(trace.ids, getattr(trace, "offsets", None), getattr(trace, "hidden", None),
                                  num_experts=geometry.num_experts if geometry is not None else None)

    def select_passes(self, start: int, stop: int | None = None) -> "RoutingStream":
        """Passes start..stop-1 as a stream of their own (calls are dropped)."""
        stop = self.num_passes if stop is None else stop
        a, b = int(self.pass_offsets[start]), int(self.pass_offsets[stop])
        return RoutingStream(self.ids[a:b], self.pass_offsets[start : stop + 1] - a,
                             {layer: h[a:b] for layer, h in self.hidden.items()}, num_experts=self.num_experts)

    # ---- files ---------------------------------------------------------------------------------------
    def save(self, path, hidden: bool = True) -> None:
        """Write `path` (safetensors: ids, pass_offsets, hidden.<layer>) and, with calls, `path`.calls.json."""
        tensors = {"ids": self.ids, "pass_offsets": self.pass_offsets}
        if self.num_experts is not None:
            tensors["num_experts"] = torch.tensor(self.num_experts)
        if hidden:
            tensors.update({f"hidden.{layer}": h for layer, h in self.hidden.items()})
        write_safetensors(path, tensors, metadata={"format": "specmoe-routing-stream"})
        if self.calls is not None:
            write_json(Path(str(path) + ".calls.json"), self.calls)

    @classmethod
    def load(cls, path) -> "RoutingStream":
        """Read a stream written by `save`.

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
            return cls(tensors["ids"], tensors["pass_offsets"], hidden, calls, num_experts)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def load_stream(path) -> RoutingStream:
    """A routing stream from a file `RoutingStream.save` wrote, or a trace directory (manifest.json + shards,
    written by `specmoe collect`), whose text windows are replayed as decode streams.

    Raises:
        FileNotFoundError: nothing at `path`. ValueError: a corrupt or foreign file (named in the message).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"{path} is a directory without manifest.json: not a trace directory")
        try:
            from ..traces.dataset import load_traces  # the trace shard reader (specmoe collect)
        except ImportError as err:  # pragma: no cover - depends on which components are installed
            raise ValueError(f"{path} is a trace directory but this specmoe has no trace reader ({err})") from None
        return RoutingStream.from_trace(load_traces(path))
    return RoutingStream.load(path)

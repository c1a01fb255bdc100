"""The simulator's input: a routing stream, the forward passes a model ran, in order, with their routing
(`specmoe.traces.routing.Routing`, named `RoutingStream` here).

A stream is what `specmoe.traces.capture_routing` records (one pass per forward call: a prefill of T tokens,
then T=1 decode steps), or text windows replayed as decode: in a causal LM, token t of a prefilled window is
routed exactly as if it had been decoded after tokens 0..t-1, so every window of a trace is a decode stream
of its length (`RoutingStream.from_sequences`).
"""

from __future__ import annotations

from pathlib import Path

from ..traces.routing import Routing

RoutingStream = Routing  # the simulator's name for the one routing table (specmoe.traces.routing)


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

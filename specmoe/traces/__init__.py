"""Routing traces: record what a model routes (one `Routing` table: ids in sequences and passes), store it as
safetensors shards, split it by sequence."""

from .capture import RoutedPass, capture_routing
from .collect import collect_traces, text_files, token_windows
from .dataset import RoutingTrace, load_traces, read_routers, split_sequences
from .routing import Routing
from .shards import TraceManifest, TraceShard, TraceWriter, read_manifest, read_shard, write_shard

__all__ = [
    "RoutedPass", "Routing", "RoutingTrace", "TraceManifest", "TraceShard", "TraceWriter", "capture_routing",
    "collect_traces", "load_traces", "read_manifest", "read_routers", "read_shard", "split_sequences",
    "text_files", "token_windows", "write_shard",
]

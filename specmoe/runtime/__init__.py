"""Mechanism: where expert weights live and how they move. Knows nothing of how predictions are made."""

from .adapters import MoELayer, ModelMoE, find_moe_layers
from .cache import ExpertCache, LFUPolicy, LRUPolicy, SlotPool
from .config import OffloadConfig
from .stats import LayerStats, Stats
from .store import ExpertLayout, HostStore
from .transfer import CudaCopyEngine, SyncCopyEngine, ThreadedCopyEngine
from .wrapper import SpeculativeMoE

__all__ = [
    "CudaCopyEngine", "ExpertCache", "ExpertLayout", "HostStore", "LFUPolicy", "LRUPolicy", "LayerStats",
    "MoELayer", "ModelMoE", "OffloadConfig", "SlotPool", "SpeculativeMoE", "Stats", "SyncCopyEngine", "ThreadedCopyEngine",
    "find_moe_layers",
]

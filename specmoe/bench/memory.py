"""Moved to `specmoe.measure.memory`; kept so old imports work."""

from ..measure.memory import DeviceMemoryMonitor

__all__ = ["DeviceMemoryMonitor"]

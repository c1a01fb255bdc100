"""Moved to `specmoe.measure.timing`; kept so old imports work."""

from ..measure.timing import GenerateTiming, sync_device, time_fn, time_generate, timed_call

__all__ = ["GenerateTiming", "sync_device", "time_fn", "time_generate", "timed_call"]

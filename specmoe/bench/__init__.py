"""Measuring: timing of generate calls, the machine and versions, and result files (JSON + markdown)."""

from .environment import environment
from .timing import GenerateTiming, sync_device, time_generate, timed_call

__all__ = ["GenerateTiming", "environment", "sync_device", "time_generate", "timed_call"]

"""Measuring: timing of generate calls, the machine and versions, and result files (JSON + markdown)."""

from .environment import environment
from .timing import GenerateTiming, time_generate, timed_call

__all__ = ["GenerateTiming", "environment", "time_generate", "timed_call"]

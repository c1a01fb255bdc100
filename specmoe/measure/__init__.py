"""Measuring, for every benchmark, CLI and the demo: one clock, the machine and versions, device memory, the
host->device copy rate, and result files (markdown tables, figures).

The bottom of the package: it imports nothing from specmoe but `specmoe.io` (atomic file writes), so any
layer may use it and nothing in it can pull a library package back up.
"""

from .environment import device_name, environment, git_sha
from .memory import DeviceMemoryMonitor
from .results import environment_line, markdown_table, save_figure
from .timing import FirstTokenClock, GenerateTiming, sync_device, time_fn, time_generate, timed_call
from .transfer_rate import measure_h2d

__all__ = ["DeviceMemoryMonitor", "FirstTokenClock", "GenerateTiming", "device_name", "environment",
           "environment_line", "git_sha", "markdown_table", "measure_h2d", "save_figure", "sync_device", "time_fn",
           "time_generate", "timed_call"]

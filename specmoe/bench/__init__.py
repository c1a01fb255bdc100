"""The benchmark app: `specmoe bench` (compare, report, offload baseline). Measuring itself lives in
`specmoe.measure`; the names below are re-exported from there so old imports keep working."""

from ..measure import GenerateTiming, environment, sync_device, time_generate, timed_call

__all__ = ["GenerateTiming", "environment", "sync_device", "time_generate", "timed_call"]

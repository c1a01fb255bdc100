"""Moved to `specmoe.measure.transfer_rate`; kept so old imports work."""

from ..measure.transfer_rate import measure_h2d

__all__ = ["measure_h2d"]

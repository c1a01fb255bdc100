"""Routing traces: record what a model routes, store it, split it by sequence."""

from .capture import RoutedPass, capture_routing

__all__ = ["RoutedPass", "capture_routing"]

"""Moved to `specmoe.measure.environment`; kept so old imports work."""

from ..measure.environment import device_name, environment, git_sha

__all__ = ["device_name", "environment", "git_sha"]

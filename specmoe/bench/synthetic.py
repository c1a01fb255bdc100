"""Moved to `specmoe.sim.synthetic` (the one random-weight model builder); kept so old imports work."""

from ..sim.synthetic import SMOKE_OVERRIDES, build_random_model, smoke_config

__all__ = ["SMOKE_OVERRIDES", "build_random_model", "smoke_config"]

"""Trace-driven simulator: replay routing on a hardware profile with a real model's sizes.

    stream = capture.routing()                                    # or load_stream(path)
    shape = ModelShape.from_name("qwen1.5-moe-a2.7b")
    run = simulate(stream, shape, HardwareProfile.from_name("rtx3090"), 0.5, ops=load_op_counts(shape.model_type))
"""

from .bounds import Bound, demand_bound, memory_plan
from .compute import ComputeModel, OpCounts, count_ops, load_op_counts
from .engine import SimResult, simulate
from .hardware import PROFILES, HardwareProfile
from .predictions import PredictorReplay, oracle_candidates, predictor_candidates, replay_oracle, replay_predictor
from .shapes import PRESETS, ModelShape
from .stream import RoutingStream, load_stream

__all__ = ["Bound", "ComputeModel", "HardwareProfile", "ModelShape", "OpCounts", "PRESETS", "PROFILES",
           "PredictorReplay", "RoutingStream", "SimResult", "count_ops", "demand_bound", "load_op_counts", "load_stream",
           "memory_plan", "oracle_candidates", "predictor_candidates", "replay_oracle", "replay_predictor", "simulate"]

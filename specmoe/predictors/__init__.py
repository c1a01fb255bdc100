"""Speculation predictors: policy that scores the experts upcoming MoE layers will need."""

from .base import PREDICTORS, Predictor, load_predictor, register_predictor, save_predictor
from .oracle import OraclePredictor, RandomPredictor
from .pregate import PreGatePredictor

__all__ = [
    "PREDICTORS",
    "Predictor",
    "PreGatePredictor",
    "OraclePredictor",
    "RandomPredictor",
    "load_predictor",
    "register_predictor",
    "save_predictor",
]

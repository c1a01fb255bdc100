"""Predictor training and evaluation: one training loop for every trainable predictor, metrics, reports."""

from .evaluate import EvalConfig, evaluate_predictors
from .fit import build_predictor, fit_predictor
from .config import TrainConfig
from .loop import TrainResult, train_predictor
from .metrics import PredictionMetrics

__all__ = [
    "EvalConfig", "PredictionMetrics", "TrainConfig", "TrainResult", "build_predictor", "evaluate_predictors",
    "fit_predictor", "train_predictor",
]

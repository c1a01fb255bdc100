"""Speculation predictors: policy that scores the experts upcoming MoE layers will need."""

from .affinity import AffinityPredictor
from .base import PREDICTORS, Predictor, load_predictor, register_predictor, save_predictor
from .factory import make_predictor
from .hidden import HiddenStatePredictor
from .history import HistoryPredictor
from .interlayer import InterLayerPredictor
from .oracle import OraclePredictor, RandomPredictor
from .pregate import PreGatePredictor
from .trainable import TrainablePredictor

__all__ = [
    "AffinityPredictor",
    "PREDICTORS",
    "HiddenStatePredictor",
    "HistoryPredictor",
    "InterLayerPredictor",
    "Predictor",
    "PreGatePredictor",
    "OraclePredictor",
    "RandomPredictor",
    "TrainablePredictor",
    "load_predictor",
    "make_predictor",
    "register_predictor",
    "save_predictor",
]

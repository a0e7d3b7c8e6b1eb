"""Pattern prediction: trained per-layer block-score predictors, their storage and calibration;
per-layer keep ratios from the oracle's scores."""

from lemo_compile.predictors.bank import BlockPredictor, MlpPredictor, ModelSignature, PredictorBank
from lemo_compile.predictors.calibrate import calibrate, layer_keep_ratios, predictor_recall

__all__ = ["BlockPredictor", "MlpPredictor", "ModelSignature", "PredictorBank", "calibrate",
           "layer_keep_ratios", "predictor_recall"]

"""Pattern prediction: trained per-layer block-score predictors, their storage and calibration."""

from lemo_compile.predictors.bank import BlockPredictor, MlpPredictor, ModelSignature, PredictorBank
from lemo_compile.predictors.calibrate import calibrate, predictor_recall

__all__ = ["BlockPredictor", "MlpPredictor", "ModelSignature", "PredictorBank", "calibrate",
           "predictor_recall"]

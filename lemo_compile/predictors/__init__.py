"""Pattern prediction: trained per-layer block-score predictors and their storage (`bank`, which
the compiler's predictor scorer uses), and their calibration with per-layer keep ratios from the
oracle's scores (`calibrate`, a tool on top of the backend: import it as
`lemo_compile.predictors.calibrate`, or use `lemo_compile.calibrate`)."""

from lemo_compile.predictors.bank import BlockPredictor, MlpPredictor, ModelSignature, PredictorBank

__all__ = ["BlockPredictor", "MlpPredictor", "ModelSignature", "PredictorBank"]

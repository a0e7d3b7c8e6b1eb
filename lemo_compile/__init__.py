"""lemo_compile: a torch.compile backend for long-context fine-tuning with contextual token sparsity.

    model = torch.compile(model, backend="lemo", options={"keep_ratio": 0.4})

See README.md for the options and the semantics; `LemoBackend` keeps a report per graph.
"""

from lemo_compile import ops  # noqa: F401  (registers the lemo:: custom ops)
from lemo_compile.backend import (
    LemoBackend, lemo_backend, recent_reports, register_with_accelerate,
)
from lemo_compile.config import LemoConfig
from lemo_compile.layerwise import compile_decoder_layers
from lemo_compile.passes.manager import CompileReport, LemoWarning
from lemo_compile.plan import LayerGroup, LayerPlan, plan_layers
from lemo_compile.predictors import PredictorBank
from lemo_compile.predictors.calibrate import calibrate, layer_keep_ratios, predictor_recall
from lemo_compile.schedule import Phase, SparsitySchedule
from lemo_compile.tools.explain import Explanation, explain

__version__ = "0.1.0"

__all__ = [
    "CompileReport",
    "Explanation",
    "LayerGroup",
    "LayerPlan",
    "LemoBackend",
    "LemoConfig",
    "LemoWarning",
    "Phase",
    "PredictorBank",
    "SparsitySchedule",
    "calibrate",
    "compile_decoder_layers",
    "explain",
    "layer_keep_ratios",
    "lemo_backend",
    "plan_layers",
    "predictor_recall",
    "recent_reports",
    "register_with_accelerate",
]

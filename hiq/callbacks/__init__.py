"""Lightning callbacks: the stages of the method (``hiq.callbacks.FisherCallback`` ...) and the block fits'
schedules."""

from hiq.callbacks.stages import (
    EvaluationCallback,
    ExportCallback,
    FisherCallback,
    PlotCallback,
    RatioSolverCallback,
    ReconstructionCallback,
    SensitivityCallback,
    StageCallback,
    TuningCallback,
    method_callbacks,
)
from hiq.schedules import GammaAnnealing, StepProgressBar

__all__ = [
    "EvaluationCallback",
    "ExportCallback",
    "FisherCallback",
    "GammaAnnealing",
    "PlotCallback",
    "RatioSolverCallback",
    "ReconstructionCallback",
    "TuningCallback",
    "SensitivityCallback",
    "StageCallback",
    "StepProgressBar",
    "method_callbacks",
]

"""Lightning callbacks carrying the stages of the method (``hiq.callbacks.FisherCallback`` etc. in configs)."""

from hiq.callbacks.annealing import GammaAnnealing, StepProgressBar
from hiq.callbacks.evaluation import EvaluationCallback, ExportCallback
from hiq.callbacks.plots import PlotCallback
from hiq.callbacks.reconstruction import ReconstructionCallback
from hiq.callbacks.stages import FisherCallback, RatioSolverCallback, SensitivityCallback

__all__ = [
    "EvaluationCallback",
    "ExportCallback",
    "FisherCallback",
    "GammaAnnealing",
    "PlotCallback",
    "RatioSolverCallback",
    "ReconstructionCallback",
    "SensitivityCallback",
    "StepProgressBar",
]

"""Lightning callbacks carrying the stages of the method (``hiq.callbacks.FisherCallback`` etc. in configs)."""

from hiq.callbacks.plots import PlotCallback
from hiq.callbacks.stages import FisherCallback, RatioSolverCallback, SensitivityCallback

__all__ = ["FisherCallback", "PlotCallback", "RatioSolverCallback", "SensitivityCallback"]

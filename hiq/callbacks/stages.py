"""Algorithm 1 as Lightning callbacks on the outer ``Trainer.fit`` of :class:`hiq.modules.HiQPipeline`.

Each callback is the lifecycle of one stage; the work is a pure function of :mod:`hiq.pipeline`:

=======================  ========================================  =====================================
callback                 stage function                            checked in ``setup`` (before any work)
=======================  ========================================  =====================================
FisherCallback           :func:`hiq.pipeline.fisher_stage`
SensitivityCallback      :func:`hiq.pipeline.sensitivity_stage`
RatioSolverCallback      :func:`hiq.pipeline.ratio_stage`          the budget is reachable
PlotCallback             :func:`hiq.pipeline.plot_stage`
ReconstructionCallback   :func:`hiq.pipeline.reconstruction_stage` batch size vs processes
TuningCallback           :func:`hiq.pipeline.tuning_stage`         batch size vs processes
ExportCallback           :func:`hiq.pipeline.export_stage`
EvaluationCallback       :func:`hiq.pipeline.evaluation_stage`     datasets readable, lm-eval present
=======================  ========================================  =====================================

What each runs, when and what it checks is one row of :data:`hiq.pipeline.STAGE_TABLE`; a callback here only names
its stage. :func:`method_callbacks` builds them from a recipe in the order of :data:`hiq.pipeline.STAGES`; the
stages share one :class:`hiq.pipeline.Job` held by the pipeline module (``pl_module.job``).
"""

from __future__ import annotations

import lightning as L

import hiq.pipeline as P
from hiq.model import release_free_memory
from hiq.recipe import EvaluationOptions, ExportOptions, PlotOptions, Recipe


class StageCallback(L.Callback):
    """Runs one stage of the method (:data:`hiq.pipeline.STAGE_TABLE` ``[stage]``) in ``on_fit_start`` (the outer
    fit has no batches of its own); its check runs in ``setup``, before any stage's work. ``options``: the section
    of the fit the stage takes (plots, export, evaluation), else None."""

    stage: str = ""

    def __init__(self, recipe: Recipe, options=None):
        self.recipe, self.options = recipe, options

    @property
    def spec(self) -> P.Stage:
        return P.STAGE_TABLE[self.stage]

    def enabled(self) -> bool:
        return self.spec.enabled(self.recipe, self.options)

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self.spec.check is not None and self.enabled():
            self.spec.check(self.recipe, self.options, trainer.world_size, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.enabled():
            job = pl_module.job_for(trainer, self.recipe)
            try:
                with P.device_memory_of(job, self.stage):
                    self.spec.run(job, self.options)
            finally:
                release_free_memory()  # the freed heap of this stage is not held through the next


class FisherCallback(StageCallback):
    """Empirical Fisher diagonal of the LM loss -> one impact score per input column (``fisher.safetensors``)."""

    stage = "fisher"


class SensitivityCallback(StageCallback):
    """The matrix M per block (paper Eq. 7-8), one file per block (``sensitivity/``)."""

    stage = "sensitivity"


class RatioSolverCallback(StageCallback):
    """Per-layer high-impact ratios by the exact MILP of Eq. 9 (HiGHS), or a baseline (``ratios.json``); checks in
    ``setup`` that the budget is reachable."""

    stage = "ratios"


class PlotCallback(StageCallback):
    """Figure 1/2 analogs in ``plots/`` once scores and ratios exist."""

    stage = "plots"


class ReconstructionCallback(StageCallback):
    """Hybrid block reconstruction (paper Eq. 10-13), each block its own ``Trainer.fit`` (``blocks/``)."""

    stage = "reconstruction"


class TuningCallback(StageCallback):
    """End-to-end scale tuning of the reconstructed layers, one ``Trainer.fit`` (``tuning.safetensors``)."""

    stage = "tuning"


class ExportCallback(StageCallback):
    """The checkpoints of ``export.formats``: ``packed/``, ``model/``, ``compressed-tensors/``."""

    stage = "export"


class EvaluationCallback(StageCallback):
    """Perplexity and zero-shot accuracy of the quantized model, then ``metrics.json``."""

    stage = "evaluation"


CALLBACKS = (FisherCallback, SensitivityCallback, RatioSolverCallback, PlotCallback, ReconstructionCallback,
             TuningCallback, ExportCallback, EvaluationCallback)


def method_callbacks(recipe: Recipe, export: ExportOptions | None = None, evaluation: EvaluationOptions | None = None,
                     plots: PlotOptions | None = None) -> list[StageCallback]:
    """The stage callbacks of the method, in the order of :data:`hiq.pipeline.STAGES`."""
    sections = {"plots": plots or PlotOptions(enabled=False), "export": export or ExportOptions(enabled=False),
                "evaluation": evaluation or EvaluationOptions(enabled=False)}
    callbacks = [cls(recipe, sections.get(P.STAGE_TABLE[cls.stage].options)) for cls in CALLBACKS]
    assert tuple(c.stage for c in callbacks) == P.STAGES
    return callbacks

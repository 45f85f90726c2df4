"""Algorithm 1 as Lightning callbacks on the outer ``Trainer.fit`` of :class:`hiq.modules.HiQPipeline`.

Each callback is the lifecycle of one stage; the work is a pure function of :mod:`hiq.pipeline`:

=====================  ======================================  =====================================
callback               stage function                          checked in ``setup`` (before any work)
=====================  ======================================  =====================================
FisherCallback         :func:`hiq.pipeline.fisher_stage`
SensitivityCallback    :func:`hiq.pipeline.sensitivity_stage`
RatioSolverCallback    :func:`hiq.pipeline.ratio_stage`        the budget is reachable
PlotCallback           :func:`hiq.pipeline.plot_stage`
ReconstructionCallback :func:`hiq.pipeline.reconstruction_stage` batch size vs processes
TuningCallback         :func:`hiq.pipeline.tuning_stage`        batch size vs processes
ExportCallback         :func:`hiq.pipeline.export_stage`
EvaluationCallback     :func:`hiq.pipeline.evaluation_stage`   datasets readable, lm-eval present
=====================  ======================================  =====================================

:func:`method_callbacks` builds them from a recipe in the order of :data:`hiq.pipeline.STAGES`; the stages share
one :class:`hiq.pipeline.Job` held by the pipeline module (``pl_module.job``).
"""

from __future__ import annotations

import lightning as L

import hiq.pipeline as P
from hiq.recipe import EvaluationOptions, ExportOptions, PlotOptions, Recipe


class StageCallback(L.Callback):
    """Runs one stage of the method in ``on_fit_start`` (the outer fit has no batches of its own)."""

    stage: str = ""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def enabled(self) -> bool:
        return True

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.enabled():
            job = pl_module.job_for(trainer, self.recipe)
            with P.device_memory_of(job, self.stage):
                self.run(job)

    def run(self, job: P.Job) -> None:  # pragma: no cover - every stage overrides it
        raise NotImplementedError


class FisherCallback(StageCallback):
    """Empirical Fisher diagonal of the LM loss -> one impact score per input column (``fisher.safetensors``)."""

    stage = "fisher"

    def run(self, job: P.Job) -> None:
        P.fisher_stage(job)


class SensitivityCallback(StageCallback):
    """The matrix M per block (paper Eq. 7-8), one file per block (``sensitivity/``)."""

    stage = "sensitivity"

    def enabled(self) -> bool:
        return self.recipe.sensitivity.enabled

    def run(self, job: P.Job) -> None:
        P.sensitivity_stage(job)


class RatioSolverCallback(StageCallback):
    """Per-layer high-impact ratios by the exact MILP of Eq. 9 (HiGHS), or a baseline (``ratios.json``)."""

    stage = "ratios"

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        from hiq.solver import check_budget

        q, r = self.recipe.quant, self.recipe.ratios
        check_budget(r.target_avg_bits, pl_module.layout.layer_infos(pl_module.model), r.candidates, q.bits,
                     q.bits_high)

    def run(self, job: P.Job) -> None:
        P.ratio_stage(job)


class PlotCallback(StageCallback):
    """Figure 1/2 analogs in ``plots/`` once scores and ratios exist."""

    stage = "plots"

    def __init__(self, recipe: Recipe, options: PlotOptions):
        super().__init__(recipe)
        self.options = options

    def enabled(self) -> bool:
        return self.options.enabled

    def run(self, job: P.Job) -> None:
        P.plot_stage(job, self.options)


class ReconstructionCallback(StageCallback):
    """Hybrid block reconstruction (paper Eq. 10-13), each block its own ``Trainer.fit`` (``blocks/``)."""

    stage = "reconstruction"

    def enabled(self) -> bool:
        return self.recipe.reconstruction.enabled

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        bs = self.recipe.reconstruction.batch_size
        if self.enabled() and bs % trainer.world_size:
            raise ValueError(f"reconstruction.batch_size={bs} is not divisible by the {trainer.world_size} "
                             f"processes; use a multiple of {trainer.world_size}")

    def run(self, job: P.Job) -> None:
        P.reconstruction_stage(job)


class TuningCallback(StageCallback):
    """End-to-end scale tuning of the reconstructed layers, one ``Trainer.fit`` (``tuning.safetensors``)."""

    stage = "tuning"

    def enabled(self) -> bool:
        rec = self.recipe.reconstruction
        return rec.enabled and rec.tune_steps > 0

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        bs = self.recipe.reconstruction.tune_batch_size
        if self.enabled() and bs % trainer.world_size:
            raise ValueError(f"reconstruction.tune_batch_size={bs} is not divisible by the {trainer.world_size} "
                             f"processes; use a multiple of {trainer.world_size}")

    def run(self, job: P.Job) -> None:
        P.tuning_stage(job)


class ExportCallback(StageCallback):
    """Write ``model/``, a checkpoint ``AutoModelForCausalLM.from_pretrained`` loads."""

    stage = "export"

    def __init__(self, recipe: Recipe, options: ExportOptions):
        super().__init__(recipe)
        self.options = options

    def enabled(self) -> bool:
        return self.options.enabled

    def run(self, job: P.Job) -> None:
        P.export_stage(job, self.options)


class EvaluationCallback(StageCallback):
    """Perplexity and zero-shot accuracy of the quantized model, then ``metrics.json``."""

    stage = "evaluation"

    def __init__(self, recipe: Recipe, options: EvaluationOptions):
        super().__init__(recipe)
        self.options = options

    def enabled(self) -> bool:
        return self.options.enabled

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self.enabled():
            from hiq.perplexity import check_evaluation

            check_evaluation(self.options)  # a typo in a dataset name or a missing hiq[eval] fails here

    def run(self, job: P.Job) -> None:
        P.evaluation_stage(job, self.options)


def method_callbacks(recipe: Recipe, export: ExportOptions | None = None, evaluation: EvaluationOptions | None = None,
                     plots: PlotOptions | None = None) -> list[StageCallback]:
    """The stage callbacks of the method, in the order of :data:`hiq.pipeline.STAGES`."""
    callbacks = [FisherCallback(recipe), SensitivityCallback(recipe), RatioSolverCallback(recipe),
                 PlotCallback(recipe, plots or PlotOptions(enabled=False)), ReconstructionCallback(recipe),
                 TuningCallback(recipe),
                 ExportCallback(recipe, export or ExportOptions(enabled=False)),
                 EvaluationCallback(recipe, evaluation or EvaluationOptions(enabled=False))]
    assert tuple(c.stage for c in callbacks) == P.STAGES
    return callbacks

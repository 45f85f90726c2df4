"""Schedules of one block reconstruction, driven by ``trainer.global_step`` (so DDP ranks agree), and the
progress a run reports (:func:`info`, :class:`StepProgressBar`)."""

from __future__ import annotations

import sys

import lightning as L
from tqdm.auto import tqdm


def info(message: str, rt=None) -> None:
    """A progress line on stderr, once per run: on rank 0 when ``rt`` (a :class:`hiq.pipeline.Runtime`) is given."""
    if rt is None or rt.is_global_zero:
        print(message, file=sys.stderr, flush=True)


class GammaAnnealing(L.Callback):
    """Exponent β of AdaRound's regulariser ``Σ(1 − |2h(V) − 1|^β)`` (the paper's "γ") over the steps of a fit.

    During the first ``warmup`` share of ``total_steps`` the regulariser is off (reconstruction only);
    then β falls linearly from ``start`` to ``end``. Sets ``pl_module.beta`` and ``pl_module.regularize``
    before every training batch.
    """

    def __init__(self, total_steps: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be at least 1")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup={warmup} must be in [0, 1)")
        self.total_steps, self.warmup, self.start, self.end = total_steps, warmup, float(start), float(end)

    def value(self, step: int) -> tuple[float, bool]:
        """(β, regulariser on) at optimizer step ``step``."""
        begin = int(self.warmup * self.total_steps)
        if step < begin:
            return self.start, False
        progress = (step - begin) / max(1, self.total_steps - begin)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - progress), True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.beta, pl_module.regularize = self.value(trainer.global_step)


class StepProgressBar(L.Callback):
    """One bar over all optimizer steps of a fit (instead of one per epoch), with the latest losses."""

    def __init__(self, description: str, total_steps: int):
        self.description, self.total_steps = description, total_steps
        self.bar: tqdm | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.bar = tqdm(total=self.total_steps, desc=self.description, unit="step", leave=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is not None:
            self.bar.update(trainer.global_step - self.bar.n)
            if trainer.global_step % 10 == 0:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in pl_module.last_losses.items()})

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

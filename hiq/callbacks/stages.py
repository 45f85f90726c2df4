"""Algorithm 1 as Lightning callbacks: Fisher scores -> matrix M -> HiGHS ratio assignment.

Each callback does its stage in ``on_fit_start`` of the ``HiQPipeline`` fit, in the order they are listed in
``trainer.callbacks``, reads its inputs from ``pl_module.artifacts`` (or the run directory) and writes its
artifact atomically into ``trainer.default_root_dir``. A restarted run reuses every complete artifact whose
recorded settings match, so it resumes at the first unfinished stage or block.

DDP: the Fisher pass is data-parallel over calibration samples (per-rank sums all-reduced); M is measured
block by block with blocks shared out across ranks (block b on rank b mod world_size), gathered through the
run directory, which must therefore be visible to all ranks (one machine, or a shared filesystem).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from hiq.artifacts import RunDir, load_tensors, save_tensors
from hiq.impact import FisherAccumulator
from hiq.model import block_outputs, capture_block_inputs, find_blocks
from hiq.sensitivity import measure_block, quadratic_fidelity


def _run_dir(trainer: L.Trainer) -> RunDir:
    return RunDir(trainer.default_root_dir)


def _log(trainer: L.Trainer, metrics: dict[str, float], step: int = 0) -> None:
    if trainer.logger is not None and trainer.is_global_zero:
        trainer.logger.log_metrics(metrics, step=step)


def _calibration(trainer: L.Trainer, pl_module) -> torch.Tensor:
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "windows"):
        raise RuntimeError("the hiq stages need a CalibrationData datamodule (trainer.fit(..., datamodule=...))")
    return dm.windows(pl_module.tokenizer, getattr(pl_module.model.config, "max_position_embeddings", None))


def _calibration_meta(trainer: L.Trainer, pl_module) -> dict[str, Any]:
    hp = trainer.datamodule.hparams
    return {"model": pl_module.hparams.model_path, "dataset": hp.dataset, "split": hp.split,
            "nsamples": hp.nsamples, "seqlen": int(_calibration(trainer, pl_module).shape[1]), "seed": hp.seed}


class FisherCallback(L.Callback):
    """Empirical Fisher diagonal of the LM loss -> one impact score per input column of every block linear.

    Writes ``fisher.pt`` (scores per layer, sample count, settings); deterministic for a seed.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        path = _run_dir(trainer).fisher
        meta = _calibration_meta(trainer, pl_module)
        if path.is_file():
            saved = load_tensors(path)
            if saved.get("meta") == meta:
                rank_zero_info(f"[hiq] Fisher scores reused from {path}")
                pl_module.artifacts["fisher"] = saved["scores"]
                pl_module.artifacts.setdefault("timings", {})["fisher"] = saved["seconds"]
                return
            rank_zero_info(f"[hiq] {path} was computed with other settings; recomputing")
        t0 = time.time()
        windows = _calibration(trainer, pl_module)
        shard = windows[trainer.global_rank :: trainer.world_size]
        acc = FisherAccumulator(pl_module.model)
        with tqdm(total=len(shard), desc="Fisher", unit="sample", disable=not trainer.is_global_zero) as bar:
            acc.accumulate(shard, pl_module.device, on_sample=bar.update)
        if trainer.world_size > 1:
            acc.reduce(lambda t: trainer.strategy.reduce(t.to(pl_module.device), reduce_op="sum").cpu())
        scores = acc.scores()
        seconds = time.time() - t0
        if trainer.is_global_zero:
            save_tensors(path, {"scores": scores, "samples": acc.samples, "meta": meta, "seconds": seconds})
        trainer.strategy.barrier("fisher")
        pl_module.artifacts["fisher"] = scores
        pl_module.artifacts.setdefault("timings", {})["fisher"] = seconds
        _log(trainer, {"fisher/seconds": seconds, "fisher/samples": acc.samples})
        rank_zero_info(f"[hiq] Fisher: {acc.samples} samples in {seconds:.1f}s -> {path}")


class SensitivityCallback(L.Callback):
    """The matrix M per block (paper Eq. 7-8) on cached block inputs; one file per block.

    Args:
        nsamples: calibration windows used for M (the first ones of the calibration set).
        fidelity_assignments: random per-layer assignments per block used to check how well δᵀMδ/2
            predicts the measured block loss (Spearman rank correlation); 0 disables the check.
        fidelity_seed: seed of those assignments.
        enabled: measure M (off: only the ``uniform`` and ``fixed`` ratio modes can run).
    """

    def __init__(self, nsamples: int = 16, fidelity_assignments: int = 50, fidelity_seed: int = 0,
                 enabled: bool = True):
        self.enabled = enabled
        if nsamples < 1:
            raise ValueError(f"nsamples={nsamples} must be at least 1")
        self.nsamples = nsamples
        self.fidelity_assignments = fidelity_assignments
        self.fidelity_seed = fidelity_seed

    def _meta(self, trainer, pl_module) -> dict[str, Any]:
        return {**_calibration_meta(trainer, pl_module), "m_nsamples": self.nsamples,
                "settings": pl_module.sensitivity_settings().to_dict(),
                "fidelity": [self.fidelity_assignments, self.fidelity_seed]}

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if not self.enabled:
            return
        scores = pl_module.artifacts.get("fisher")
        if scores is None:
            raise RuntimeError("SensitivityCallback needs Fisher scores: list FisherCallback before it")
        run = _run_dir(trainer)
        settings = pl_module.sensitivity_settings()
        meta = self._meta(trainer, pl_module)
        model = pl_module.model
        blocks = find_blocks(model)
        device = pl_module.device
        windows = _calibration(trainer, pl_module)[: self.nsamples]
        # From here on only one block sits on the compute device at a time; caches stay on CPU.
        model.to("cpu")
        inputs = capture_block_inputs(model, windows, batch_size=1, device="cpu")
        results: list[dict | None] = [None] * len(blocks)
        t_all = time.time()
        bar = tqdm(range(len(blocks)), desc="Sensitivity (M)", unit="block", disable=not trainer.is_global_zero)
        for b in bar:
            blocks[b].to(device)
            path = run.sensitivity(b)
            saved = load_tensors(path) if path.is_file() else None
            if saved is not None and saved.get("meta") == meta:
                results[b] = saved
            elif b % trainer.world_size == trainer.global_rank:
                prefix = f"{b}."
                block_scores = {k[len(prefix):]: v for k, v in scores.items() if k.startswith(prefix)}
                res = measure_block(blocks[b], inputs, block_scores, settings, device)
                if self.fidelity_assignments > 0:
                    res["fidelity"] = quadratic_fidelity(
                        blocks[b], inputs, block_scores, settings, res["matrix"], self.fidelity_assignments,
                        self.fidelity_seed + b, device)
                res["meta"] = meta
                save_tensors(path, res)
                results[b] = res
                bar.set_postfix(evals=res["evaluations"], s_per_block=f"{res['seconds']:.1f}")
                _log(trainer, {"sensitivity/evaluations": res["evaluations"],
                               "sensitivity/seconds": res["seconds"]}, step=b)
            if b + 1 < len(blocks):
                inputs = inputs.with_hidden(block_outputs(blocks[b], inputs, device))
            blocks[b].to("cpu")
        bar.close()
        trainer.strategy.barrier("sensitivity")
        for b in range(len(blocks)):
            if results[b] is None:  # measured by another rank
                results[b] = load_tensors(run.sensitivity(b))
        pl_module.artifacts["sensitivity"] = results
        pl_module.artifacts.setdefault("timings", {})["sensitivity"] = sum(r["seconds"] for r in results)
        evals = sum(r["evaluations"] for r in results)
        rank_zero_info(f"[hiq] M: {len(blocks)} blocks, {evals} block evaluations, "
                       f"{time.time() - t_all:.1f}s this run -> {run.root / 'sensitivity'}")


class RatioSolverCallback(L.Callback):
    """Per-layer high-impact ratios by the exact MILP of Eq. 9 (HiGHS), or a baseline; writes ``ratios.json``.

    Args:
        mode: ``optimal`` (the MILP), ``uniform`` (largest single ratio within the budget) or ``fixed``.
        fixed_ratio: the ratio for ``fixed`` mode.
        time_limit: HiGHS time limit in seconds.
        mip_rel_gap: relative optimality gap at which HiGHS may stop (0 = prove optimality).
    """

    def __init__(self, mode: str = "optimal", fixed_ratio: float | None = None, time_limit: float = 300.0,
                 mip_rel_gap: float = 0.0):
        from hiq.solver import MODES

        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; choose one of {', '.join(MODES)}")
        if mode == "fixed" and fixed_ratio is None:
            raise ValueError("mode='fixed' needs fixed_ratio (a number in [0, 1])")
        self.mode = mode
        self.fixed_ratio = fixed_ratio
        self.time_limit = time_limit
        self.mip_rel_gap = mip_rel_gap

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Check the budget before any heavy stage runs."""
        from hiq.solver import check_budget

        hp = pl_module.hparams
        check_budget(hp.target_avg_bits, pl_module.layer_infos(), hp.candidates, hp.bits_low, hp.bits_high)

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        from hiq.solver import solve_ratios

        hp = pl_module.hparams
        layers = pl_module.layer_infos()
        if self.mode == "optimal":
            sens = pl_module.artifacts.get("sensitivity")
            if sens is None:
                raise RuntimeError("ratios.mode=optimal needs the matrix M: enable the sensitivity stage "
                                   "(sensitivity.enabled=true)")
            matrices = [r["matrix"].numpy() for r in sens]
        else:  # baselines still report δᵀMδ when M is there
            sens = pl_module.artifacts.get("sensitivity")
            matrices = [r["matrix"].numpy() for r in sens] if sens else None
        solution = solve_ratios(
            matrices, layers, hp.candidates, hp.bits_low, hp.bits_high, hp.target_avg_bits, mode=self.mode,
            fixed_ratio=self.fixed_ratio, time_limit=self.time_limit, mip_rel_gap=self.mip_rel_gap,
        )
        path = _run_dir(trainer).ratios
        if trainer.is_global_zero:
            solution.write_json(path)
        trainer.strategy.barrier("ratios")
        pl_module.artifacts["ratios"] = solution
        pl_module.artifacts.setdefault("timings", {})["ratios"] = solution.solve_time_s
        _log(trainer, {"ratios/achieved_avg_bits": solution.achieved_avg_bits,
                       "ratios/solve_time_s": solution.solve_time_s})
        rank_zero_info(f"[hiq] ratios ({self.mode}): avg {solution.achieved_avg_bits:.4f} bits "
                       f"(target {hp.target_avg_bits}), objective {solution.objective}, "
                       f"gap {solution.mip_gap}, {solution.solve_time_s:.2f}s -> {path}")


"""The method, top to bottom: Fisher -> M -> ratios -> per-block fits -> export -> evaluation.

Each ``*_stage`` function is one step of Algorithm 1 (paper arXiv 2511.17801) on a :class:`Job` — the model,
the recipe, the calibration windows, where it runs (:class:`Runtime`) and what earlier stages produced
(:class:`RunState`). The Lightning callbacks of :mod:`hiq.callbacks` call these functions from the outer
``Trainer.fit`` in the order of :data:`STAGES`; :func:`hiq.api.quantize` builds that fit.

Two loops over the transformer blocks — measuring M and reconstructing — share one :class:`BlockLoop`: it
captures the first block's inputs once, keeps exactly one block on the compute device, keeps the activation
caches on CPU, and carries both paths forward (the full-precision path gives the targets; the quantized path
feeds each block the outputs of the already-quantized blocks before it).

Resume: every artifact in the run directory carries a key, :func:`hiq.recipe.digest` of the model name, the
calibration windows' settings and the stage's part of the recipe (for a block, also the ratios of every layer
up to it). A file whose key matches is reused; otherwise the stage recomputes it. The rerun is bit-identical.

Why the outer fit runs no batches (``limit_train_batches=0``): the Fisher pass needs one backward per window
on the *unwrapped* model with per-sample gradient hooks; run as the outer fit's ``training_step`` under DDP it
would go through DDP's gradient all-reduce (which would mix the per-sample gradients across ranks before they
are squared) and Lightning's ``DistributedSampler`` pads uneven shards by repeating windows (which would count
them twice). So the stages shard the windows themselves (``windows[rank::world_size]``) and sum exactly.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hiq.artifacts import (
    ArtifactError,
    RunDir,
    load_json,
    load_tensors,
    manifest_problem,
    peak_memory_mb,
    save_json,
    save_tensors,
)
from hiq.checks import check_divisible
from hiq.export import weights_digest
from hiq.layouts import ModelLayout
from hiq.model import BlockInputs, block_outputs, capture_block_inputs, float32_cpu_linears
from hiq.offload import on_device
from hiq.quant.grid import setting_label as setting_label_of
from hiq.quant.hybrid import RECORD_FORMAT
from hiq.quant.record import LayerRecord
from hiq.recipe import CalibrationOptions, EvaluationOptions, ExportOptions, PlotOptions, Recipe, digest
from hiq.schedules import info
from hiq.version import __version__

STAGES = ("fisher", "sensitivity", "ratios", "plots", "reconstruction", "tuning", "export", "evaluation")


# ----------------------------------------------------------------------------------------------------------
# Where a run computes and what it has


@dataclass
class Runtime:
    """Where the stages run: compute device, run directory, rank and world size, logger, collectives."""

    run: RunDir
    device: torch.device
    rank: int = 0
    world_size: int = 1
    logger: Any = None
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = staticmethod(lambda t: t)
    barrier: Callable[[str], None] = staticmethod(lambda name: None)
    trainer: Any = None  # the outer Lightning Trainer (its logger goes to the block fits)
    #: the whole-model stages keep the block weights in host memory (``model.offload``, :mod:`hiq.offload`)
    offload: bool = False

    @classmethod
    def from_trainer(cls, trainer, device: torch.device) -> Runtime:
        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            if trainer.world_size == 1:
                return t
            return trainer.strategy.reduce(t.to(trainer.strategy.root_device), reduce_op="sum").cpu()

        return cls(RunDir(trainer.default_root_dir), torch.device(device), trainer.global_rank, trainer.world_size,
                   trainer.logger, reduce_sum, trainer.strategy.barrier, trainer)

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def log(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.logger is not None and self.is_global_zero:
            self.logger.log_metrics(metrics, step=step)


@dataclass
class RunState:
    """What the stages have produced so far (in memory; the run directory holds the same on disk)."""

    fisher: dict[str, torch.Tensor] | None = None
    sensitivity: list[dict] | None = None
    ratios: Any = None  # hiq.solver.RatioSolution
    blocks: list[dict] | None = None  # per block: losses, seconds, bits, params
    block_keys: list[str] = field(default_factory=list)
    #: for the tuning stage: this rank's calibration windows, the full-precision last block's outputs for them and
    #: the quantized last block's outputs on the quantized path
    final_targets: tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None = None
    tuning: dict | None = None  # the end-to-end tuning's key, tuned scales per layer, KL before/after
    timings: dict[str, float] = field(default_factory=dict)
    #: peak CUDA memory allocated during each stage, MiB (runs on a GPU; :func:`device_memory_of`)
    stage_peak_cuda_mb: dict[str, float] = field(default_factory=dict)
    model_dir: str | None = None
    exports: dict[str, str] = field(default_factory=dict)
    metrics: dict | None = None


@dataclass
class Job:
    """One quantization run: the model under quantization, its recipe and calibration, runtime and state."""

    model: nn.Module
    tokenizer: Any
    model_name: str
    recipe: Recipe
    calibration: CalibrationOptions
    windows: torch.Tensor
    rt: Runtime
    layout: ModelLayout
    state: RunState = field(default_factory=RunState)
    _windows_digest: str | None = field(default=None, repr=False)
    model_fingerprint: str = ""

    def __post_init__(self) -> None:
        from hiq.model import model_fingerprint

        if not self.model_fingerprint:  # of the weights as loaded: the job is made before any stage changes them
            self.model_fingerprint = model_fingerprint(self.model)

    def calibration_key(self) -> dict:
        """The calibration part of every artifact key: the model (name and a fingerprint of its weights), data
        settings and the windows themselves."""
        if self._windows_digest is None:
            self._windows_digest = hashlib.sha256(self.windows.contiguous().numpy().tobytes()).hexdigest()[:16]
        return {"model": self.model_name, "model_fingerprint": self.model_fingerprint, **asdict(self.calibration),
                "seqlen": int(self.windows.shape[1]), "windows": self._windows_digest}

    def key(self, stage: str, **parts) -> str:
        return digest({"stage": stage, "calibration": self.calibration_key(), **parts})

    def weights_key(self) -> str:
        """What the weights are: the model (name and fingerprint) plus, if blocks were reconstructed, every
        block's key (which holds the fingerprint too)."""
        tuning = self.state.tuning["key"] if self.state.tuning else None
        return weights_digest(self.model_name, self.state.block_keys, self.model_fingerprint, tuning)


@contextlib.contextmanager
def device_memory_of(job: Job, stage: str) -> Iterator[None]:
    """Record the peak CUDA memory allocated while ``stage`` runs in ``job.state.stage_peak_cuda_mb`` (``metrics.json``
    shows every stage up to the evaluation, which writes it); nothing on other devices."""
    cuda = job.rt.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(job.rt.device)
    try:
        yield
    finally:
        if cuda:
            job.state.stage_peak_cuda_mb[stage] = round(torch.cuda.max_memory_allocated(job.rt.device) / 2**20, 1)


def load_if_current(path: Path, key: str, json_file: bool = False, rt: Runtime | None = None) -> dict | None:
    """The artifact at ``path`` when it exists, passes its checksum and was written under ``key``; else None
    (and the caller recomputes it). Why it is not reused is said on stderr."""
    if not path.is_file():
        return None
    try:
        saved = load_json(path, sealed=True) if json_file else load_tensors(path)
    except ArtifactError as err:
        info(f"[hiq] {err.path} is damaged ({err.reason}); recomputing it", rt)
        return None
    if not isinstance(saved, dict) or saved.get("key") != key:
        info(f"[hiq] {path} was computed from another model, calibration or recipe; recomputing it", rt)
        return None
    return saved


def cached(rt: Runtime, path: Path, key: str, compute: Callable[[], dict], *, json_file: bool = False,
           writer: bool | None = None, may_compute: bool = True) -> tuple[dict | None, bool]:
    """One cached step: ``(artifact, reused)``. The artifact at ``path`` when it holds ``key`` (checked by
    :func:`load_if_current`); otherwise ``compute()``'s result with ``key`` added, saved by the ``writer`` rank
    (default rank 0) — or ``(None, False)`` when this rank may not compute it (another rank's block)."""
    saved = load_if_current(path, key, json_file=json_file, rt=rt)
    if saved is not None:
        return saved, True
    if not may_compute:
        return None, False
    result = {**compute(), "key": key}
    if rt.is_global_zero if writer is None else writer:
        (save_json(path, result, sealed=True) if json_file else save_tensors(path, result))
    return result, False


def done(job: Job, stage: str, seconds: float, logged: dict | None, message: str | None) -> None:
    """The end of a stage: its time in ``metrics.json``'s ``stage_seconds``, ``logged`` to the run's logger, a
    progress line."""
    job.state.timings[stage] = seconds
    if logged:
        job.rt.log(logged)
    if message:
        info(f"[hiq] {message}", job.rt)


# ----------------------------------------------------------------------------------------------------------
# The block loop shared by M and reconstruction


@dataclass
class BlockStep:
    """One block's turn in a :class:`BlockLoop`: the block (on the device) and its inputs on both paths."""

    index: int
    block: nn.Module
    fp_inputs: BlockInputs
    q_inputs: BlockInputs
    _targets: list[torch.Tensor] | None = None
    #: the finished block's outputs on the quantized path, when the caller already computed them (else the loop does)
    q_outputs: list[torch.Tensor] | None = None

    def targets(self, device) -> list[torch.Tensor]:
        """The full-precision block's outputs on the full-precision path (computed once, before any change)."""
        if self._targets is None:
            self._targets = block_outputs(self.block, self.fp_inputs, device)
        return self._targets


class BlockLoop:
    """Walks the blocks in order with one on the compute device; owns the activation caches (on CPU).

    ``quantized_path=False``: one path (M is measured on full-precision inputs). ``True``: two paths; after each
    step the quantized block's outputs on the quantized path become the next block's quantized inputs.
    Callers must compute ``step.targets()`` before changing the block's weights.
    """

    def __init__(self, job: Job, windows: torch.Tensor, quantized_path: bool):
        self.job, self.quantized_path = job, quantized_path
        self.blocks = job.layout.blocks_of(job.model)
        self.windows = windows
        job.model.to("cpu")
        self.fp_inputs = capture_block_inputs(job.model, windows, batch_size=1, device="cpu")
        self.q_inputs = self.fp_inputs

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[BlockStep]:
        device = self.job.rt.device
        for b, block in enumerate(self.blocks):
            block.to(device)
            step = BlockStep(b, block, self.fp_inputs, self.q_inputs)
            with float32_cpu_linears(block):
                yield step
            if b + 1 < len(self.blocks):
                fp_out = step.targets(device)  # the block's weights may have changed: reuse the targets
                if self.quantized_path:
                    q_out = step.q_outputs if step.q_outputs is not None else block_outputs(block, self.q_inputs,
                                                                                             device)
                    self.q_inputs = self.q_inputs.with_hidden(q_out)
                    self.fp_inputs = self.fp_inputs.with_hidden(fp_out)
                else:
                    self.fp_inputs = self.q_inputs = self.fp_inputs.with_hidden(fp_out)
            block.to("cpu")


# ----------------------------------------------------------------------------------------------------------
# The stages, in the order they run


def fisher_stage(job: Job, options=None) -> None:
    """Step 1: empirical Fisher diagonal of the LM loss -> one impact score per input column
    (``fisher.safetensors``)."""
    rt, path = job.rt, job.rt.run.fisher
    saved, reused = cached(rt, path, job.key("fisher"), lambda: _fisher(job))
    rt.barrier("fisher")
    job.state.fisher = saved["scores"]
    done(job, "fisher", saved["seconds"], None if reused else {"fisher/samples": saved["samples"]},
         f"Fisher scores reused from {path}" if reused else
         f"Fisher: {saved['samples']} samples in {saved['seconds']:.1f}s -> {path}")


def _fisher(job: Job) -> dict:
    from tqdm.auto import tqdm

    from hiq.impact import FisherAccumulator

    rt, t0 = job.rt, time.time()
    shard = job.windows[rt.rank :: rt.world_size]
    linears = job.layout.linears_of(job.model)
    acc = FisherAccumulator(job.model, linears)
    with tqdm(total=len(shard), desc="Fisher", unit="sample", disable=not rt.is_global_zero) as bar, \
            on_device(job.model, rt.device, [lin for _, lin in linears] if rt.offload else ()), \
            float32_cpu_linears(job.model):
        acc.accumulate(shard, rt.device, on_sample=bar.update, batch_size=job.recipe.sensitivity.fisher_batch_size)
    if rt.world_size > 1:
        acc.reduce(rt.reduce_sum)
    return {"scores": acc.scores(), "samples": acc.samples, "seconds": time.time() - t0,
            "calibration": job.calibration_key()}


def sensitivity_stage(job: Job, options=None) -> None:
    """Step 2: the matrix M per block (paper Eq. 7-8) on cached block inputs; ``sensitivity/block_XX.safetensors``.

    Blocks are shared out across ranks (block b on rank b mod world_size) and gathered through the run directory.
    """
    from tqdm.auto import tqdm

    from hiq.sensitivity import SensitivitySettings, measure_block, quadratic_fidelity

    opts, rt, scores = job.recipe.sensitivity, job.rt, _need(job.state.fisher, "sensitivity", "fisher")
    q = job.recipe.quant
    settings = SensitivitySettings(job.recipe.ratios.candidates, q.bits, q.bits_high, q.group_size)
    key = job.key("sensitivity", quant=asdict(q), candidates=list(settings.candidates), sensitivity=opts.fingerprint())
    loop = BlockLoop(job, job.windows[: opts.nsamples], quantized_path=False)
    results: list[dict | None] = [None] * len(loop)
    t_all = time.time()

    def measure(step: BlockStep) -> dict:
        block_scores = job.layout.block_part(scores, job.model, step.index)
        res = measure_block(step.block, step.fp_inputs, block_scores, settings, rt.device, method=opts.method)
        if opts.fidelity_assignments > 0:
            res["fidelity"] = quadratic_fidelity(step.block, step.fp_inputs, block_scores, settings, res["matrix"],
                                                 opts.fidelity_assignments, opts.fidelity_seed + step.index,
                                                 rt.device)
        return res

    with tqdm(total=len(loop), desc="Sensitivity (M)", unit="block", disable=not rt.is_global_zero) as bar:
        for step in loop:
            b, path = step.index, rt.run.sensitivity(step.index)
            mine = b % rt.world_size == rt.rank  # a block another rank measures is read once all are done
            saved, reused = cached(rt, path, key, lambda step=step: measure(step), writer=mine, may_compute=mine)
            if saved is not None:
                results[b] = saved
                if not reused:
                    bar.set_postfix(evals=saved["evaluations"], s_per_block=f"{saved['seconds']:.1f}")
                    rt.log({"sensitivity/evaluations": saved["evaluations"],
                            "sensitivity/seconds": saved["seconds"]}, step=b)
            bar.update()
    rt.barrier("sensitivity")
    results = [r if r is not None else load_tensors(rt.run.sensitivity(b)) for b, r in enumerate(results)]
    job.state.sensitivity = results
    evals = sum(r["evaluations"] for r in results)
    done(job, "sensitivity", sum(r["seconds"] for r in results), None,
         f"M: {len(results)} blocks, {evals} block evaluations, {time.time() - t_all:.1f}s this run -> "
         f"{rt.run.root / 'sensitivity'}")


def ratio_stage(job: Job, options=None) -> None:
    """Step 3: per-layer high-impact ratios by the exact MILP of Eq. 9 (HiGHS) or a baseline; ``ratios.json``."""
    from hiq.solver import solve_ratios

    r, q, rt = job.recipe.ratios, job.recipe.quant, job.rt
    sens = job.state.sensitivity
    if r.mode == "optimal":
        _need(sens, "ratios.mode=optimal", "sensitivity")
    matrices = [s["matrix"].numpy() for s in sens] if sens else None  # baselines still report δᵀMδ
    solution = solve_ratios(matrices, job.layout.layer_infos(job.model), r.candidates, q.bits, q.bits_high,
                            r.target_avg_bits, mode=r.mode, fixed_ratio=r.fixed_ratio, time_limit=r.time_limit,
                            mip_rel_gap=r.mip_rel_gap)
    if rt.is_global_zero:
        solution.write_json(rt.run.ratios)
    rt.barrier("ratios")
    job.state.ratios = solution
    done(job, "ratios", solution.solve_time_s, {"ratios/achieved_avg_bits": solution.achieved_avg_bits},
         f"ratios ({r.mode}): avg {solution.achieved_avg_bits:.4f} bits (target {r.target_avg_bits}), "
         f"objective {solution.objective}, gap {solution.mip_gap}, {solution.solve_time_s:.2f}s -> {rt.run.ratios}")


def plot_stage(job: Job, options: PlotOptions) -> None:
    """Figure 1/2 analogs (Fisher score per channel, chosen ratio per layer) in ``plots/``, sent to the logger."""
    from hiq.plots import log_images, plot_fisher, plot_ratios

    if not (options.enabled and job.rt.is_global_zero):
        return
    out, files = job.rt.run.plots, []
    if job.state.fisher is not None:
        files.append(plot_fisher(job.state.fisher, out / "fisher_channels.png"))
    if job.state.ratios is not None:
        files.append(plot_ratios(job.state.ratios.layers, out / "ratios_by_layer.png"))
    log_images(job.rt.logger, files)


def reconstruction_stage(job: Job, options=None) -> None:
    """Step 4: hybrid block reconstruction (learned rounding of both parts), block by block, each block its own
    ``Trainer.fit``.

    For block b the full-precision block on the full-precision path gives the targets; the block with hybrid
    linears is fitted on the quantized path's inputs (:func:`hiq.blockfit.fit_block`). The integer record of its
    linears goes to ``blocks/block_XX.safetensors``; the block keeps the dequantised weights, and its outputs become
    the next block's quantized inputs. Each rank fits on its shard of windows; gradients are averaged.
    """
    from tqdm.auto import tqdm

    from hiq.blockfit import block_summary, install_records

    opts, q, rt = job.recipe.reconstruction, job.recipe.quant, job.rt
    _need(job.state.fisher, "reconstruction", "fisher")
    ratios = _need(job.state.ratios, "reconstruction", "ratios").ratios
    check_divisible("reconstruction.batch_size", opts.batch_size, rt.world_size)
    block_of = {layer.name: layer.block for layer in job.layout.layer_infos(job.model)}
    windows = job.windows[: opts.nsamples] if opts.nsamples else job.windows
    loop = BlockLoop(job, windows[rt.rank :: rt.world_size], quantized_path=True)
    t_all = time.time()
    summary, keys = [], []
    with tqdm(total=len(loop), desc="Reconstruction", unit="block", disable=not rt.is_global_zero) as bar:
        for step in loop:
            b, block = step.index, step.block
            targets = step.targets(rt.device)
            upstream = {k: v for k, v in ratios.items() if block_of[k] <= b}  # this block's and every earlier one's
            key = job.key("block", quant=asdict(q), reconstruction=opts.fingerprint(), ratios=upstream,
                          record=RECORD_FORMAT)
            result, reused = cached(rt, rt.run.block(b), key, lambda step=step: _fit(job, step, len(loop)))
            if reused:
                info(f"[hiq] block {b}: reused {rt.run.block(b)}", rt)
                install_records(block, job.layout, result["layers"])
            else:
                rt.log({"recon/loss_rtn": result["loss_rtn"], "recon/loss_final": result["loss_final"],
                        "recon/seconds": result["seconds"]}, step=b)
            if b == len(loop) - 1 and opts.tune_steps and step.q_outputs is None:
                step.q_outputs = block_outputs(block, step.q_inputs, rt.device)  # the tuning's KL before it starts
            summary.append(block_summary(b, result))
            keys.append(key)
            bar.set_postfix(rtn=f"{result['loss_rtn']:.4g}", final=f"{result['loss_final']:.4g}")
            bar.update()
            result = None  # this block's records are on disk; the next block's fit does not hold them
    rt.barrier("reconstruction")
    job.state.final_targets = (loop.windows, targets, step.q_outputs) if summary else None
    job.state.blocks, job.state.block_keys = summary, keys
    done(job, "reconstruction", sum(r["seconds"] for r in summary), None,
         f"reconstruction: {len(summary)} blocks, {time.time() - t_all:.1f}s this run -> {rt.run.root / 'blocks'}")


def _fit(job: Job, step: BlockStep, n_blocks: int) -> dict:
    """Block ``step.index``'s fit: RTN's loss, the fit, the fitted block's loss; the block file's content."""
    from hiq.blockfit import fit_block, reconstruction_loss, reduce_loss, rtn_loss

    opts, q, rt, b, block = job.recipe.reconstruction, job.recipe.quant, job.rt, step.index, step.block
    t0, targets = time.time(), step.targets(rt.device)
    scores = job.layout.block_part(job.state.fisher, job.model, b)
    ratios = job.layout.block_part(job.state.ratios.ratios, job.model, b)
    loss_rtn = reduce_loss(rt, rtn_loss(block, job.layout, scores, ratios, q, step.q_inputs, targets, rt.device))
    layers, steps = fit_block(block, job.layout, b, scores, ratios, step.q_inputs, targets, q, opts, rt,
                              f"Block {b + 1}/{n_blocks}")
    step.q_outputs = []  # the final loss's forward pass gives the next block its quantized-path inputs
    loss_final = reduce_loss(rt, reconstruction_loss(block, step.q_inputs, targets, rt.device,
                                                     outputs=step.q_outputs))
    return {"layers": {name: r.to_dict() for name, r in layers.items()}, "loss_rtn": loss_rtn,
            "loss_final": loss_final, "steps": steps, "seconds": time.time() - t0}


def block_records(job: Job) -> dict[str, LayerRecord]:
    """Every reconstructed layer's finished record keyed by full module name, read back from ``blocks/`` and
    checked against the keys this run computed, with the tuned scales when the tuning kept them."""
    from hiq.export import read_block_records, with_tuned_scales

    records, _ = read_block_records(job.rt.run, job.layout, job.model, len(job.state.block_keys),
                                    expected_keys=job.state.block_keys)
    return with_tuned_scales(records, job.state.tuning["scales"]) if job.state.tuning else records


def tuning_stage(job: Job, options=None) -> None:
    """Step 4b: end-to-end scale tuning of every reconstructed layer (:mod:`hiq.tuning`), one ``Trainer.fit``;
    ``tuning.safetensors`` holds the tuned scales and is reused while its key (the blocks' keys and the
    ``tune_*`` options) holds. The tuned scales are kept only when they lower the KL to the full-precision model
    on the calibration windows; the model then holds the tuned weights."""
    from hiq.export import with_tuned_scales
    from hiq.tuning import finite_or_raise, tune_scales

    opts, rt = job.recipe.reconstruction, job.rt
    job.state.tuning = None
    if not job.state.block_keys or opts.tune_steps == 0:
        return
    check_divisible("reconstruction.tune_batch_size", opts.tune_batch_size, rt.world_size)
    key = job.key("tuning", blocks=list(job.state.block_keys), tuning=opts.tuning_fingerprint(),
                  record=RECORD_FORMAT)
    records = block_records(job)

    def tune() -> dict:
        if job.state.final_targets is None:
            raise RuntimeError("the tuning stage needs the reconstruction stage's full-precision outputs of the last "
                               "block; run the reconstruction in the same fit")
        saved = tune_scales(job.model, job.layout.blocks_path(job.model), records, *job.state.final_targets, opts,
                            rt, key)
        gc.collect()  # the tuning Trainer's cycle holds every layer's tuned copy (see hiq.blockfit.fit_block)
        return saved

    saved, reused = cached(rt, rt.run.tuning, key, tune)
    rt.barrier("tuning")
    finite_or_raise(float(saved["kl_after"]), "the KL after tuning")
    job.state.tuning, job.state.final_targets = saved, None
    done(job, "tuning", float(saved["seconds"]), None,
         f"tuning: reused {rt.run.tuning} (KL {saved['kl_before']:.4g} -> {saved['kl_after']:.4g})" if reused else None)
    if reused:  # a computed tuning left the model with these weights (tune_scales)
        _install_full(job, with_tuned_scales(records, saved["scales"]))


def _install_full(job: Job, records: dict[str, LayerRecord]) -> None:
    """Every reconstructed layer of the model gets the dequantised weights of its record."""
    modules = dict(job.model.named_modules())
    with torch.no_grad():
        for name, record in records.items():
            lin = modules[name]
            lin.weight.data = record.dequantize().to(device=lin.weight.device, dtype=lin.weight.dtype)


def export_stage(job: Job, options: ExportOptions) -> None:
    """Step 5 (rank 0): the checkpoints of ``export.formats`` (:mod:`hiq.export`) — ``packed/`` (deployable),
    ``model/`` (dequantised) and ``compressed-tensors/`` (single-width runs). Each directory carries ``hiq.json``
    with the key of the weights and is reused while that key holds."""
    from hiq.export import dir_megabytes, write_checkpoint, write_dequantized
    from hiq.model import parse_dtype
    from hiq.quant.bits import stored_dtype
    from hiq.recipe import EXPORT_FORMATS

    rt = job.rt
    exports: dict[str, str] = {}
    quantized = bool(job.state.block_keys)
    for fmt in options.formats:
        target = rt.run.root / EXPORT_FORMATS[fmt]
        if fmt != "dequantized" and not quantized:
            info(f"[hiq] export {fmt} skipped: no block was reconstructed (reconstruction.enabled=false)", rt)
            continue
        key = digest({"weights": job.weights_key(), "format": fmt, "dtype": options.dtype})
        exports[fmt] = str(target)
        if not rt.is_global_zero:
            continue
        problem = manifest_problem(target, key)
        if problem is None:
            info(f"[hiq] export reused: {target} (checksums verified)", rt)
            continue
        if target.exists():
            info(f"[hiq] {target} cannot be reused ({problem}); exporting it again", rt)
        t0 = time.time()
        meta = {"key": key, "setting": setting_label(job), "recipe": job.recipe.to_dict(),
                "ratios": job.state.ratios.ratios if job.state.ratios is not None else None}
        if fmt == "dequantized":
            dtype = parse_dtype(options.dtype) if options.dtype else stored_dtype(job.model)  # the source's dtype
            write_dequantized(job.model, job.tokenizer, target, dtype, meta)
        else:
            write_checkpoint(fmt, job.model, block_records(job), target, job.tokenizer,
                             {**meta, "source_model": job.model_name})
        job.state.timings[f"export_{fmt}"] = time.time() - t0
        info(f"[hiq] exported {fmt}: {target} ({dir_megabytes(target):.2f} MB)", rt)
    job.state.exports = exports
    job.state.model_dir = exports.get("dequantized")
    rt.barrier("export")


class RunStore:
    """The evaluation's results kept in ``eval/<name>.json`` of the run directory, each reused while its key (the
    weights and the settings it was computed under) holds (:class:`hiq.evaluation.Store`)."""

    def __init__(self, rt: Runtime, weights: str):
        self.rt, self.weights = rt, weights

    def _key(self, parts: dict) -> str:
        return digest({"weights": self.weights, **parts})

    def get(self, name: str, parts: dict) -> dict | None:
        return load_if_current(self.rt.run.evaluation(name), self._key(parts), json_file=True, rt=self.rt)

    def put(self, name: str, parts: dict, result: dict) -> dict:
        saved = {**result, "key": self._key(parts)}
        save_json(self.rt.run.evaluation(name), saved, sealed=True)
        return saved


def evaluation_stage(job: Job, options: EvaluationOptions) -> None:
    """Step 6: perplexity per dataset and zero-shot accuracy of the model in memory (:mod:`hiq.evaluation`), then
    ``metrics.json`` (rank 0). Each result is kept in ``eval/<name>.json`` and reused while the weights (their key)
    and the protocol stay."""
    from hiq.evaluation import perplexities, zeroshot

    rt = job.rt
    if rt.is_global_zero:
        store = RunStore(rt, job.weights_key())
        host = [lin for _, lin in job.layout.linears_of(job.model)] if rt.offload else ()
        with on_device(job.model, rt.device, host):
            results = perplexities(job.model, job.tokenizer, options, store, progress=True)
            zs = zeroshot(job.model, job.tokenizer, options, store) if options.tasks else None
        job.state.timings["evaluation"] = sum(r["seconds"] for r in results.values()) + (zs["seconds"] if zs else 0)
        metrics = build_metrics(job, results, zs)
        save_json(rt.run.metrics, metrics)
        job.state.metrics = metrics
        logged = {f"eval/{k}_ppl": v["ppl"] for k, v in results.items()}
        if zs is not None:
            logged.update({f"eval/{n}_{r['reported']}": r[r["reported"]] for n, r in zs["tasks"].items()})
            logged["eval/zeroshot_avg"] = zs["average"]
        rt.log(logged)
        summary = ", ".join(f"{k} ppl {v['ppl']:.3f}" for k, v in results.items())
        if zs is not None:
            summary += f", zero-shot average {zs['average']:.4f}"
        info(f"[hiq] {metrics['setting']} at {metrics['avg_bits']:.4f} avg bits: {summary} -> {rt.run.metrics}", rt)
    rt.barrier("evaluation")


# ----------------------------------------------------------------------------------------------------------
# The stage table: what each callback of hiq.callbacks runs, when, and what it checks before any work


def _checks_batch(field: str) -> Callable:
    def check(recipe: Recipe, options, world_size: int, pipeline) -> None:
        check_divisible(f"reconstruction.{field}", getattr(recipe.reconstruction, field), world_size)
    return check


def _check_budget(recipe: Recipe, options, world_size: int, pipeline) -> None:
    from hiq.solver import check_budget, check_target

    q, r = recipe.quant, recipe.ratios
    check_target(r.target_avg_bits, r.candidates, q.bits, q.bits_high)  # the run's rule, then the layers' floor
    check_budget(r.target_avg_bits, pipeline.layout.layer_infos(pipeline.model), r.candidates, q.bits, q.bits_high)


def _check_evaluation(recipe: Recipe, options, world_size: int, pipeline) -> None:
    from hiq.perplexity import check_evaluation

    check_evaluation(options)  # a typo in a dataset name or a missing hiq[eval] fails here


@dataclass(frozen=True)
class Stage:
    """One step of Algorithm 1: its function ``run(job, options)``, whether it runs for a recipe and its options,
    which options object it takes (``options``: a section of the fit, or None), and a check run in the callback's
    ``setup``, before any stage's work (``check(recipe, options, world_size, pipeline)``)."""

    name: str
    run: Callable[[Job, Any], None]
    enabled: Callable[[Recipe, Any], bool] = lambda recipe, options: True
    options: str | None = None
    check: Callable | None = None


STAGE_TABLE: dict[str, Stage] = {s.name: s for s in (
    Stage("fisher", fisher_stage),
    Stage("sensitivity", sensitivity_stage, lambda r, o: r.sensitivity.enabled),
    Stage("ratios", ratio_stage, check=_check_budget),
    Stage("plots", plot_stage, lambda r, o: o.enabled, "plots"),
    Stage("reconstruction", reconstruction_stage, lambda r, o: r.reconstruction.enabled,
          check=_checks_batch("batch_size")),
    Stage("tuning", tuning_stage, lambda r, o: r.reconstruction.enabled and r.reconstruction.tune_steps > 0,
          check=_checks_batch("tune_batch_size")),
    Stage("export", export_stage, lambda r, o: o.enabled, "export"),
    Stage("evaluation", evaluation_stage, lambda r, o: o.enabled, "evaluation", _check_evaluation),
)}
assert tuple(STAGE_TABLE) == STAGES


# ----------------------------------------------------------------------------------------------------------
# Helpers of the stages


def _need(value, stage: str, producer: str):
    if value is None:
        raise RuntimeError(f"{stage} needs the {producer} stage's result; run the stages in the order of "
                           f"hiq.pipeline.STAGES ({' -> '.join(STAGES)})")
    return value


def setting_label(job: Job) -> str:
    """The run's setting once blocks were reconstructed (``W2/3 per-channel``; ``W2 per-channel`` when no layer got
    high-impact columns), else ``FP``."""
    if not job.state.blocks:
        return "FP"
    q = job.recipe.quant
    ratios = job.state.ratios.ratios if job.state.ratios is not None else {}
    return setting_label_of(q.bits, q.group_size, q.bits_high if any(ratios.values()) else q.bits)


def device_label(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``: where the run's stages computed."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def blocks_average_bits(blocks: list[dict]) -> tuple[float, float]:
    """(code bits, storage bits) per weight over the reconstructed blocks' summaries."""
    params = sum(b["params"] for b in blocks)
    return sum(b["weight_bits"] for b in blocks) / params, sum(b["storage_bits"] for b in blocks) / params


def build_metrics(job: Job, results: dict, zeroshot: dict | None = None) -> dict:
    """``metrics.json``: avg bits (codes and storage), perplexities, timings, the recipe, calibration, versions."""
    import lightning as L

    from hiq.quant.bits import stored_width

    summary, solution = job.state.blocks, job.state.ratios
    if summary:
        avg_bits, avg_bits_storage = blocks_average_bits(summary)
        convention = "weights only (codes), as the papers print per-channel rows"
    else:
        avg_bits = avg_bits_storage = stored_width(job.model)
        convention = "stored dtype width"
    metrics = {
        "setting": setting_label(job),
        "model": job.model_name,
        "avg_bits": avg_bits,
        "avg_bits_convention": convention,
        "avg_bits_storage": avg_bits_storage,
        "target_avg_bits": job.recipe.ratios.target_avg_bits if summary else None,
        "ratio_mode": solution.mode if solution is not None else None,
    }
    for key, res in results.items():
        metrics[f"{key}_ppl"] = res["ppl"]
    if zeroshot is not None:
        metrics["zeroshot_avg"] = zeroshot["average"]
        metrics["zeroshot"] = {k: v for k, v in zeroshot.items() if k != "seconds"}
    metrics["stage_seconds"] = {k: round(v, 2) for k, v in job.state.timings.items()}
    metrics["eval"] = {k: {f: v[f] for f in ("split", "windows", "tokens_scored", "seconds", "note")}
                       for k, v in results.items()}
    if summary:
        metrics["blocks"] = [{k: r[k] for k in ("block", "loss_rtn", "loss_final", "seconds")} for r in summary]
    if job.state.tuning:
        metrics["tuning"] = {k: job.state.tuning[k] for k in ("kl_before", "kl_after", "kl_tuned", "kept", "steps",
                                                               "seconds")}
    metrics["recipe"] = job.recipe.to_dict()
    metrics["recipe_key"] = job.recipe.key()
    metrics["calibration"] = job.calibration_key()
    metrics["model_fingerprint"] = job.model_fingerprint
    metrics["model_dtype"] = str(next(job.model.parameters()).dtype).removeprefix("torch.")
    metrics["weights_key"] = job.weights_key()
    metrics["run_dir"] = str(job.rt.run.root)
    if job.state.model_dir is not None:
        metrics["model_dir"] = job.state.model_dir
    if job.state.exports:
        metrics["exports"] = dict(job.state.exports)
    metrics["world_size"] = job.rt.world_size
    metrics["device"] = device_label(job.rt.device)
    metrics["memory"] = peak_memory_mb()  # of this run's process; a resumed run reports its own peak
    if job.state.stage_peak_cuda_mb:
        metrics["stage_peak_cuda_mb"] = dict(job.state.stage_peak_cuda_mb)
    import transformers

    metrics["versions"] = {"hiq": __version__, "torch": torch.__version__, "lightning": L.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version()}
    return metrics

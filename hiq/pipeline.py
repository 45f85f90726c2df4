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
    staged_directory,
    write_manifest,
)
from hiq.layouts import ModelLayout
from hiq.model import BlockInputs, block_outputs, capture_block_inputs, float32_cpu_linears
from hiq.quant.grid import setting_label as setting_label_of
from hiq.quant.hybrid import RECORD_FORMAT
from hiq.recipe import (
    CalibrationOptions,
    EvaluationOptions,
    ExportOptions,
    PlotOptions,
    Recipe,
    digest,
)
from hiq.version import __version__

STAGES = ("fisher", "sensitivity", "ratios", "plots", "reconstruction", "tuning", "export", "evaluation")


def info(message: str, rt: Runtime | None = None) -> None:
    """Progress line on stderr, once per run (rank 0)."""
    import sys

    if rt is None or rt.is_global_zero:
        print(message, file=sys.stderr, flush=True)


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


def weights_digest(model_name: str, block_keys: list[str], fingerprint: str | None = None,
                   tuning_key: str | None = None) -> str:
    """The key of a model's weights: its name and fingerprint, the keys of its reconstructed blocks and, when the
    scales were tuned end to end, the tuning's key (``metrics.json``)."""
    payload = {"model": model_name, "fingerprint": fingerprint, "blocks": list(block_keys) or None}
    if tuning_key is not None:  # runs without the tuning keep the key they always had
        payload["tuning"] = tuning_key
    return digest(payload)


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


def fisher_stage(job: Job) -> None:
    """Step 1: empirical Fisher diagonal of the LM loss -> one impact score per input column
    (``fisher.safetensors``)."""
    from tqdm.auto import tqdm

    from hiq.impact import FisherAccumulator

    rt, path = job.rt, job.rt.run.fisher
    key = job.key("fisher")
    saved = load_if_current(path, key, rt=rt)
    if saved is not None:
        info(f"[hiq] Fisher scores reused from {path}", rt)
        job.state.fisher, job.state.timings["fisher"] = saved["scores"], saved["seconds"]
        return
    t0 = time.time()
    shard = job.windows[rt.rank :: rt.world_size]
    job.model.to(rt.device)
    acc = FisherAccumulator(job.model, job.layout.linears_of(job.model))
    with tqdm(total=len(shard), desc="Fisher", unit="sample", disable=not rt.is_global_zero) as bar, \
            float32_cpu_linears(job.model):
        acc.accumulate(shard, rt.device, on_sample=bar.update, batch_size=job.recipe.sensitivity.fisher_batch_size)
    if rt.world_size > 1:
        acc.reduce(rt.reduce_sum)
    scores = acc.scores()
    seconds = time.time() - t0
    if rt.is_global_zero:
        save_tensors(path, {"scores": scores, "samples": acc.samples, "key": key, "seconds": seconds,
                            "calibration": job.calibration_key()})
    rt.barrier("fisher")
    job.state.fisher, job.state.timings["fisher"] = scores, seconds
    rt.log({"fisher/seconds": seconds, "fisher/samples": acc.samples})
    info(f"[hiq] Fisher: {acc.samples} samples in {seconds:.1f}s -> {path}", rt)


def sensitivity_stage(job: Job) -> None:
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
    bar = tqdm(total=len(loop), desc="Sensitivity (M)", unit="block", disable=not rt.is_global_zero)
    for step in loop:
        b, path = step.index, rt.run.sensitivity(step.index)
        saved = load_if_current(path, key, rt=rt)
        if saved is not None:
            results[b] = saved
        elif b % rt.world_size == rt.rank:
            block_scores = job.layout.block_part(scores, job.model, b)
            res = measure_block(step.block, step.fp_inputs, block_scores, settings, rt.device, method=opts.method)
            if opts.fidelity_assignments > 0:
                res["fidelity"] = quadratic_fidelity(step.block, step.fp_inputs, block_scores, settings,
                                                     res["matrix"], opts.fidelity_assignments,
                                                     opts.fidelity_seed + b, rt.device)
            res["key"] = key
            save_tensors(path, res)
            results[b] = res
            bar.set_postfix(evals=res["evaluations"], s_per_block=f"{res['seconds']:.1f}")
            rt.log({"sensitivity/evaluations": res["evaluations"], "sensitivity/seconds": res["seconds"]}, step=b)
        bar.update()
    bar.close()
    rt.barrier("sensitivity")
    for b in range(len(results)):
        if results[b] is None:  # measured by another rank
            results[b] = load_tensors(rt.run.sensitivity(b))
    job.state.sensitivity = results
    job.state.timings["sensitivity"] = sum(r["seconds"] for r in results)
    evals = sum(r["evaluations"] for r in results)
    info(f"[hiq] M: {len(results)} blocks, {evals} block evaluations, {time.time() - t_all:.1f}s this run -> "
         f"{rt.run.root / 'sensitivity'}", rt)


def ratio_stage(job: Job) -> None:
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
    job.state.ratios, job.state.timings["ratios"] = solution, solution.solve_time_s
    rt.log({"ratios/achieved_avg_bits": solution.achieved_avg_bits, "ratios/solve_time_s": solution.solve_time_s})
    info(f"[hiq] ratios ({r.mode}): avg {solution.achieved_avg_bits:.4f} bits (target {r.target_avg_bits}), "
         f"objective {solution.objective}, gap {solution.mip_gap}, {solution.solve_time_s:.2f}s -> {rt.run.ratios}",
         rt)


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


def reconstruction_stage(job: Job) -> None:
    """Step 4: hybrid AdaRound + LWC reconstruction, block by block, each block its own ``Trainer.fit``.

    For block b the full-precision block on the full-precision path gives the targets; the block with hybrid
    linears is fitted on the quantized path's inputs (:func:`hiq.blockfit.fit_block`). The integer record of its
    linears goes to ``blocks/block_XX.safetensors``; the block keeps the dequantised weights, and its outputs become
    the next block's quantized inputs. Each rank fits on its shard of windows; gradients are averaged.
    """
    from tqdm.auto import tqdm

    from hiq.blockfit import block_summary, fit_block, install_records, reconstruction_loss, reduce_loss, rtn_loss

    opts, q, rt = job.recipe.reconstruction, job.recipe.quant, job.rt
    scores = _need(job.state.fisher, "reconstruction", "fisher")
    solution = _need(job.state.ratios, "reconstruction", "ratios")
    if opts.batch_size % rt.world_size:
        raise ValueError(f"reconstruction.batch_size={opts.batch_size} is not divisible by the {rt.world_size} "
                         f"processes; use a multiple of {rt.world_size}")
    ratios = solution.ratios
    block_of = {layer.name: layer.block for layer in job.layout.layer_infos(job.model)}
    windows = job.windows[: opts.nsamples] if opts.nsamples else job.windows
    loop = BlockLoop(job, windows[rt.rank :: rt.world_size], quantized_path=True)
    t_all = time.time()
    summary, keys = [], []
    bar = tqdm(total=len(loop), desc="Reconstruction", unit="block", disable=not rt.is_global_zero)
    for step in loop:
        b, block = step.index, step.block
        targets = step.targets(rt.device)
        block_ratios = job.layout.block_part(ratios, job.model, b)
        upstream = {k: v for k, v in ratios.items() if block_of[k] <= b}  # this block's and every earlier one's
        key = job.key("block", quant=asdict(q), reconstruction=opts.fingerprint(), ratios=upstream,
                      record=RECORD_FORMAT)
        path = rt.run.block(b)
        saved = load_if_current(path, key, rt=rt)
        if saved is not None:
            info(f"[hiq] block {b}: reused {path}", rt)
            install_records(block, job.layout, saved["layers"])
            result = saved
        else:
            t0 = time.time()
            block_scores = job.layout.block_part(scores, job.model, b)
            loss_rtn = reduce_loss(rt, rtn_loss(block, job.layout, block_scores, block_ratios, q, step.q_inputs,
                                                targets, rt.device))
            layers, steps = fit_block(job, b, block, block_scores, block_ratios, step.q_inputs, targets,
                                      f"Block {b + 1}/{len(loop)}")
            install_records(block, job.layout, layers)
            step.q_outputs = []  # the final loss's forward pass gives the next block its quantized-path inputs
            loss_final = reduce_loss(rt, reconstruction_loss(block, step.q_inputs, targets, rt.device,
                                                             outputs=step.q_outputs))
            result = {"layers": layers, "key": key, "loss_rtn": loss_rtn, "loss_final": loss_final, "steps": steps,
                      "seconds": time.time() - t0}
            if rt.is_global_zero:
                save_tensors(path, result)
            rt.log({"recon/loss_rtn": loss_rtn, "recon/loss_final": loss_final, "recon/seconds": result["seconds"]},
                   step=b)
        if b == len(loop) - 1 and opts.tune_steps and step.q_outputs is None:
            step.q_outputs = block_outputs(block, step.q_inputs, rt.device)  # the tuning's KL before it starts
        summary.append(block_summary(b, result))
        keys.append(key)
        bar.set_postfix(rtn=f"{result['loss_rtn']:.4g}", final=f"{result['loss_final']:.4g}")
        bar.update()
        result = saved = layers = None  # this block's records are on disk; the next block's fit does not hold them
    bar.close()
    rt.barrier("reconstruction")
    job.state.final_targets = (loop.windows, targets, step.q_outputs) if summary else None
    job.state.blocks, job.state.block_keys = summary, keys
    job.state.timings["reconstruction"] = sum(r["seconds"] for r in summary)
    info(f"[hiq] reconstruction: {len(summary)} blocks, {time.time() - t_all:.1f}s this run -> "
         f"{rt.run.root / 'blocks'}", rt)


def block_records(job: Job) -> dict[str, dict]:
    """Every reconstructed layer's finished record (codes, scales, zeros, permutation) keyed by full module name,
    read back from ``blocks/`` and checked against the keys this run computed."""
    records: dict[str, dict] = {}
    for b, key in enumerate(job.state.block_keys):
        path = job.rt.run.block(b)
        saved = load_if_current(path, key)
        if saved is None:
            raise RuntimeError(f"{path} does not hold block {b} of this run (changed on disk since the "
                               f"reconstruction); rerun to recompute it")
        for local, record in saved["layers"].items():
            records[job.layout.full_name(job.model, b, local)] = record
    if job.state.tuning:
        from hiq.tuning import with_scales

        records = {name: with_scales(r, job.state.tuning["scales"][name]) for name, r in records.items()}
    return records


def tuning_stage(job: Job) -> None:
    """Step 4b: end-to-end scale tuning of every reconstructed layer (:mod:`hiq.tuning`), one ``Trainer.fit``;
    ``tuning.safetensors`` holds the tuned scales and is reused while its key (the blocks' keys and the
    ``tune_*`` options) holds. The tuned scales are kept only when they lower the KL to the full-precision model
    on the calibration windows; the model then holds the tuned weights."""
    from hiq.tuning import finite_or_raise, with_scales

    opts, rt = job.recipe.reconstruction, job.rt
    job.state.tuning = None
    if not job.state.block_keys or opts.tune_steps == 0:
        return
    key = job.key("tuning", blocks=list(job.state.block_keys), tuning=opts.tuning_fingerprint(),
                  record=RECORD_FORMAT)
    path = rt.run.tuning
    records = block_records(job)
    saved = load_if_current(path, key, rt=rt)
    if saved is not None:
        info(f"[hiq] tuning: reused {path} (KL {saved['kl_before']:.4g} -> {saved['kl_after']:.4g})", rt)
    else:
        saved = _tune_scales(job, key, records)
        gc.collect()  # the tuning Trainer's cycle holds every layer's tuned copy (see hiq.blockfit.fit_block)
        if rt.is_global_zero:
            save_tensors(path, saved)
        rt.barrier("tuning")
    finite_or_raise(float(saved["kl_after"]), "the KL after tuning")
    job.state.tuning, job.state.final_targets = saved, None
    job.state.timings["tuning"] = float(saved["seconds"])
    _install_full(job, {name: with_scales(r, saved["scales"][name]) for name, r in records.items()})


def _tune_scales(job: Job, key: str, records: dict[str, dict]) -> dict:
    """Fit the scales (:class:`hiq.tuning.ScaleTuning` under its own Trainer); the artifact's content."""
    import lightning as L

    from hiq.blockfit import _swap, quiet_lightning, reduce_loss
    from hiq.schedules import StepProgressBar
    from hiq.tuning import ScaledCodesLinear, ScaleTuning, WindowPairs, teacher_cache_fits

    opts, rt = job.recipe.reconstruction, job.rt
    if job.state.final_targets is None:
        raise RuntimeError("the tuning stage needs the reconstruction stage's full-precision outputs of the last "
                           "block; run the reconstruction in the same fit")
    windows, final_hidden, q_hidden = job.state.final_targets
    if opts.tune_batch_size % rt.world_size:
        raise ValueError(f"reconstruction.tune_batch_size={opts.tune_batch_size} is not divisible by the "
                         f"{rt.world_size} processes; use a multiple of {rt.world_size}")
    per_rank = opts.tune_batch_size // rt.world_size
    if per_rank > len(windows):
        raise ValueError(f"reconstruction.tune_batch_size={opts.tune_batch_size} needs {per_rank} windows per "
                         f"process, this one has {len(windows)}; lower it")
    t0 = time.time()
    model, device = job.model, rt.device
    dtype = next(model.parameters()).dtype
    model.to(device)
    modules = dict(model.named_modules())
    layers = {name: ScaledCodesLinear(record, dtype).to(device) for name, record in records.items()}
    originals = {}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        originals[name] = _swap(modules[parent], child, layer)
    vocab = model.get_output_embeddings().weight.shape[0]
    module = ScaleTuning(model, job.layout.blocks_path(model), list(layers.values()), opts.tune_lr, opts.tune_steps,
                         cache_teacher=teacher_cache_fits(windows, vocab))
    data = WindowPairs(windows, final_hidden)
    cpu_linears = contextlib.ExitStack()
    cpu_linears.enter_context(float32_cpu_linears(model))  # the model's own linears (head, any not reconstructed)
    try:
        kl_before = reduce_loss(rt, module.kl_sum(data, per_rank, student_hidden=q_hidden))
        info(f"[hiq] tuning: KL to the full-precision model on the calibration windows {kl_before:.4g}", rt)
        loader = torch.utils.data.DataLoader(data, batch_size=per_rank, shuffle=True, drop_last=True,
                                             generator=torch.Generator().manual_seed(opts.seed + 7919))
        callbacks = [StepProgressBar("End-to-end tuning", opts.tune_steps)] if rt.is_global_zero else []
        with quiet_lightning():
            trainer = L.Trainer(
                accelerator="gpu" if device.type == "cuda" else "cpu",
                devices=[device.index or 0] if device.type == "cuda" else 1,
                max_steps=opts.tune_steps, max_epochs=-1, callbacks=callbacks,
                logger=rt.logger if rt.is_global_zero and rt.logger else False, enable_checkpointing=False,
                enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                log_every_n_steps=min(opts.log_every_n_steps, opts.tune_steps), default_root_dir=str(rt.run.root))
            trainer.fit(module, train_dataloaders=loader)
        model.to(device)  # Trainer.fit's teardown moved the module to the CPU
        if trainer.global_step < opts.tune_steps:
            raise RuntimeError(f"end-to-end tuning stopped after {trainer.global_step} of {opts.tune_steps} steps")
        kl_after = reduce_loss(rt, module.kl_sum(data, per_rank))
        kept = kl_after < kl_before
        scales = {name: (layer.tuned_scales() if kept else {p: records[name][p]["scale"] for p in ("high", "normal")})
                  for name, layer in layers.items()}
    finally:
        cpu_linears.close()
        for name, lin in originals.items():
            parent, _, child = name.rpartition(".")
            _swap(modules[parent], child, lin)
        for p in model.parameters():
            p.requires_grad_(True)
        model.to("cpu")
    seconds = time.time() - t0
    info(f"[hiq] tuning: {opts.tune_steps} steps, KL {kl_before:.4g} -> {kl_after:.4g} "
         + ("(kept)" if kept else "(higher: the block fits' scales are kept)") + f", {seconds:.1f}s", rt)
    rt.log({"tuning/kl_before": kl_before, "tuning/kl_after": kl_after, "tuning/seconds": seconds})
    return {"key": key, "scales": scales, "kl_before": kl_before, "kl_after": kl_after if kept else kl_before,
            "kl_tuned": kl_after, "kept": kept, "steps": opts.tune_steps, "seconds": seconds}


def _install_full(job: Job, records: dict[str, dict]) -> None:
    """Every reconstructed layer of the model gets the dequantised weights of its record."""
    from hiq.quant.hybrid import dequantize_record

    modules = dict(job.model.named_modules())
    with torch.no_grad():
        for name, record in records.items():
            lin = modules[name]
            lin.weight.data = dequantize_record(record).to(device=lin.weight.device, dtype=lin.weight.dtype)


def _export_dequantized(job: Job, target: Path, key: str, options: ExportOptions) -> None:
    from hiq.model import parse_dtype
    from hiq.quant.bits import stored_dtype

    model = job.model
    original = next(model.parameters()).dtype
    dtype = parse_dtype(options.dtype) if options.dtype else stored_dtype(model)  # the source's dtype by default
    with staged_directory(target) as tmp:
        model.to(dtype)
        try:
            model.save_pretrained(tmp)
        finally:
            model.to(original)
        job.tokenizer.save_pretrained(tmp)
        write_manifest(tmp, {
            "key": key, "setting": setting_label(job), "recipe": job.recipe.to_dict(),
            "dtype": str(dtype).removeprefix("torch."),
            "ratios": job.state.ratios.ratios if job.state.ratios is not None else None,
            "note": "weights are dequantised; the packed checkpoint (export.formats: packed) holds the integer "
                    "codes"})


def export_stage(job: Job, options: ExportOptions) -> None:
    """Step 5 (rank 0): the checkpoints of ``export.formats`` — ``packed/`` (deployable, :mod:`hiq.packed`),
    ``model/`` (dequantised) and ``compressed-tensors/`` (single-width runs, :mod:`hiq.compressed`). Each directory
    carries ``hiq.json`` with the key of the weights and is reused while that key holds."""
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
        if fmt == "dequantized":
            _export_dequantized(job, target, key, options)
        else:
            records = block_records(job)
            meta = {"key": key, "setting": setting_label(job), "recipe": job.recipe.to_dict(),
                    "source_model": job.model_name,
                    "ratios": job.state.ratios.ratios if job.state.ratios is not None else None}
            if fmt == "packed":
                from hiq.packed import save_packed

                save_packed(job.model, records, target, tokenizer=job.tokenizer, info=meta)
            else:
                from hiq.compressed import save_compressed_tensors

                save_compressed_tensors(job.model, records, target, tokenizer=job.tokenizer, info=meta)
        job.state.timings[f"export_{fmt}"] = time.time() - t0
        info(f"[hiq] exported {fmt}: {target} ({dir_megabytes(target):.2f} MB)", rt)
    job.state.exports = exports
    job.state.model_dir = exports.get("dequantized")
    rt.barrier("export")


def dir_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def evaluation_stage(job: Job, options: EvaluationOptions) -> None:
    """Step 6: perplexity per dataset and zero-shot accuracy of the model in memory, then ``metrics.json`` (rank 0).

    Each result is kept in ``eval/<name>.json`` and reused while the weights (their key) and the protocol stay.
    """
    from hiq.perplexity import dataset_key, evaluate_dataset

    rt = job.rt
    if rt.is_global_zero:
        weights = job.weights_key()
        job.model.to(rt.device)
        results, eval_seconds = {}, 0.0
        for name in options.datasets:
            name_key = dataset_key(name)
            path = rt.run.evaluation(name_key)
            key = digest({"weights": weights, "dataset": name, "seqlen": options.seqlen,
                          "max_windows": options.max_windows})
            saved = load_if_current(path, key, json_file=True, rt=rt)
            if saved is not None:
                info(f"[hiq] {name}: ppl {saved['ppl']:.3f} (reused {path})", rt)
            else:
                with float32_cpu_linears(job.model):
                    res = evaluate_dataset(job.model, job.tokenizer, name, seqlen=options.seqlen,
                                           max_windows=options.max_windows, batch_size=options.batch_size,
                                           progress=True)
                saved = {**res.to_dict(), "key": key}
                save_json(path, saved, sealed=True)
                info(f"[hiq] {name} ({res.split}): ppl {res.ppl:.3f} [{res.windows} windows, {res.seconds:.1f}s]", rt)
            results[name_key] = saved
            eval_seconds += saved["seconds"]
        zeroshot = _zeroshot(job, options, weights) if options.tasks else None
        if zeroshot is not None:
            eval_seconds += zeroshot["seconds"]
        job.state.timings["evaluation"] = eval_seconds
        metrics = build_metrics(job, results, zeroshot)
        save_json(rt.run.metrics, metrics)
        job.state.metrics = metrics
        logged = {f"eval/{k}_ppl": v["ppl"] for k, v in results.items()}
        if zeroshot is not None:
            logged.update({f"eval/{n}_{r['reported']}": r[r["reported"]] for n, r in zeroshot["tasks"].items()})
            logged["eval/zeroshot_avg"] = zeroshot["average"]
        rt.log(logged)
        summary = ", ".join(f"{k} ppl {v['ppl']:.3f}" for k, v in results.items())
        if zeroshot is not None:
            summary += f", zero-shot average {zeroshot['average']:.4f}"
        info(f"[hiq] {metrics['setting']} at {metrics['avg_bits']:.4f} avg bits: {summary} -> {rt.run.metrics}", rt)
    rt.barrier("evaluation")


# ----------------------------------------------------------------------------------------------------------
# Helpers of the stages


def _need(value, stage: str, producer: str):
    if value is None:
        raise RuntimeError(f"{stage} needs the {producer} stage's result; run the stages in the order of "
                           f"hiq.pipeline.STAGES ({' -> '.join(STAGES)})")
    return value


def _zeroshot(job: Job, options: EvaluationOptions, weights: str) -> dict:
    """lm-eval on the in-memory model; each task's result is kept in ``eval/zeroshot_<task>.json`` and reused
    while the weights, the limit and the lm-eval version stay the same."""
    from hiq.zeroshot import PROTOCOL, REPORTED, evaluate_zeroshot, format_zeroshot, lm_eval_version

    key = digest({"weights": weights, "limit": options.limit, "lm_eval_version": lm_eval_version()})
    saved, missing = {}, []
    for task in options.tasks:
        prev = load_if_current(job.rt.run.evaluation(f"zeroshot_{task}"), key, json_file=True, rt=job.rt)
        if prev is not None:
            saved[task] = prev
        else:
            missing.append(task)
    if missing:
        res = evaluate_zeroshot(job.model, job.tokenizer, missing, limit=options.limit,
                                batch_size=options.zeroshot_batch_size)
        for task in missing:
            saved[task] = {**res["tasks"][task], "seconds": res["seconds"] / len(missing), "key": key}
            save_json(job.rt.run.evaluation(f"zeroshot_{task}"), saved[task], sealed=True)
    tasks = options.tasks
    per_task = {t: {k: v for k, v in saved[t].items() if k not in ("key", "seconds", "checksum")} for t in tasks}
    result = {"tasks": per_task, "average": sum(per_task[t][REPORTED[t]] for t in tasks) / len(tasks),
              "limit": options.limit, "lm_eval_version": lm_eval_version(), "protocol": PROTOCOL,
              "seconds": round(sum(saved[t]["seconds"] for t in tasks), 2)}
    info(f"[hiq] zero-shot: {format_zeroshot(result)}" + ("" if missing else " (reused)"), job.rt)
    return result


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

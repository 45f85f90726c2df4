"""Step 5 of the method: hybrid AdaRound + LWC reconstruction, block by block, each block its own ``Trainer.fit``.

For block b: the full-precision block on the full-precision path's inputs gives the targets; the block with
:class:`hiq.quant.hybrid.HybridLinear` layers (high-impact columns by ``ratios.json`` and the Fisher scores,
AdaRound; the rest LWC) is fitted on the quantized path's inputs (the outputs of blocks 0..b-1 already
quantized) by a ``Trainer.fit`` of :class:`hiq.modules.BlockReconstruction` with :class:`GammaAnnealing`,
gradient clipping, the run's logger and a progress bar. Then rounding is made hard, the integer record
(codes, scales, zeros, permutation) is written to ``blocks/block_XX.pt`` atomically, the block's linears get
the dequantised weights, and its outputs become the next block's inputs.

Resume: a block whose file exists with the same settings (calibration, reconstruction settings and the
ratios of every layer up to this block) is loaded instead of fitted; the result is bit-identical.
Only the block being processed sits on the compute device; the caches stay on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from hiq.artifacts import load_tensors, save_tensors
from hiq.callbacks.annealing import GammaAnnealing, StepProgressBar
from hiq.callbacks.stages import _calibration, _calibration_meta, _log, _run_dir
from hiq.model import (
    BlockInputs,
    block_linears,
    block_outputs,
    capture_block_inputs,
    find_blocks,
    run_block,
    to_device,
)
from hiq.quant.hybrid import HybridLinear, check_record_grid, dequantize_record, record_bits
from hiq.quant.learned import QUANTIZERS
from hiq.quant.mixed import mixed_fake_quant
from hiq.sensitivity import swapped_weights


def _swap(block: torch.nn.Module, name: str, module: torch.nn.Module) -> torch.nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int):
        return self.inputs[i][0], self.targets[i][0]


@torch.no_grad()
def _recon_loss(block, inputs: BlockInputs, targets: list[torch.Tensor], device) -> tuple[float, int]:
    """(sum over tokens of the hidden-summed squared error, token count) on this rank's samples."""
    total, tokens = 0.0, 0
    for i, h in enumerate(inputs.hidden):
        out = run_block(block, h, inputs.kwargs_for(i), device).float()
        total += (out - targets[i].float()).pow(2).sum().item()
        tokens += out.shape[0] * out.shape[1]
    return total, tokens


class ReconstructionCallback(L.Callback):
    """Hybrid block reconstruction (paper Eq. 10-13, Section 4.1).

    Args:
        iterations: optimizer steps per block (paper: 5,000).
        batch_size: calibration windows per step, over all processes (divisible by their number).
        nsamples: calibration windows used (the first ones of the calibration set); null = all.
        lr_round: Adam learning rate of AdaRound's rounding variables V (paper: 1e-3).
        weight_decay_round: their weight decay (paper: 1e-5).
        lr_lwc: Adam learning rate of LWC's clipping logits (OmniQuant's default 1e-2), no weight decay.
        round_weight: λ of AdaRound's regulariser, for a loss summed over the hidden dimension and averaged
            over tokens (AdaRound's 0.01).
        warmup: share of the iterations before the regulariser starts.
        beta_start, beta_end: its exponent β (the paper's γ), annealed linearly after the warm-up.
        high_quantizer: ``adaround`` (the method) or ``lwc`` (ablation: the high-impact part through LWC).
        lwc_init: initial clipping logits (OmniQuant: 4.0, σ(4) = 0.982).
        gradient_clip_val: gradient norm clipping of the block fit (null = off).
        log_every_n_steps: logging interval of the block fits.
        seed: seed of the sample order.
        enabled: run the stage (off: the model stays in full precision).
    """

    def __init__(self, iterations: int = 5000, batch_size: int = 1, nsamples: int | None = None,
                 lr_round: float = 1e-3, weight_decay_round: float = 1e-5, lr_lwc: float = 1e-2,
                 round_weight: float = 0.01, warmup: float = 0.2, beta_start: float = 20.0, beta_end: float = 2.0,
                 high_quantizer: str = "adaround", lwc_init: float = 4.0, gradient_clip_val: float | None = 1.0,
                 log_every_n_steps: int = 25, seed: int = 0, enabled: bool = True):
        self.enabled = enabled
        if iterations < 1:
            raise ValueError(f"iterations={iterations} must be at least 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if nsamples is not None and nsamples < batch_size:
            raise ValueError(f"nsamples={nsamples} is smaller than batch_size={batch_size}")
        if high_quantizer not in QUANTIZERS:
            raise ValueError(f"high_quantizer={high_quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
        for name, value in (("lr_round", lr_round), ("lr_lwc", lr_lwc)):
            if not value > 0:
                raise ValueError(f"{name}={value} must be positive")
        GammaAnnealing(iterations, warmup, beta_start, beta_end)  # validates the schedule
        self.settings = {
            "iterations": iterations, "batch_size": batch_size, "nsamples": nsamples, "lr_round": lr_round,
            "weight_decay_round": weight_decay_round, "lr_lwc": lr_lwc, "round_weight": round_weight,
            "warmup": warmup, "beta_start": beta_start, "beta_end": beta_end, "high_quantizer": high_quantizer,
            "lwc_init": lwc_init, "gradient_clip_val": gradient_clip_val, "seed": seed,
        }
        self.log_every_n_steps = log_every_n_steps

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self.enabled and self.settings["batch_size"] % trainer.world_size:
            raise ValueError(f"batch_size={self.settings['batch_size']} is not divisible by the "
                             f"{trainer.world_size} processes; use a multiple of {trainer.world_size}")

    def _meta(self, trainer, pl_module, ratios: dict[str, float], block: int) -> dict[str, Any]:
        hp = pl_module.hparams
        upstream = {k: v for k, v in ratios.items() if int(k.split(".", 1)[0]) <= block}
        return {**_calibration_meta(trainer, pl_module), "recon": self.settings, "bits_low": hp.bits_low,
                "bits_high": hp.bits_high, "group_size": hp.group_size, "ratios": upstream}

    def _inner_trainer(self, trainer: L.Trainer, device: torch.device, description: str) -> L.Trainer:
        s = self.settings
        callbacks: list[L.Callback] = [GammaAnnealing(s["iterations"], s["warmup"], s["beta_start"], s["beta_end"])]
        if trainer.is_global_zero:
            callbacks.append(StepProgressBar(description, s["iterations"]))
        return L.Trainer(
            accelerator="cuda" if device.type == "cuda" else "cpu",
            devices=[device.index or 0] if device.type == "cuda" else 1,
            max_steps=s["iterations"], max_epochs=-1, logger=trainer.logger if trainer.is_global_zero else False,
            callbacks=callbacks, gradient_clip_val=s["gradient_clip_val"], enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
            log_every_n_steps=min(self.log_every_n_steps, s["iterations"]),
            default_root_dir=trainer.default_root_dir,
        )

    def _fit_block(self, trainer, pl_module, b: int, block, scores, ratios, inputs: BlockInputs,
                   targets: list[torch.Tensor], device) -> dict:
        from hiq.modules import BlockReconstruction

        hp, s = pl_module.hparams, self.settings
        kwargs = inputs.shared_kwargs()
        if kwargs is None:
            raise ValueError("calibration windows give different block arguments (lengths or masks differ); "
                             "block reconstruction needs windows of one length")
        hybrids, originals = [], {}
        for name, lin in block_linears(block):
            full = f"{b}.{name}"
            hybrid = HybridLinear(lin, scores[full], ratios[full], hp.bits_high, hp.bits_low, hp.group_size,
                                  s["high_quantizer"], s["lwc_init"]).to(device)
            originals[name] = _swap(block, name, hybrid)
            hybrids.append((name, hybrid))
        try:
            module = BlockReconstruction(block, [h for _, h in hybrids], to_device(kwargs, device), b, s["lr_round"],
                                         s["weight_decay_round"], s["lr_lwc"], s["round_weight"])
            per_rank = s["batch_size"] // trainer.world_size
            loader = torch.utils.data.DataLoader(
                _PairDataset(inputs.hidden, targets), batch_size=per_rank, shuffle=True, drop_last=True,
                generator=torch.Generator().manual_seed(s["seed"] + b))
            with _quiet_lightning():  # no "GPU available" banner and tips for every block
                inner = self._inner_trainer(trainer, device, f"Block {b + 1}/{len(find_blocks(pl_module.model))}")
                inner.fit(module, train_dataloaders=loader)
            if inner.global_step < s["iterations"]:
                raise RuntimeError(f"block {b}: the fit stopped after {inner.global_step} of {s['iterations']} steps")
            layers = {}
            for name, hybrid in hybrids:
                record = hybrid.finish()
                check_record_grid(record)
                layers[name] = record
        finally:  # the block always gets its own nn.Linear modules back
            for name, lin in originals.items():
                _swap(block, name, lin)
            block.to(device)  # Trainer.fit's teardown moved the module (and this block in it) to the CPU
            block.eval()
        for p in block.parameters():
            p.requires_grad_(True)
        return {"layers": layers, "steps": inner.global_step}

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if not self.enabled:
            return
        scores = pl_module.artifacts.get("fisher")
        solution = pl_module.artifacts.get("ratios")
        if scores is None or solution is None:
            raise RuntimeError("ReconstructionCallback needs Fisher scores and ratios: list FisherCallback and "
                               "RatioSolverCallback before it")
        ratios = solution.ratios
        run = _run_dir(trainer)
        hp, s = pl_module.hparams, self.settings
        model = pl_module.model
        blocks = find_blocks(model)
        device = pl_module.device
        windows = _calibration(trainer, pl_module)
        windows = windows[: s["nsamples"]] if s["nsamples"] else windows
        shard = windows[trainer.global_rank :: trainer.world_size]
        model.to("cpu")
        fp_inputs = capture_block_inputs(model, shard, batch_size=1, device="cpu")
        q_inputs = fp_inputs
        t_all = time.time()
        summary, metas = [], []
        bar = tqdm(range(len(blocks)), desc="Reconstruction", unit="block", disable=not trainer.is_global_zero)
        for b in bar:
            block = blocks[b].to(device)
            targets = block_outputs(block, fp_inputs, device)
            path = run.block(b)
            meta = self._meta(trainer, pl_module, ratios, b)
            saved = load_tensors(path) if path.is_file() else None
            if saved is not None and saved.get("meta") == meta:
                rank_zero_info(f"[hiq] block {b}: reused {path}")
                _install(block, saved["layers"])
                result = saved
            else:
                t0 = time.time()
                loss_rtn = _reduce_loss(trainer, self._rtn_loss(block, b, scores, ratios, hp, q_inputs, targets,
                                                                device))
                fitted = self._fit_block(trainer, pl_module, b, block, scores, ratios, q_inputs, targets, device)
                _install(block, fitted["layers"])
                loss_final = _reduce_loss(trainer, _recon_loss(block, q_inputs, targets, device))
                result = {"layers": fitted["layers"], "meta": meta, "loss_rtn": loss_rtn, "loss_final": loss_final,
                          "steps": fitted["steps"], "seconds": time.time() - t0}
                if trainer.is_global_zero:
                    save_tensors(path, result)
                _log(trainer, {"recon/loss_rtn": loss_rtn, "recon/loss_final": loss_final,
                               "recon/seconds": result["seconds"]}, step=b)
            bits = [record_bits(r) for r in result["layers"].values()]
            summary.append({"block": b, "loss_rtn": result["loss_rtn"], "loss_final": result["loss_final"],
                            "seconds": result["seconds"], "weight_bits": sum(x[0] for x in bits),
                            "storage_bits": sum(x[1] for x in bits),
                            "params": sum(r["perm"].numel() * r["high"]["codes"].shape[0]
                                          for r in result["layers"].values())})
            metas.append({"meta": meta, "loss_final": result["loss_final"]})
            bar.set_postfix(rtn=f"{result['loss_rtn']:.4g}", final=f"{result['loss_final']:.4g}")
            if b + 1 < len(blocks):
                q_out = block_outputs(block, q_inputs, device)
                fp_inputs, q_inputs = fp_inputs.with_hidden(targets), q_inputs.with_hidden(q_out)
            blocks[b].to("cpu")
        bar.close()
        trainer.strategy.barrier("reconstruction")
        pl_module.artifacts["reconstruction"] = summary
        pl_module.artifacts["block_metas"] = metas
        pl_module.artifacts.setdefault("timings", {})["reconstruction"] = sum(r["seconds"] for r in summary)
        rank_zero_info(f"[hiq] reconstruction: {len(blocks)} blocks, {time.time() - t_all:.1f}s this run -> "
                       f"{run.root / 'blocks'}")

    @staticmethod
    def _rtn_loss(block, b, scores, ratios, hp, inputs, targets, device) -> tuple[float, int]:
        """The block's loss with plain RTN on the same column split (the starting point to beat)."""
        swaps = {lin: mixed_fake_quant(lin.weight.data, scores[f"{b}.{name}"], ratios[f"{b}.{name}"],
                                       hp.bits_high, hp.bits_low, hp.group_size).to(lin.weight.dtype)
                 for name, lin in block_linears(block)}
        with swapped_weights(swaps):
            return _recon_loss(block, inputs, targets, device)


@contextlib.contextmanager
def _quiet_lightning():
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _reduce_loss(trainer: L.Trainer, pair: tuple[float, int]) -> float:
    total = torch.tensor([pair[0], float(pair[1])], dtype=torch.float64)
    if trainer.world_size > 1:
        total = trainer.strategy.reduce(total.to(trainer.strategy.root_device), reduce_op="sum").cpu()
    return float(total[0] / total[1])


@torch.no_grad()
def _install(block: torch.nn.Module, layers: dict[str, dict]) -> None:
    """Give the block's linears the dequantised weights of their records (checked against the layer shapes)."""
    linears = dict(block_linears(block))
    missing = sorted(set(linears) - set(layers))
    if missing:
        raise ValueError(f"the block record has no layers {missing}")
    for name, record in layers.items():
        lin = linears[name]
        weight = dequantize_record(record)
        if weight.shape != lin.weight.shape:
            raise ValueError(f"record for {name} has shape {tuple(weight.shape)}, layer {tuple(lin.weight.shape)}")
        lin.weight.data = weight.to(device=lin.weight.device, dtype=lin.weight.dtype)

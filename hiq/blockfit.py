"""One block's reconstruction as a ``Trainer.fit``: swap in hybrid linears, fit, make rounding hard, hand back
the integer records. Pure functions over a block and its cached inputs; the block loop is in
:func:`hiq.pipeline.reconstruction_stage`.

The fit is :class:`BlockReconstruction` (``training_step`` = block reconstruction loss) under its own
``Trainer`` with :class:`hiq.schedules.GammaAnnealing`, gradient clipping, the run's logger and a step progress
bar. Lightning's per-fit banners are silenced; the block is put back on the compute device afterwards
(``Trainer.fit``'s teardown moves the module to the CPU).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys

import lightning as L
import torch

from hiq.model import BlockInputs, run_block, to_device
from hiq.quant.hybrid import HybridLinear
from hiq.quant.mixed import mixed_fake_quant
from hiq.quant.record import LayerRecord
from hiq.schedules import GammaAnnealing, StepProgressBar
from hiq.sensitivity import swapped_weights


def _swap(block: torch.nn.Module, name: str, module: torch.nn.Module) -> torch.nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


class PairDataset(torch.utils.data.Dataset):
    """(quantized-path input, full-precision target) per calibration window."""

    def __init__(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int):
        return self.inputs[i][0], self.targets[i][0]


@contextlib.contextmanager
def quiet_lightning():
    """No "GPU available" banner and tips for every block fit."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@torch.no_grad()
def reconstruction_loss(block, inputs: BlockInputs, targets: list[torch.Tensor], device,
                        outputs: list[torch.Tensor] | None = None) -> tuple[float, int]:
    """(sum over tokens of the hidden-summed squared error, token count) on this rank's samples; the block's outputs
    are appended to ``outputs`` when it is given (as :func:`hiq.model.block_outputs` returns them)."""
    total, tokens = 0.0, 0
    for i, h in enumerate(inputs.hidden):
        raw = run_block(block, h, inputs.kwargs_for(i), device)
        if outputs is not None:
            outputs.append(raw)
        out = raw.float()
        total += (out - targets[i].float()).pow(2).sum().item()
        tokens += out.shape[0] * out.shape[1]
    return total, tokens


def rtn_loss(block, layout, scores: dict, ratios: dict, quant, inputs: BlockInputs, targets,
             device) -> tuple[float, int]:
    """The block's loss with plain RTN on the same column split (the starting point to beat)."""
    swaps = {lin: mixed_fake_quant(lin.weight.data, scores[name], ratios[name], quant.bits_high, quant.bits,
                                   quant.group_size).to(lin.weight.dtype)
             for name, lin in layout.block_linears(block)}
    with swapped_weights(swaps):
        return reconstruction_loss(block, inputs, targets, device)


def reduce_loss(rt, pair: tuple[float, int]) -> float:
    """Mean per-token loss over all ranks from each rank's (sum, count)."""
    total = rt.reduce_sum(torch.tensor([pair[0], float(pair[1])], dtype=torch.float64))
    return float(total[0] / total[1])


@torch.no_grad()
def install_records(block: torch.nn.Module, layout, layers: dict[str, LayerRecord | dict]) -> None:
    """Give the block's linears the dequantised weights of their records (:class:`LayerRecord` or its serialised
    form, as a block file holds it; checked against the layer shapes)."""
    linears = dict(layout.block_linears(block))
    missing = sorted(set(linears) - set(layers))
    if missing:
        raise ValueError(f"the block record has no layers {missing}")
    for name, record in layers.items():
        lin = linears[name]
        weight = LayerRecord.from_dict(record).dequantize()
        shape = (lin.out_features, lin.in_features)  # not lin.weight's: a fit releases it while it runs
        if tuple(weight.shape) != shape:
            raise ValueError(f"record for {name} has shape {tuple(weight.shape)}, layer {shape}")
        lin.weight.data = weight.to(device=lin.weight.device, dtype=lin.weight.dtype)


def trimmed_squared_error(out: torch.Tensor, target: torch.Tensor, trim: float = 0.0) -> torch.Tensor:
    """The squared error summed over the hidden dimension and averaged over tokens, leaving out the largest ``trim``
    share of its elements (``reconstruction.loss_trim``: a few outlier activations' errors would otherwise decide
    every step; AutoRound's ``enable_alg_ext`` leaves out 0.1 %). ``trim=0``: the plain loss."""
    err = (out - target).square()
    tokens = err.numel() // err.shape[-1]
    k = int(trim * err.numel())
    if k == 0:
        return err.sum(-1).mean()
    return (err.sum() - err.reshape(-1).topk(k, sorted=False).values.sum()) / tokens


@torch.no_grad()
def input_moments(block, layout, inputs: BlockInputs, device) -> dict[str, torch.Tensor]:
    """Each of the block's linears' mean squared input per input channel (float32), from one forward pass of the
    full-precision block over ``inputs`` (the quantized path's); under ``torch.distributed`` the sums are added
    over ranks, so every rank starts its fit from the same clipping (``reconstruction.clip_init=search``)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        sums[name] = sums[name] + x.square().sum(0) if name in sums else x.square().sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    handles = [lin.register_forward_pre_hook(functools.partial(hook, name))
               for name, lin in layout.block_linears(block)]
    try:
        for i, hidden in enumerate(inputs.hidden):
            run_block(block, hidden, inputs.kwargs_for(i), device)
    finally:
        for handle in handles:
            handle.remove()
    if _distributed():
        for name in sums:
            total = torch.tensor([float(counts[name])], device=sums[name].device)
            torch.distributed.all_reduce(sums[name])
            torch.distributed.all_reduce(total)
            counts[name] = int(total.item())
    return {name: sums[name] / counts[name] for name in sums}


def block_summary(b: int, result: dict) -> dict:
    """Losses, time, code bits, storage bits and parameter count of a finished block."""
    records = [LayerRecord.from_dict(r) for r in result["layers"].values()]
    bits = [r.bits() for r in records]
    return {"block": b, "loss_rtn": result["loss_rtn"], "loss_final": result["loss_final"],
            "seconds": result["seconds"], "weight_bits": sum(x[0] for x in bits),
            "storage_bits": sum(x[1] for x in bits), "params": sum(r.params for r in records)}


def fit_trainer(rt, max_steps: int, callbacks: list[L.Callback], log_every_n_steps: int,
                gradient_clip_val: float | None = None) -> L.Trainer:
    """The ``Trainer`` of every inner fit (a block's reconstruction, the end-to-end tuning): ``max_steps`` steps on
    the run's compute device, the run's logger on rank 0, no checkpoints, summary or sanity steps."""
    device = rt.device
    return L.Trainer(
        accelerator="cuda" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        max_steps=max_steps, max_epochs=-1, logger=rt.logger if rt.is_global_zero and rt.logger else False,
        callbacks=callbacks, gradient_clip_val=gradient_clip_val, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
        log_every_n_steps=min(log_every_n_steps, max_steps), default_root_dir=str(rt.run.root),
    )


def inner_trainer(rt, opts, description: str) -> L.Trainer:
    """The Trainer of one block fit: max_steps = iterations, annealing, clipping, the run's logger on rank 0."""
    callbacks: list[L.Callback] = [GammaAnnealing(opts.iterations, opts.warmup, opts.beta_start, opts.beta_end)]
    if rt.is_global_zero:
        callbacks.append(StepProgressBar(description, opts.iterations))
    # a signed step only sees each gradient's sign, which scaling the gradient by a clipping factor never changes:
    # clipping SignRound's gradients would cost a norm over every parameter per step for nothing
    signed_only = opts.high_quantizer == opts.normal_quantizer == "signround"
    return fit_trainer(rt, opts.iterations, callbacks, opts.log_every_n_steps,
                       None if signed_only else opts.gradient_clip_val)


def fit_block(block, layout, b: int, scores: dict, ratios: dict, inputs: BlockInputs, targets: list[torch.Tensor],
              quant, opts, rt, description: str) -> tuple[dict[str, LayerRecord], int]:
    """Fit block ``b``'s hybrid linears (``quant``: :class:`hiq.recipe.QuantOptions`, ``opts``:
    :class:`hiq.recipe.ReconstructionOptions`, ``rt``: where it runs, :class:`hiq.pipeline.Runtime`); returns
    ``({linear name: integer record}, optimizer steps)``; the block's linears then hold the records' dequantised
    weights (:func:`install_records`). While the fit runs, the linears' own weights are released: the quantizers
    hold a permuted copy (from which a failed fit puts them back), and the full-precision outputs they gave are the
    targets already.

    The fit's working set (learned offsets, their gradients, the best step's copy: several times the block's weights)
    is freed before this returns. A ``Trainer``, its module and its optimizer refer to each other, so without a
    collection here they would live until Python's cyclic collector happens to run — it counts objects, not bytes —
    and every finished block's working set stayed in memory (issue 26: +3 GiB per 7B-wide block)."""
    import gc

    from hiq.model import release_free_memory

    release_free_memory()  # the fit starts on what the stage before it freed
    try:
        return _fit_block(block, layout, b, scores, ratios, inputs, targets, quant, opts, rt, description)
    finally:
        gc.collect()
        release_free_memory()


def _fit_block(block, layout, b: int, scores: dict, ratios: dict, inputs: BlockInputs, targets: list[torch.Tensor],
               q, opts, rt, description: str) -> tuple[dict[str, dict], int]:
    device = rt.device
    kwargs = inputs.shared_kwargs()
    if kwargs is None:
        raise ValueError("calibration windows give different block arguments (lengths or masks differ); "
                         "block reconstruction needs windows of one length")
    moments = input_moments(block, layout, inputs, device) if opts.clip_init == "search" else None
    hybrids, originals = [], {}
    for name, lin in layout.block_linears(block):
        hybrid = HybridLinear(lin, scores[name], ratios[name], q.bits_high, q.bits, q.group_size,
                              opts.high_quantizer, opts.lwc_init, opts.normal_quantizer).to(device)
        if moments is not None:
            hybrid.init_clip(moments.pop(name))
        originals[name] = _swap(block, name, hybrid)
        hybrids.append((name, hybrid))
        lin.weight.data = torch.empty(0, dtype=lin.weight.dtype, device=lin.weight.device)
    layers = None
    try:
        module = BlockReconstruction(
            block, [h for _, h in hybrids], to_device(kwargs, device), b, opts.lr_round, opts.weight_decay_round,
            opts.lr_lwc, opts.round_weight, lr_signround=opts.lr_signround or 1.0 / opts.iterations,
            lr_schedule=opts.lr_schedule, keep_best=opts.keep_best, iterations=opts.iterations,
            loss_trim=opts.loss_trim)
        loader = torch.utils.data.DataLoader(
            PairDataset(inputs.hidden, targets), batch_size=opts.batch_size // rt.world_size, shuffle=True,
            drop_last=True, generator=torch.Generator().manual_seed(opts.seed + b))
        with quiet_lightning():
            inner = inner_trainer(rt, opts, description)
            inner.fit(module, train_dataloaders=loader)
        if inner.global_step < opts.iterations:
            raise RuntimeError(f"block {b}: the fit stopped after {inner.global_step} of {opts.iterations} steps")
        layers = {}
        for (name, _), finished in zip(hybrids, module.finished_records(), strict=True):
            record = LayerRecord.from_dict(finished)
            record.check_grid()
            layers[name] = record
    finally:  # the block always gets its own nn.Linear modules back, with the records' weights or (failed) its own
        for name, hybrid in hybrids:
            lin = originals[name]
            _swap(block, name, lin)
            if layers is None:
                with torch.no_grad():
                    lin.weight.data = hybrid.source_weight().to(lin.weight.device)
        if layers is not None:
            install_records(block, layout, layers)
        block.to(device)  # Trainer.fit's teardown moved the module (and this block in it) to the CPU
        block.eval()
    for p in block.parameters():
        p.requires_grad_(True)
    if opts.keep_best and rt.is_global_zero:
        print(f"[hiq] block {b}: kept the rounding of step {module.best_step} (batch loss {module.best_loss:.4g})",
              file=sys.stderr, flush=True)
    return layers, inner.global_step


class BlockReconstruction(L.LightningModule):
    """One transformer block's reconstruction (paper Eq. 10), fitted by its own ``Trainer.fit``.

    ``training_step``: the block with its hybrid linears (:class:`hiq.quant.hybrid.HybridLinear`) runs on
    the quantized-path inputs; the loss is the squared error to the full-precision block's outputs, summed
    over the hidden dimension and averaged over tokens, plus ``round_weight`` times AdaRound's regulariser
    (summed over the rounding variables; β and on/off come from :class:`hiq.callbacks.GammaAnnealing`).
    The regulariser weight 0.01 is AdaRound's, tuned for exactly this reduction (per-token summed squared
    error); with a mean over all elements it would have to shrink by the hidden size.

    ``configure_optimizers``: one Adam with the rounding variables at ``lr_round`` / ``weight_decay_round``
    (paper: 1e-3 / 1e-5) and the LWC clipping logits at ``lr_lwc`` without weight decay; or, for SignRound
    parts, :class:`SignSGD` at ``lr_signround`` (AutoRound's ``1 / iterations``). ``lr_schedule="linear"``
    decays every learning rate linearly to 0 over the fit. After each step the parts are projected back into
    their bounds. ``keep_best``: the integer records of the step with the lowest reconstruction loss (of its batch,
    averaged over ranks) are what the fit returns (:meth:`finished_records`), as AutoRound keeps its best step.

    Data parallel without a DDP wrapper: when ``torch.distributed`` is initialised (the outer ``hiq fit``
    runs under DDP) every rank trains on its own shard of samples and gradients are averaged across ranks
    before each step, so all ranks hold the same parameters.

    A non-finite loss on any rank stops the fit with ``FloatingPointError`` naming the block.

    On one process, SignSGD's step is taken per parameter as soon as its gradient is complete in the backward pass
    (``register_post_accumulate_grad_hook``) and the gradient dropped (:attr:`step_in_backward`): the backward then
    holds one layer's gradients at a time instead of the whole block's (4 bytes per weight; 0.75 GiB for a 7B-wide
    block). The parameters move exactly as with the step after the backward (test): a leaf's gradient is complete
    only once every operation that used it has run its backward.
    """

    #: take SignSGD's step inside the backward, one parameter at a time (one process only; see the class doc)
    step_in_backward = True

    def __init__(self, block: torch.nn.Module, hybrids: list, block_kwargs: dict, block_index: int,
                 lr_round: float = 1e-3, weight_decay_round: float = 1e-5, lr_lwc: float = 1e-2,
                 round_weight: float = 0.01, lr_signround: float = 5e-3, lr_schedule: str = "constant",
                 keep_best: bool = False, iterations: int = 1, loss_trim: float = 0.0):
        super().__init__()
        self.loss_trim = loss_trim
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        self.lr_signround, self.lr_schedule, self.keep_best, self.iterations = (lr_signround, lr_schedule,
                                                                                keep_best, iterations)
        self.best_loss, self.best_step, self._best_records = float("inf"), -1, None
        self._log_hyperparams = False  # the run's logger keeps the pipeline's hyperparameters
        self.block = block
        self.hybrids = hybrids  # submodules of ``block`` already
        self.block_kwargs = block_kwargs
        self.block_index = block_index
        self.lr_round, self.weight_decay_round, self.lr_lwc = lr_round, weight_decay_round, lr_lwc
        self.round_weight = round_weight
        self.beta, self.regularize = 20.0, False
        self.last_losses: dict[str, float] = {}
        for p in self.block.parameters():
            p.requires_grad_(False)
        for h in hybrids:
            for p in h.parameters():
                p.requires_grad_(True)

    def _param_groups(self) -> tuple[list, list, list]:
        """(AdaRound rounding variables, LWC clipping logits, SignRound parameters), in layer order."""
        from hiq.quant.learned import AdaRoundQuantizer

        rounding, clipping, signed = [], [], []
        for h in self.hybrids:
            for part in (h.high, h.normal):
                if part.sign_steps:
                    signed += list(part.parameters())
                elif isinstance(part, AdaRoundQuantizer):
                    rounding.append(part.v)
                else:
                    clipping += list(part.parameters())
        return rounding, clipping, signed

    def configure_optimizers(self):
        rounding, clipping, signed = self._param_groups()
        if signed and (rounding or clipping):
            raise ValueError("SignRound on one part and AdaRound/LWC on the other cannot share one optimizer; use "
                             "signround for both reconstruction.high_quantizer and normal_quantizer, or neither")
        if signed:
            optimizer: torch.optim.Optimizer = SignSGD([{"params": signed, "lr": self.lr_signround}])
            if self.step_in_backward and not _distributed():  # DDP averages the whole gradients first
                group = optimizer.param_groups[0]
                self._step_hooks = [p.register_post_accumulate_grad_hook(functools.partial(_sign_step, group))
                                    for p in signed]
        else:
            groups = []
            if rounding:
                groups.append({"params": rounding, "lr": self.lr_round, "weight_decay": self.weight_decay_round})
            if clipping:
                groups.append({"params": clipping, "lr": self.lr_lwc, "weight_decay": 0.0})
            optimizer = torch.optim.Adam(groups)
        if self.lr_schedule == "constant":
            return optimizer
        total = self.iterations
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_end(self) -> None:
        for hook in getattr(self, "_step_hooks", ()):
            hook.remove()
        self._step_hooks = []

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        for h in self.hybrids:
            h.project()

    def finished_records(self) -> list[dict]:
        """Each hybrid's integer record after the fit: the lowest-loss step's (``keep_best``), else the last one's."""
        if self.keep_best and self._best_records is not None:
            return self._best_records
        return [h.finish() for h in self.hybrids]

    def _remember_if_best(self, rec: torch.Tensor) -> None:
        """Keep the integer records of the parameters that produced the lowest batch loss so far (before this step):
        one byte per weight, where a copy of the learned parameters took four (float32 offsets)."""
        loss = rec.detach().clone()
        if _distributed():
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        if loss.item() < self.best_loss:
            self.best_loss, self.best_step = loss.item(), self.global_step
            self._best_records = None  # the old snapshot goes before the new one is made
            self._best_records = [h.record() for h in self.hybrids]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return run_block(self.block, hidden, self.block_kwargs, hidden.device)

    def training_step(self, batch, batch_idx):
        hidden, target = batch
        out = self(hidden).float()
        rec = trimmed_squared_error(out, target.float(), self.loss_trim)
        loss = rec
        reg = torch.zeros((), device=rec.device)
        if self.regularize and self.round_weight > 0:
            reg = sum(h.regularizer(self.beta) for h in self.hybrids)
            loss = rec + self.round_weight * reg
        bad = torch.tensor(float(not torch.isfinite(loss)), device=loss.device)
        if _distributed():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() > 0:
            raise FloatingPointError(
                f"block {self.block_index}: reconstruction loss is {loss.item()} at step {self.global_step} "
                f"(a non-finite value on this or another rank); nothing of this block was saved. Check the "
                f"model's weights for inf/nan or lower lr_lwc / lr_round")
        if self.keep_best:
            self._remember_if_best(rec)
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:  # only the steps the logger writes (self.log is not free)
            name = f"block_{self.block_index:02d}"
            self.log(f"{name}/rec_loss", rec.detach(), prog_bar=False)
            self.log(f"{name}/round_reg", reg.detach(), prog_bar=False)
            self.log(f"{name}/beta", float(self.beta), prog_bar=False)
        self.last_losses = {"rec": rec.item(), "reg": reg.item(), "beta": self.beta}
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        average_gradients(optimizer)


LR_SCHEDULES = ("constant", "linear")


@torch.no_grad()
def _sign_step(group: dict, p: torch.Tensor) -> None:
    """SignSGD's update of one parameter at the learning rate its group has now, then its gradient dropped."""
    p.add_(torch.sign(p.grad), alpha=-group["lr"])
    p.grad = None


class SignSGD(torch.optim.Optimizer):
    """Signed-gradient descent: ``p -= lr · sign(∂L/∂p)`` (SignRound's update; the step size is the same for every
    weight whatever its gradient's scale, so ``lr = 1 / iterations`` moves an offset by at most one grid step)."""

    def __init__(self, params, lr: float = 5e-3):
        if not lr > 0:
            raise ValueError(f"lr={lr} must be positive")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])
        return loss


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Data parallel without a DDP wrapper: each gradient becomes its mean over the ranks (no-op on one process)."""
    if not _distributed():
        return
    world = torch.distributed.get_world_size()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1

"""End-to-end scale tuning after the block fits (stage ``tuning``, ``reconstruction.tune_*``).

The block fits leave each quantized layer as integer codes, zero points and one scale per row (or group) and part.
Each block was fitted alone, to its own full-precision outputs. This stage fits all the scales of all blocks
*together*, to what the model is for: the full-precision model's next-token distributions on the calibration
windows (KL divergence, averaged over tokens). Codes and zero points do not move, so the bits, the grid and the
storage stay exactly those of the block fits; only the fp16 scales change (each ``s = s₀ · exp(u)``, ``u`` from 0,
Adam at ``tune_lr`` decaying linearly to 0, ``tune_steps`` steps of ``tune_batch_size`` windows).

The teacher needs no second model in memory: the block loop already carries the full-precision path, whose last
block's outputs are cached. With the block list cut to the last block and that block's output swapped for the cached
one (:func:`from_final_hidden`), the model's own forward gives the full-precision model's logits for the cost of one
block (the modules after the blocks — final norm, head — are not quantized). The KL before tuning takes the
quantized model's logits the same way, from the quantized path's last outputs, so it runs no block either.

The stage measures the KL on all calibration windows before and after and keeps the tuned scales only when the KL
went down. The fit is a :class:`ScaleTuning` ``LightningModule`` under its own ``Trainer.fit``; under DDP each rank
tunes on its shard of windows and gradients are averaged across ranks before each step.
"""

from __future__ import annotations

import contextlib
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from hiq.blockfit import _distributed, _swap, average_gradients, fit_trainer, quiet_lightning, reduce_loss
from hiq.model import float32_cpu_linears, linear
from hiq.quant.grid import expand_groups, group_widths
from hiq.quant.record import PARTS, LayerRecord


class ScaledCodesLinear(nn.Module):
    """A finished hybrid layer (:meth:`hiq.quant.hybrid.HybridLinear.finish` record) whose scales are trainable:
    ``W = (codes − zero) · s₀ · exp(u)`` per part, columns back in the original order; ``u`` starts at 0, so the
    layer starts as exactly the record's weights.

    The layer holds the record's integer codes (shared with it, 1 byte per weight), never a float copy of its weight:
    the weight is made from the codes at each forward. For layers of :attr:`recompute_from` weights and up, the
    weight and the product are recomputed in the backward (``torch.utils.checkpoint``) instead of being saved, so the
    whole model's backward holds one layer's weight at a time (at 7B width the saved weights and their
    intermediates were 4-6 bytes per weight of the whole model). Same values either way. ``codes_on_host``: the
    codes stay in host memory however the layer is moved and are copied to the device at each use (``model.offload``,
    :mod:`hiq.offload`): the device then holds one layer's codes at a time."""

    #: layers of this many weights and up recompute their weight and product in the backward (see the class doc)
    recompute_from = 1 << 20

    def __init__(self, record: LayerRecord, dtype: torch.dtype = torch.float32, codes_on_host: bool = False):
        super().__init__()
        record = LayerRecord.from_dict(record)
        self.record, self.dtype = record, dtype
        self.host_codes = {name: part.codes for name, _, part in record.parts()} if codes_on_host else None
        self.register_buffer("order", torch.argsort(record.perm), persistent=False)
        self.log_scale = nn.ParameterDict()
        for name, _, part in record.parts():
            if not codes_on_host:
                self.register_buffer(f"{name}_codes", part.codes, persistent=False)
            self.register_buffer(f"{name}_zero", part.zero.float(), persistent=False)
            self.register_buffer(f"{name}_scale", part.scale.float(), persistent=False)
            self.log_scale[name] = nn.Parameter(torch.zeros_like(part.scale, dtype=torch.float32))

    def codes(self, part: str) -> torch.Tensor:
        """The part's codes on the layer's device (a copy from host memory with ``codes_on_host``)."""
        if self.host_codes is None:
            return getattr(self, f"{part}_codes")
        return self.host_codes[part].to(self.order.device, non_blocking=True)

    def scales(self, part: str) -> torch.Tensor:
        return getattr(self, f"{part}_scale") * torch.exp(self.log_scale[part])

    def weight(self) -> torch.Tensor:
        parts = []
        for part in PARTS:
            codes = self.codes(part)
            if codes.shape[1]:  # a layer at ratio 0 or 1 has one empty part
                widths = group_widths(codes.shape[1], self.record.group_size)
                base = (codes.float() - expand_groups(getattr(self, f"{part}_zero"), widths)).to(self.dtype)
                parts.append(base * expand_groups(self.scales(part), widths).to(base.dtype))
        return torch.cat(parts, dim=1)[:, self.order]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight().to(x.dtype))  # float32 arithmetic for bf16/fp16 on CPUs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.record.params >= self.recompute_from:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._product, x, use_reentrant=False, preserve_rng_state=False)
        return self._product(x)

    @torch.no_grad()
    def tuned_scales(self) -> dict[str, torch.Tensor]:
        """Each part's scales, rounded to float16 values (kept as float32) as the block records hold them."""
        return {part: self.scales(part).detach().cpu().to(torch.float16).float() for part in PARTS}


@contextlib.contextmanager
def replaced_output(block: nn.Module, hidden: torch.Tensor):
    """While active, ``block`` returns ``hidden`` (same structure as its own output): the model's forward then
    continues from the full-precision path's cached activations."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (hidden.to(output[0].dtype), *output[1:])
        return hidden.to(output.dtype)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def from_final_hidden(model: nn.Module, blocks_path: str, hidden: torch.Tensor):
    """While active, the model's forward continues from ``hidden`` as the last block's output and runs no other block:
    the block list holds only the last block, whose output is swapped (:func:`replaced_output`). A forward then costs
    the embedding, one block, the final norm and the head — the logits of any model whose last block outputs
    ``hidden``."""
    parent_name, _, attr = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = getattr(parent, attr)
    last = blocks[len(blocks) - 1]
    setattr(parent, attr, nn.ModuleList([last]))
    try:
        with replaced_output(last, hidden):
            yield
    finally:
        setattr(parent, attr, blocks)


def token_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged over every token of the batch."""
    logp = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(logp.flatten(0, -2), teacher_logp.flatten(0, -2), log_target=True, reduction="batchmean")


class WindowPairs(torch.utils.data.Dataset):
    """(window token ids, the full-precision last block's outputs for it)."""

    def __init__(self, windows: torch.Tensor, final_hidden: list[torch.Tensor]):
        if len(windows) != len(final_hidden):
            raise ValueError(f"{len(windows)} windows but {len(final_hidden)} cached outputs")
        self.windows, self.final_hidden = windows, final_hidden

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        return self.windows[i], self.final_hidden[i][0], i


class ScaleTuning(L.LightningModule):
    """``training_step``: the full-precision model's next-token log-probabilities (the model's own forward with the
    last block's output swapped for the cached full-precision one, no gradient), then the quantized model's logits
    on the same windows; the loss is the per-token KL between the two. ``configure_optimizers``: Adam on the log
    scales at ``lr``, decaying linearly to 0 over ``steps``."""

    def __init__(self, model: nn.Module, blocks_path: str, layers: list[ScaledCodesLinear], lr: float,
                 steps: int, cache_teacher: bool = False):
        super().__init__()
        self._log_hyperparams = False
        self.model, self.blocks_path, self.layers = model, blocks_path, layers
        self.lr, self.steps = lr, steps
        #: per window, the teacher's log-probabilities (filled by :meth:`kl_sum`); None = computed every step
        self.teacher_cache: dict[int, torch.Tensor] | None = {} if cache_teacher else None
        self.last_losses: dict[str, float] = {}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for layer in layers:
            for p in layer.parameters():
                p.requires_grad_(True)

    def logits_from(self, ids: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
        """The logits of a model whose last block outputs ``final_hidden`` (one block's forward, no gradient)."""
        with torch.no_grad(), from_final_hidden(self.model, self.blocks_path, final_hidden):
            return self.model(input_ids=ids, use_cache=False).logits

    def teacher_logp(self, ids: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.logits_from(ids, final_hidden).float(), dim=-1)

    def training_step(self, batch, batch_idx):
        ids, final_hidden, index = batch
        if self.teacher_cache:
            teacher = torch.stack([self.teacher_cache[int(i)] for i in index]).to(ids.device)
        else:
            teacher = self.teacher_logp(ids, final_hidden)
        loss = token_kl(self.model(input_ids=ids, use_cache=False).logits, teacher)
        bad = torch.tensor(float(not torch.isfinite(loss)), device=loss.device)
        if _distributed():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() > 0:
            raise FloatingPointError(f"end-to-end tuning: KL is {loss.item()} at step {self.global_step} (a "
                                     f"non-finite value on this or another rank); lower reconstruction.tune_lr or "
                                     f"set reconstruction.tune_steps=0")
        self.last_losses = {"kl": loss.item()}
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            self.log("tuning/kl", loss.detach(), prog_bar=False)
        return loss

    def configure_optimizers(self):
        params = [p for layer in self.layers for p in layer.parameters()]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        total = self.steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        average_gradients(optimizer)

    @torch.no_grad()
    def kl_sum(self, dataset: WindowPairs, batch_size: int,
               student_hidden: list[torch.Tensor] | None = None) -> tuple[float, int]:
        """(sum over this rank's windows of the per-token KL times tokens, token count). ``student_hidden``: the
        quantized model's last-block outputs per window, when known (the reconstruction's quantized path): the
        student's logits then come from them instead of a forward through every block."""
        total, tokens = 0.0, 0
        device = next(self.model.parameters()).device
        for start in range(0, len(dataset), batch_size):
            ids = dataset.windows[start:start + batch_size].to(device)
            hidden = torch.cat(dataset.final_hidden[start:start + batch_size]).to(device)
            rows = range(start, start + ids.shape[0])
            if self.teacher_cache and all(i in self.teacher_cache for i in rows):
                teacher = torch.stack([self.teacher_cache[i] for i in rows]).to(device)
            else:
                teacher = self.teacher_logp(ids, hidden)
                if self.teacher_cache is not None:
                    for i, row in zip(rows, teacher, strict=True):
                        self.teacher_cache[i] = row.cpu()
            if student_hidden is None:
                logits = self.model(input_ids=ids, use_cache=False).logits
            else:
                logits = self.logits_from(ids, torch.cat(student_hidden[start:start + batch_size]).to(device))
            kl = token_kl(logits, teacher)
            n = ids.shape[0] * ids.shape[1]
            total, tokens = total + kl.item() * n, tokens + n
        return total, tokens


#: the teacher's log-probabilities are kept in memory when they take at most this many bytes (the bundled model's
#: 128 windows x 512 tokens x 2,048 entries: 0.5 GiB), else recomputed at every step (one more forward pass)
TEACHER_CACHE_BYTES = 1 << 30


def teacher_cache_fits(windows: torch.Tensor, vocab_size: int, limit: int | None = None) -> bool:
    return windows.numel() * vocab_size * 4 <= (TEACHER_CACHE_BYTES if limit is None else limit)


def finite_or_raise(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"end-to-end tuning: {what} is {value}; set reconstruction.tune_steps=0")
    return value


def tune_scales(model: nn.Module, blocks_path: str, records: dict[str, LayerRecord], windows: torch.Tensor,
                final_hidden: list[torch.Tensor], q_hidden: list[torch.Tensor], opts, rt, key: str) -> dict:
    """Fit the scales of every reconstructed layer (``records``, by full module name) end to end: a
    :class:`ScaleTuning` under its own ``Trainer.fit``. ``windows``: this rank's calibration windows;
    ``final_hidden`` / ``q_hidden``: the last block's outputs for them on the full-precision and on the quantized
    path; ``opts``: :class:`hiq.recipe.ReconstructionOptions`; ``rt``: where it runs (:class:`hiq.pipeline.Runtime`).
    Returns the tuning artifact's content (``key``, the scales per layer, KL before / after, kept or not); the
    model's layers then hold the dequantised weights of the records with the scales it returns."""
    import time

    from hiq.schedules import StepProgressBar, info

    per_rank = opts.tune_batch_size // rt.world_size
    if per_rank > len(windows):
        raise ValueError(f"reconstruction.tune_batch_size={opts.tune_batch_size} needs {per_rank} windows per "
                         f"process, this one has {len(windows)}; lower it")
    t0 = time.time()
    device = rt.device
    dtype = next(model.parameters()).dtype
    modules = dict(model.named_modules())
    layers = {name: ScaledCodesLinear(record, dtype, codes_on_host=rt.offload).to(device)
              for name, record in records.items()}
    originals = {}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        originals[name] = _swap(modules[parent], child, layer)
        # the swapped-out weight is the record's dequantised weight (the block fit installed it); while the codes
        # stand in for it, it is released (an empty tensor of its dtype), and the finished weights written back below
        originals[name].weight.data = torch.empty(0, dtype=originals[name].weight.dtype)
    model.to(device)  # without the swapped-out weights: embedding, norms, head and the layers' scales (and codes)
    scales = None
    vocab = model.get_output_embeddings().weight.shape[0]
    module = ScaleTuning(model, blocks_path, list(layers.values()), opts.tune_lr, opts.tune_steps,
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
            trainer = fit_trainer(rt, opts.tune_steps, callbacks, opts.log_every_n_steps)
            trainer.fit(module, train_dataloaders=loader)
        model.to(device)  # Trainer.fit's teardown moved the module to the CPU
        if trainer.global_step < opts.tune_steps:
            raise RuntimeError(f"end-to-end tuning stopped after {trainer.global_step} of {opts.tune_steps} steps")
        kl_after = reduce_loss(rt, module.kl_sum(data, per_rank))
        kept = kl_after < kl_before
        scales = {name: (layer.tuned_scales() if kept else {p: records[name].part(p).scale for p in PARTS})
                  for name, layer in layers.items()}
    finally:
        cpu_linears.close()
        for name, lin in originals.items():
            parent, _, child = name.rpartition(".")
            _swap(modules[parent], child, lin)
            record = records[name] if scales is None else records[name].with_scales(scales[name])
            with torch.no_grad():  # the tuned weights, or the block fits' again after a failure (on the CPU, where
                lin.weight.data = record.dequantize().to(device="cpu", dtype=lin.weight.dtype)  # model goes next)
        for p in model.parameters():
            p.requires_grad_(True)
        model.to("cpu")
    seconds = time.time() - t0
    info(f"[hiq] tuning: {opts.tune_steps} steps, KL {kl_before:.4g} -> {kl_after:.4g} "
         + ("(kept)" if kept else "(higher: the block fits' scales are kept)") + f", {seconds:.1f}s", rt)
    rt.log({"tuning/kl_before": kl_before, "tuning/kl_after": kl_after, "tuning/seconds": seconds})
    return {"key": key, "scales": scales, "kl_before": kl_before, "kl_after": kl_after if kept else kl_before,
            "kl_tuned": kl_after, "kept": kept, "steps": opts.tune_steps, "seconds": seconds}

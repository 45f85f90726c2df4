"""LightningModules and DataModules.

``HiQPipeline`` holds the Hugging Face model being quantized; the stages of the method run as callbacks on
its ``Trainer.fit`` (``hiq.callbacks``), sharing results through ``pipeline.artifacts`` and the run
directory (``trainer.default_root_dir``). The outer fit has no optimisation loop of its own
(``limit_train_batches=0``): each stage is a pass over calibration data, and block reconstruction runs
its own ``Trainer.fit`` per block.

``CalibrationData`` provides the calibration windows (paper: 128 x 2048 tokens of WikiText-2 train).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from hiq.data import calibration_windows, load_text, tokenize_text
from hiq.model import load_model_and_tokenizer


class HiQPipeline(L.LightningModule):
    """The model under quantization.

    Args:
        model_path: a save_pretrained directory, a hub id, or the bundled name ``tiny-llama``.
        dtype: dtype the model is loaded in (float32 on CPU; bfloat16/float16 on GPUs).
        trust_remote_code: let transformers run code shipped with a hub model (off by default).
        bits_low: b_N, bits of the normal columns (paper: 2 for W2, 3 for W3).
        bits_high: b_H, bits of the high-impact columns (paper: 3 for W2, 4 for W3).
        group_size: input columns per scale/zero group (32, 64, 128) or null for per output channel.
        candidates: candidate high-impact ratios B (paper: 0.02, 0.05, 0.10, 0.15, 0.20).
        target_avg_bits: budget in average weight bits over all block linears (scale/zero overhead not
            included, as the papers print it); must lie in the range the candidates can reach.
    """

    def __init__(
        self,
        model_path: str = "tiny-llama",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        bits_low: int = 2,
        bits_high: int = 3,
        group_size: int | None = None,
        candidates: tuple[float, ...] = (0.02, 0.05, 0.10, 0.15, 0.20),
        target_avg_bits: float = 2.1,
    ):
        super().__init__()
        from hiq.quant.grid import QuantSpec

        QuantSpec(bits_low, group_size)  # validate before loading anything heavy
        QuantSpec(bits_high, group_size)
        if not bits_low < bits_high:
            raise ValueError(f"bits_low={bits_low} must be smaller than bits_high={bits_high}")
        self.save_hyperparameters()
        # Parameters keep requires_grad (DDP refuses to wrap a module without one); no stage runs a backward
        # through the DDP wrapper, so nothing is synchronised behind the stages' backs.
        self.model, self.tokenizer = load_model_and_tokenizer(model_path, dtype, trust_remote_code)
        self.artifacts: dict = {}

    def sensitivity_settings(self):
        from hiq.sensitivity import SensitivitySettings

        hp = self.hparams
        return SensitivitySettings(tuple(float(c) for c in hp.candidates), hp.bits_low, hp.bits_high,
                                   hp.group_size)

    def layer_infos(self):
        """Solver view of the block linears: name, block index, parameter count, in execution order."""
        from hiq.model import all_block_linears
        from hiq.solver import LayerInfo

        return [LayerInfo(name, int(name.split(".", 1)[0]), lin.weight.numel())
                for name, lin in all_block_linears(self.model)]

    def training_step(self, batch, batch_idx):  # pragma: no cover - the outer fit runs no batches
        return None

    def configure_optimizers(self):
        return None


class CalibrationData(L.LightningDataModule):
    """Seeded random windows of a training split (GPTQ/OmniQuant sampling).

    Args:
        dataset: ``wikitext2`` (bundled; its train split is the official <unk> tokens variant), ``c4``
            (bundled sample, documents 1100-1999), a hub id or text/jsonl paths.
        split: split to draw from.
        nsamples: number of windows (paper: 128).
        seqlen: tokens per window; null = min(2048, the model's context).
        seed: sampling seed.
        tokenizer_path: tokenizer to use (linked to the model path by ``hiq fit``).
    """

    def __init__(self, dataset: str = "wikitext2", split: str = "train", nsamples: int = 128,
                 seqlen: int | None = None, seed: int = 0, tokenizer_path: str = "tiny-llama"):
        super().__init__()
        self.save_hyperparameters()
        self._windows: torch.Tensor | None = None

    def windows(self, tokenizer=None, max_context: int | None = None) -> torch.Tensor:
        """All calibration windows, (nsamples, seqlen) int64; identical on every rank."""
        if self._windows is None:
            if tokenizer is None:
                from transformers import AutoTokenizer

                from hiq.model import resolve_model_path

                tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.hparams.tokenizer_path))
            seqlen = self.hparams.seqlen or min(2048, max_context or 2048)
            if max_context is not None and seqlen > max_context:
                raise ValueError(f"data.seqlen={seqlen} exceeds the model's context ({max_context})")
            ids = tokenize_text(tokenizer, load_text(self.hparams.dataset, self.hparams.split))
            self._windows = calibration_windows(ids, self.hparams.nsamples, seqlen, self.hparams.seed)
        return self._windows

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.windows()), batch_size=1)


class BlockReconstruction(L.LightningModule):
    """One transformer block's reconstruction (paper Eq. 10), fitted by its own ``Trainer.fit``.

    ``training_step``: the block with its hybrid linears (:class:`hiq.quant.hybrid.HybridLinear`) runs on
    the quantized-path inputs; the loss is the squared error to the full-precision block's outputs, summed
    over the hidden dimension and averaged over tokens, plus ``round_weight`` times AdaRound's regulariser
    (summed over the rounding variables; β and on/off come from :class:`hiq.callbacks.GammaAnnealing`).
    The regulariser weight 0.01 is AdaRound's, tuned for exactly this reduction (per-token summed squared
    error); with a mean over all elements it would have to shrink by the hidden size.

    ``configure_optimizers``: one Adam with the rounding variables at ``lr_round`` / ``weight_decay_round``
    (paper: 1e-3 / 1e-5) and the LWC clipping logits at ``lr_lwc`` without weight decay.

    Data parallel without a DDP wrapper: when ``torch.distributed`` is initialised (the outer ``hiq fit``
    runs under DDP) every rank trains on its own shard of samples and gradients are averaged across ranks
    before each step, so all ranks hold the same parameters.

    A non-finite loss on any rank stops the fit with ``FloatingPointError`` naming the block.
    """

    def __init__(self, block: torch.nn.Module, hybrids: list, block_kwargs: dict, block_index: int,
                 lr_round: float = 1e-3, weight_decay_round: float = 1e-5, lr_lwc: float = 1e-2,
                 round_weight: float = 0.01):
        super().__init__()
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

    def _param_groups(self) -> tuple[list, list]:
        rounding = [h.high.v for h in self.hybrids if hasattr(h.high, "v")]
        seen = {id(p) for p in rounding}
        clipping = [p for h in self.hybrids for p in h.parameters() if id(p) not in seen]
        return rounding, clipping

    def configure_optimizers(self):
        rounding, clipping = self._param_groups()
        groups = []
        if rounding:
            groups.append({"params": rounding, "lr": self.lr_round, "weight_decay": self.weight_decay_round})
        if clipping:
            groups.append({"params": clipping, "lr": self.lr_lwc, "weight_decay": 0.0})
        return torch.optim.Adam(groups)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from hiq.model import run_block

        return run_block(self.block, hidden, self.block_kwargs, hidden.device)

    def training_step(self, batch, batch_idx):
        hidden, target = batch
        out = self(hidden).float()
        rec = (out - target.float()).pow(2).sum(-1).mean()
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
        name = f"block_{self.block_index:02d}"
        self.log(f"{name}/rec_loss", rec.detach(), prog_bar=False)
        self.log(f"{name}/round_reg", reg.detach(), prog_bar=False)
        self.log(f"{name}/beta", float(self.beta), prog_bar=False)
        self.last_losses = {"rec": rec.item(), "reg": reg.item(), "beta": self.beta}
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
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

"""Perplexity under the GPTQ/OmniQuant protocol, computed with torchmetrics.

Protocol (GPTQ's and OmniQuant's evaluation code; the bundled sets: :mod:`hiq.data`): the split's rows are
joined (WikiText-2 with ``"\\n\\n"``, the C4 sample "c4-new" style with ``" "``), tokenised once, cut into
non-overlapping windows of ``seqlen`` tokens (tail dropped, no extra BOS), each window scored alone; the first
token of a window is never predicted; perplexity = exp(mean token NLL) over all windows. C4 keeps the first
256 windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torchmetrics.text import Perplexity

from hiq.data import eval_windows, load_text, tokenize_text

C4_MAX_WINDOWS = 256
EVAL_SETS = {"wikitext2": "test", "c4": "validation"}


@dataclass
class PerplexityResult:
    dataset: str
    split: str
    ppl: float
    windows: int
    tokens_scored: int
    seconds: float
    note: str = ""

    def to_dict(self) -> dict:
        """The JSON form kept in ``eval/<name>.json`` and printed by ``hiq eval`` (seconds rounded)."""
        return {"dataset": self.dataset, "split": self.split, "ppl": self.ppl, "windows": self.windows,
                "tokens_scored": self.tokens_scored, "seconds": round(self.seconds, 2), "note": self.note}


def dataset_key(name: str) -> str:
    """``wikitext2``/``c4``, or a file's stem: the ``<key>_ppl`` of results and the ``eval/<key>.json`` file."""
    from pathlib import Path

    return name if name in EVAL_SETS else (Path(name).stem or name)


def check_evaluation(options) -> None:
    """Cheap checks of :class:`hiq.recipe.EvaluationOptions` before any model loads: every dataset readable,
    lm-eval installed when zero-shot tasks are asked for."""
    from hiq.zeroshot import lm_eval_version

    for name in options.datasets:
        load_text(name, EVAL_SETS.get(name, "test"))
    if options.tasks:
        lm_eval_version()


def model_max_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@torch.no_grad()
def perplexity(
    model,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = False,
    desc: str = "ppl",
) -> float:
    """exp(mean NLL of tokens 1..seqlen-1 of every window), logits in float64 for the softmax."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # one process scores all windows: no all-gather, even when torch.distributed is initialised (hiq fit on DDP
    # evaluates on rank 0 only; torchmetrics would otherwise wait for the other ranks)
    metric = Perplexity(sync_on_compute=False).to(device)
    metric.total_log_probs = metric.total_log_probs.double()
    iterator = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=desc, unit="batch", leave=False)
    was_training = model.training
    model.eval()
    for start in iterator:
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch).logits
        # torchmetrics' Perplexity does not shift: logits at t predict token t+1.
        metric.update(logits[:, :-1].double(), batch[:, 1:])
    model.train(was_training)
    return float(metric.compute())


def evaluate_dataset(
    model,
    tokenizer,
    dataset: str,
    split: str | None = None,
    seqlen: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on one text set under the protocol above."""
    split = split or EVAL_SETS.get(dataset, "test")
    limit = model_max_length(model)
    seqlen = seqlen or min(2048, limit or 2048)
    if limit is not None and seqlen > limit:
        raise ValueError(f"seqlen={seqlen} exceeds the model's context ({limit}); use seqlen <= {limit}")
    t0 = time.time()
    text_set = load_text(dataset, split)
    ids = tokenize_text(tokenizer, text_set)
    if dataset == "c4":
        max_windows = min(max_windows or C4_MAX_WINDOWS, C4_MAX_WINDOWS)
    windows = eval_windows(ids, seqlen, max_windows)
    ppl = perplexity(model, windows, batch_size=batch_size, progress=progress, desc=f"{dataset} ppl")
    if not math.isfinite(ppl):
        raise FloatingPointError(f"perplexity on {dataset} is {ppl}: the model produces non-finite logits")
    return PerplexityResult(
        dataset, split, ppl, windows.shape[0], windows.shape[0] * (seqlen - 1), time.time() - t0, text_set.note
    )

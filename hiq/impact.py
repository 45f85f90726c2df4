"""Impact scores: the empirical Fisher diagonal of the LM loss, reduced to one score per input column.

F = mean over calibration samples n of g_n**2, with g_n the gradient of sample n's mean token loss alone
(batch size 1 per backward). The score of input column j of a linear layer is the mean of F over the
rows of column j (paper Eq. 4, Figure 1). Gradients are never kept: a post-accumulate hook squares each
weight gradient, reduces it to per-column sums (fp32, then added to a float64 accumulator) and frees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class FisherAccumulator:
    """Per-column sums of squared per-sample gradients for every block linear of a model."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Linear]] | None = None):
        """``layers``: ``(name, linear)`` to score; default: the model's layout (:mod:`hiq.layouts`), keyed by full
        module name."""
        self.model = model
        if layers is None:
            from hiq.layouts import layout_for

            layers = layout_for(model).linears_of(model)
        self.layers = layers
        self.sums = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in self.layers}
        self.rows = {name: lin.out_features for name, lin in self.layers}
        self.samples = 0

    @torch.enable_grad()
    def accumulate(self, windows: Iterable[torch.Tensor], device: torch.device | str | None = None,
                   on_sample: Callable[[], None] | None = None) -> None:
        """One forward+backward per window (1-D token tensor or (1, seqlen)); gradients freed in hooks."""
        device = torch.device(device) if device is not None else next(self.model.parameters()).device
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        handles = []
        try:
            for p in params:
                p.requires_grad_(False)
            for name, lin in self.layers:
                lin.weight.requires_grad_(True)
                handles.append(lin.weight.register_post_accumulate_grad_hook(self._hook(name)))
            for window in windows:
                x = window.reshape(1, -1).to(device)
                loss = self.model(x, labels=x, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite LM loss {loss.item()} in the Fisher pass")
                loss.backward()
                self.samples += 1
                if on_sample is not None:
                    on_sample()
        finally:
            for h in handles:
                h.remove()
            for p, flag in zip(params, flags, strict=True):
                p.grad = None
                p.requires_grad_(flag)

    def _hook(self, name: str):
        acc = self.sums[name]

        def hook(param: torch.Tensor) -> None:
            acc.add_(param.grad.detach().float().pow(2).sum(dim=0).to("cpu", torch.float64))
            param.grad = None

        return hook

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the per-rank accumulators (DDP): ``all_reduce_sum`` maps a tensor to its sum over ranks."""
        names = [n for n, _ in self.layers]
        flat = torch.cat([self.sums[n] for n in names] + [torch.tensor([float(self.samples)], dtype=torch.float64)])
        flat = all_reduce_sum(flat)
        offset = 0
        for n in names:
            size = self.sums[n].numel()
            self.sums[n] = flat[offset : offset + size].clone()
            offset += size
        self.samples = int(round(flat[-1].item()))

    def scores(self) -> dict[str, torch.Tensor]:
        """Mean over samples and rows of g**2 per input column (float32)."""
        if self.samples == 0:
            raise RuntimeError("no calibration sample was accumulated")
        return {n: (s / (self.samples * self.rows[n])).float() for n, s in self.sums.items()}


def fisher_scores(model: nn.Module, windows: torch.Tensor, device: torch.device | str | None = None) -> dict:
    """Convenience: column scores of every block linear from ``windows`` (n, seqlen) on one process."""
    acc = FisherAccumulator(model)
    acc.accumulate(windows, device)
    return acc.scores()

"""Impact scores: the empirical Fisher diagonal of the LM loss, reduced to one score per input column.

F = mean over calibration samples n of g_n**2, with g_n the gradient of sample n's mean token loss alone. The
score of input column j of a linear layer is the mean of F over the rows of column j (paper Eq. 4, Figure 1).

Per-sample gradients without a backward per sample: windows go through the model ``batch_size`` at a time (all of
one length, so the batch loss is the mean of the samples' losses and sample n's share of the output gradient is
``dY_n / B``). A hook on each linear's output gets ``dY`` in the backward pass and forms
``g_n = B · dY_nᵀ X_n`` from the input ``X_n`` its forward hook kept, one sample at a time; the squares are reduced
to per-column sums (fp32, then added to a float64 accumulator) and nothing else is kept. Weight gradients are never
computed (no parameter requires grad; the embedding output does, so the backward reaches every layer). The scores
do not depend on ``batch_size`` beyond float rounding (``tests/test_impact.py`` checks 1 against 8).
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
                   on_sample: Callable[[], None] | None = None, batch_size: int = 1) -> None:
        """Forward+backward over the windows (1-D token tensors or (1, seqlen) rows), ``batch_size`` windows of one
        length per pass (a window of another length starts a new batch); ``on_sample`` is called once per window."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        device = torch.device(device) if device is not None else next(self.model.parameters()).device
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        handles = []
        try:
            for p in params:
                p.requires_grad_(False)
            for name, lin in self.layers:
                handles.append(lin.register_forward_hook(self._hook(name)))
            embed = self.model.get_input_embeddings()
            handles.append(embed.register_forward_hook(lambda module, args, out: out.requires_grad_(True)))
            for batch in _batches(windows, batch_size):
                x = torch.stack(batch).to(device)
                loss = self.model(x, labels=x, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite LM loss {loss.item()} in the Fisher pass")
                loss.backward()
                self.samples += len(batch)
                if on_sample is not None:
                    for _ in batch:
                        on_sample()
        finally:
            for h in handles:
                h.remove()
            for p, flag in zip(params, flags, strict=True):
                p.grad = None
                p.requires_grad_(flag)

    def _hook(self, name: str):
        acc = self.sums[name]

        def forward_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach()
            if not out.requires_grad:
                return

            def backward_hook(dy: torch.Tensor) -> None:
                n = dy.shape[0]  # the batch: sample i's own loss gradient is n * dy[i]
                total = torch.zeros(x.shape[-1], dtype=torch.float32, device=dy.device)
                for i in range(n):
                    g = dy[i].reshape(-1, dy.shape[-1]).float().T @ x[i].reshape(-1, x.shape[-1]).float()
                    total += g.pow(2).sum(dim=0)
                acc.add_((total * float(n * n)).to("cpu", torch.float64))

            out.register_hook(backward_hook)

        return forward_hook

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


def fisher_scores(model: nn.Module, windows: torch.Tensor, device: torch.device | str | None = None,
                  batch_size: int = 1) -> dict:
    """Convenience: column scores of every block linear from ``windows`` (n, seqlen) on one process."""
    acc = FisherAccumulator(model)
    acc.accumulate(windows, device, batch_size=batch_size)
    return acc.scores()


def _batches(windows: Iterable[torch.Tensor], size: int):
    """Lists of up to ``size`` 1-D windows of one length, in order."""
    batch: list[torch.Tensor] = []
    for window in windows:
        w = window.reshape(-1)
        if batch and (len(batch) == size or w.numel() != batch[0].numel()):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch

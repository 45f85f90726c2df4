"""The hybrid linear of block reconstruction: the high-impact columns and the rest each through their own
learnable quantizer (the default recipe: SignRound's learned rounding on both parts; the paper: AdaRound on the
high-impact part and LWC on the rest).

Input columns are permuted so each part is contiguous: ``perm = [high-impact columns by descending impact
score, normal columns in original order]`` (the split of :func:`hiq.quant.mixed.split_columns`, the one M
was measured with). Each part is quantized as its own matrix, so a scale/zero group never mixes bit widths.
``finish()`` turns the layer into what export needs — integer codes, scales, zeros and the permutation
(:class:`hiq.quant.record.LayerRecord`) — and :meth:`~hiq.quant.record.LayerRecord.dequantize` rebuilds the weight
in original column order:
the finished layer's weight with its scales rounded to float16 values (what the packed checkpoint stores; the
block's linears get exactly this weight, so what is evaluated is what is deployed).
"""

from __future__ import annotations

import torch
from torch import nn

from hiq.model import linear
from hiq.quant.learned import QUANTIZERS, LWCQuantizer
from hiq.quant.mixed import split_columns
from hiq.quant.record import LayerRecord, PartCodes


class HybridLinear(nn.Module):
    """Drop-in replacement for an ``nn.Linear`` during reconstruction (the original weight stays frozen).

    Args:
        linear: the full-precision layer.
        scores: one impact score per input column.
        ratio: share of input columns that are high-impact (``floor(ratio * in_features)`` columns).
        bits_high, bits_low: b_H and b_N.
        group_size: columns per scale/zero group, or None for one per row (and part).
        high_quantizer, normal_quantizer: the learned quantizer of each part, one of
            :data:`hiq.quant.learned.QUANTIZERS` (``signround``: the default recipe on both parts; the paper:
            ``adaround`` for the high-impact part, ``lwc`` for the rest).
        lwc_init: initial clipping logits of LWC.
    """

    def __init__(self, linear: nn.Linear, scores: torch.Tensor, ratio: float, bits_high: int, bits_low: int,
                 group_size: int | None, high_quantizer: str = "adaround", lwc_init: float = 4.0,
                 normal_quantizer: str = "lwc"):
        super().__init__()
        for name, value in (("high_quantizer", high_quantizer), ("normal_quantizer", normal_quantizer)):
            if value not in QUANTIZERS:
                raise ValueError(f"{name}={value!r}; choose one of {', '.join(QUANTIZERS)}")
        weight = linear.weight.detach()
        if scores.numel() != weight.shape[1]:
            raise ValueError(f"{scores.numel()} column scores for a weight with {weight.shape[1]} input columns")
        high, normal = split_columns(scores.cpu(), ratio)
        perm = torch.cat([high, normal]).to(weight.device)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse", torch.argsort(perm))
        self.n_high = int(high.numel())
        self.ratio = float(ratio)
        self.group_size = group_size
        self.bits_high, self.bits_low = bits_high, bits_low
        self.high_quantizer, self.normal_quantizer = high_quantizer, normal_quantizer
        wp = weight[:, perm]  # its own dtype: the quantizers promote it to float32 exactly

        def part(kind: str, w: torch.Tensor, bits: int):
            cls = QUANTIZERS[kind]
            return cls(w, bits, group_size, **({"init": lwc_init} if cls is LWCQuantizer else {}))

        self.high = part(high_quantizer, wp[:, : self.n_high], bits_high)
        self.normal = part(normal_quantizer, wp[:, self.n_high :], bits_low)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = weight.dtype

    @torch.no_grad()
    def init_clip(self, importance: torch.Tensor) -> None:
        """Each SignRound part's clipping starts at its input-weighted best round-to-nearest grid
        (:meth:`hiq.quant.learned.SignRoundQuantizer.init_clip`); ``importance``: the layer's mean squared input per
        input column, in original order."""
        if importance.numel() != self.in_features:
            raise ValueError(f"{importance.numel()} column importances for a layer with {self.in_features} inputs")
        imp = importance.to(self.perm.device)[self.perm]
        for part, cols in ((self.high, imp[: self.n_high]), (self.normal, imp[self.n_high :])):
            if not hasattr(part, "init_clip"):
                raise ValueError(f"reconstruction.clip_init=search needs SignRound parts, not {type(part).__name__}")
            part.init_clip(cols)

    def source_weight(self) -> torch.Tensor:
        """The full-precision weight this layer was made from (its dtype, original column order), from the
        quantizers' permuted copies."""
        return torch.cat([self.high.weight, self.normal.weight], dim=1)[:, self.inverse].to(self.out_dtype)

    def quantized_weight(self) -> torch.Tensor:
        """Fake-quantized weight in original column order (float32)."""
        return self._join(self.high() if self.n_high else None, self.normal())

    def _join(self, high: torch.Tensor | None, normal: torch.Tensor) -> torch.Tensor:
        """The two parts' (rows of) weights in original column order."""
        if self.n_high == 0:  # perm is the identity: no concatenation or gather per step
            return normal
        return torch.cat([high, normal], dim=1)[:, self.inverse]

    #: weights from which the fake-quantized weight is recomputed in the backward pass instead of keeping its
    #: intermediates (``torch.utils.checkpoint``): at 7B width they were ~20 bytes per weight of the whole block held
    #: from forward to backward; recomputed, the backward holds one layer's at a time. Same bits either way.
    recompute_from = 1 << 20
    #: weights recomputed together in the backward: the weight is made in chunks of whole rows of about this many
    #: weights, each recomputed on its own, so the backward's intermediates (31 bytes per weight of the layer when
    #: recomputed whole, 1.3 GiB for one 11008 x 4096 layer of a 7B model; 8.8 chunked, and 2.2x faster:
    #: benchmarks/layer_backward_memory.py, issue 26) exist for one chunk at a time. Rows are independent (every
    #: quantizer is row-local), so the chunks are bit for bit the rows of the whole weight (gradients too, but for
    #: AdaRound's sigmoid: 1 ulp where a chunk edge moves the vector loop's tail).
    recompute_rows_of = 1 << 21

    def _weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        return self.quantized_weight().to(dtype)

    def _rows_as(self, dtype: torch.dtype, names: tuple[list[str], list[str]], *tensors: torch.Tensor) -> torch.Tensor:
        """Rows of the weight in ``dtype`` from the same rows of each part's :meth:`row_tensors` (``names``: their
        keys, high part first, then the normal part's; ``tensors``: their values in that order)."""
        n = len(names[0])
        high = self.high.forward_rows(dict(zip(names[0], tensors[:n], strict=True))) if self.n_high else None
        normal = self.normal.forward_rows(dict(zip(names[1], tensors[n:], strict=True)))
        return self._join(high, normal).to(dtype)

    def _recomputed_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``, each chunk of rows recomputed in the backward (:attr:`recompute_rows_of`). The
        parameters are split outside the checkpoints, so their gradients are joined once (not one full-size
        tensor per chunk)."""
        from torch.utils.checkpoint import checkpoint

        rows = max(1, self.recompute_rows_of // max(self.in_features, 1))
        tables = (self.high.row_tensors(), self.normal.row_tensors())
        names = (list(tables[0]), list(tables[1]))
        splits = [t.split(rows) for table in tables for t in table.values()]
        chunks = [checkpoint(self._rows_as, dtype, names, *(split[i] for split in splits), use_reentrant=False,
                             preserve_rng_state=False) for i in range(len(splits[0]))]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and self.in_features * self.out_features >= self.recompute_from:
            weight = self._recomputed_weight(x.dtype)
        else:
            weight = self._weight_as(x.dtype)
        return linear(x, weight, bias)  # float32 arithmetic for bf16/fp16 on CPUs (hiq.model.linear)

    def regularizer(self, beta: float) -> torch.Tensor:
        return self.high.regularizer(beta) + self.normal.regularizer(beta)

    @torch.no_grad()
    def project(self) -> None:
        """Both parts back inside their parameter bounds (after an optimizer step)."""
        self.high.project()
        self.normal.project()

    def finish(self) -> LayerRecord:
        """Hard rounding; the integer record of the layer (:class:`LayerRecord`). Scales are rounded to
        float16 values (kept as float32): the weights evaluated here are exactly those a packed checkpoint holds
        (:mod:`hiq.packed`)."""
        return self._layer_record(self.high.finish(), self.normal.finish())

    def record(self) -> LayerRecord:
        """What :meth:`finish` returns for the layer as it is now, without changing it (the best step's snapshot of
        ``keep_best``: codes are one byte per weight, a copy of the learned parameters four)."""
        return self._layer_record(self.high.record(), self.normal.record())

    def _layer_record(self, high: dict, normal: dict) -> LayerRecord:
        return LayerRecord(self.perm.cpu(), self.n_high, self.ratio, self.group_size, self.bits_high, self.bits_low,
                           self.high_quantizer, self.normal_quantizer, _half_scales(high), _half_scales(normal))


#: Version of the finished-layer record (part of every block's cache key): 2 = float16-valued scales.
RECORD_FORMAT = 2


def _half_scales(part: dict) -> PartCodes:
    codes = {k: v.cpu() for k, v in part.items()}
    return PartCodes(codes["codes"], codes["scale"].to(torch.float16).float(), codes["zero"])

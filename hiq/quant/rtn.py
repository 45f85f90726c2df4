"""Round-to-nearest (RTN) quantization of every block linear of a model: the first, calibration-free baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hiq.quant.bits import average_bits
from hiq.quant.grid import QuantSpec, SpecLike, as_spec, check_shape, dequantize, rtn


@dataclass
class LayerQuantRecord:
    name: str
    out_features: int
    in_features: int
    bits: int
    group_size: int | None
    avg_bits: float
    max_abs_error: float

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@torch.no_grad()
def quantize_model_rtn(
    model: nn.Module, spec: SpecLike, convention: str = "storage"
) -> list[LayerQuantRecord]:
    """Replace every block linear's weight by its RTN fake-quantised (dequantised) value, in place.

    Embeddings, norms and the LM head stay in full precision (the field's convention for weight-only PTQ).
    Every layer's shape is checked against the spec before any weight is touched.
    """
    from hiq.layouts import layout_for

    qs: QuantSpec = as_spec(spec)
    layers = layout_for(model).linears_of(model)
    for name, lin in layers:
        try:
            check_shape(lin.weight, qs)
        except ValueError as err:
            raise ValueError(f"layer {name}: {err}") from err
    records = []
    for name, lin in layers:
        w = lin.weight.data
        codes, scale, zero = rtn(w, qs)
        w_hat = dequantize(codes, scale, zero, qs, dtype=w.dtype)
        records.append(LayerQuantRecord(
            name, w.shape[0], w.shape[1], qs.bits, qs.group_size,
            average_bits(qs.bits, qs.group_size, w.shape[1], convention=convention),
            float((w_hat.float() - w.float()).abs().max()),
        ))
        w.copy_(w_hat)
    return records

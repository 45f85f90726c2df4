"""The finished layer of block reconstruction as a typed record: what export, tuning and the packed format read.

A :class:`LayerRecord` is one reconstructed linear: its input columns permuted so the high-impact ones come first
(``perm``), and each part (``high`` at ``bits_high``, ``normal`` at ``bits_low``) as integer codes with a scale and a
zero point per row and group (:class:`PartCodes`). Its serialised form (:meth:`LayerRecord.to_dict`, what
``blocks/block_XX.safetensors`` holds under ``layers/<name>/...``) is the dict the block fits have always written,
so block files and their resume keys stay valid; :meth:`LayerRecord.from_dict` reads it back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from hiq.quant.grid import dequantize_part

#: The two parts of a hybrid layer, in column order after the permutation.
PARTS = ("high", "normal")


@dataclass(frozen=True)
class PartCodes:
    """One part of a layer: integer ``codes`` ``(out, columns)``, ``scale`` and ``zero`` ``(out, groups)``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @property
    def columns(self) -> int:
        return int(self.codes.shape[1])

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scale": self.scale, "zero": self.zero}

    @classmethod
    def from_dict(cls, d: dict) -> PartCodes:
        return cls(d["codes"], d["scale"], d["zero"])


@dataclass(frozen=True)
class LayerRecord:
    """A finished hybrid linear (:meth:`hiq.quant.hybrid.HybridLinear.finish`).

    Attributes:
        perm: the column order of the parts: high-impact columns by descending score, then the rest in order.
        n_high: how many columns are high-impact (the ``high`` part's width).
        ratio: the allocator's high-impact ratio for this layer.
        group_size: columns per scale/zero group, or None for one per row (and part).
        bits_high, bits_low: code bits of the high and the normal part.
        high_quantizer, normal_quantizer: the learned rounding each part was fitted with.
        high, normal: the parts' codes, scales and zero points.
    """

    perm: torch.Tensor
    n_high: int
    ratio: float
    group_size: int | None
    bits_high: int
    bits_low: int
    high_quantizer: str
    normal_quantizer: str
    high: PartCodes
    normal: PartCodes

    # -- shape and bits

    @property
    def out_features(self) -> int:
        return int(self.high.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.perm.numel())

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    def parts(self) -> Iterator[tuple[str, int, PartCodes]]:
        """``(name, bits, part)`` for ``high`` then ``normal``."""
        yield "high", self.bits_high, self.high
        yield "normal", self.bits_low, self.normal

    def part(self, name: str) -> PartCodes:
        if name not in PARTS:
            raise KeyError(f"a layer record has parts {PARTS}, not {name!r}")
        return self.high if name == "high" else self.normal

    def bits(self, scale_bits: int = 16) -> tuple[int, int]:
        """``(code bits, storage bits)``: codes only; codes plus an fp16 scale and a b-bit zero per row and group
        of each part (the ``storage`` rule of :mod:`hiq.quant.bits`)."""
        weight_bits = storage = 0
        for _, bits, part in self.parts():
            weight_bits += part.codes.numel() * bits
            storage += part.codes.numel() * bits + part.scale.numel() * (scale_bits + bits)
        return weight_bits, storage

    # -- the weight

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``(out, in)`` in original column order."""
        parts = [dequantize_part(p.codes, p.scale, p.zero, self.group_size) for _, _, p in self.parts()]
        return torch.cat(parts, dim=1)[:, torch.argsort(self.perm)]

    def with_scales(self, scales: dict[str, torch.Tensor]) -> LayerRecord:
        """A copy with other scales (``{"high": ..., "normal": ...}``, same shapes; codes, zeros, permutation
        shared): the end-to-end tuning's result."""
        for name, _, part in self.parts():
            if tuple(scales[name].shape) != tuple(part.scale.shape):
                raise ValueError(f"tuned {name} scales have shape {tuple(scales[name].shape)}, the record "
                                 f"{tuple(part.scale.shape)}")
        return replace(self, high=replace(self.high, scale=scales["high"].float()),
                       normal=replace(self.normal, scale=scales["normal"].float()))

    def check_grid(self) -> None:
        """Every code within its part's ``2^b`` levels and zero points integral in range (``ValueError``)."""
        for name, bits, part in self.parts():
            qmax = (1 << bits) - 1
            if part.codes.numel() and int(part.codes.max()) > qmax:
                raise ValueError(f"{name} codes reach {int(part.codes.max())} > {qmax} for {bits} bits")
            zero = part.zero
            if zero.numel() and (zero.min() < 0 or zero.max() > qmax or not torch.equal(zero, zero.round())):
                raise ValueError(f"{name} zero points are not integers in [0, {qmax}]")

    # -- serialised form (block files)

    def to_dict(self) -> dict:
        return {"perm": self.perm, "n_high": self.n_high, "ratio": self.ratio, "group_size": self.group_size,
                "bits_high": self.bits_high, "bits_low": self.bits_low, "high_quantizer": self.high_quantizer,
                "normal_quantizer": self.normal_quantizer, "high": self.high.to_dict(),
                "normal": self.normal.to_dict()}

    @classmethod
    def from_dict(cls, d: dict | LayerRecord) -> LayerRecord:
        """A record from its serialised form (a record passes through unchanged)."""
        if isinstance(d, LayerRecord):
            return d
        group_size = d["group_size"]
        return cls(d["perm"], int(d["n_high"]), float(d["ratio"]), None if group_size is None else int(group_size),
                   int(d["bits_high"]), int(d["bits_low"]), str(d["high_quantizer"]), str(d["normal_quantizer"]),
                   PartCodes.from_dict(d["high"]), PartCodes.from_dict(d["normal"]))

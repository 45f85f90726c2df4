"""Learnable fake quantizers for block reconstruction: LWC and AdaRound (the paper's pair: LWC on the normal
columns, AdaRound on the high-impact ones) and SignRound (learned rounding of every weight, either part).

Both work on a column block of a weight matrix, ``(out_features, n_columns)``, cut into groups of
``group_size`` consecutive columns (the last group may be shorter: it gets its own scale and zero) or one
group per row (``group_size=None``). Their parameters are per row and group; the weight itself is frozen.
Both grids are asymmetric with an integer zero point in ``[0, 2^b - 1]`` and always contain 0, like
:func:`hiq.quant.grid.minmax_params`.

**LWC** (OmniQuant's learnable weight clipping, paper Eq. 13):
``hi = σ(a)·max(max W, 0)``, ``lo = σ(b)·min(min W, 0)``, ``s = (hi − lo)/(2^b − 1)``, ``z = round(−lo/s)``,
``Ŵ = s·(clamp(round(W/s) + z, 0, 2^b − 1) − z)`` with straight-through rounding, so gradients reach the
clipping logits ``a, b`` (initialised to 4.0 as OmniQuant does: σ(4) ≈ 0.982 of the range is kept).

**AdaRound** (paper Eq. 11-12): min-max scale and zero fixed, ``Ŵ = s·(clamp(⌊W/s⌋ + h(V) + z, 0, 2^b − 1) − z)``
with the rectified sigmoid ``h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)``, ζ = 1.1, γ = −0.1, ``V`` initialised so
that ``h(V)`` equals the fractional part of ``W/s`` (the soft quantizer starts at the full-precision weight).
The regulariser ``Σ (1 − |2h(V) − 1|^β)`` pushes every ``h`` to 0 or 1; at the end rounding is hard
(``h = 1[V ≥ 0]``).

``finish()`` of either returns integer codes, scales and zero points whose dequantisation
(:func:`hiq.quant.grid.dequantize_part`) is bit-identical to the quantizer's hard forward.
"""

from __future__ import annotations

import torch
from torch import nn

from hiq.quant.grid import (
    check_bits,
    expand_groups,
    group_range,
    group_widths,
    scale_zero,
    weighted_clip_search,
)

ZETA = 1.1
GAMMA = -0.1
LWC_INIT = 4.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (x.round() - x).detach() + x


class _PartQuantizer(nn.Module):
    def __init__(self, weight: torch.Tensor, bits: int, group_size: int | None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D column block, got shape {tuple(weight.shape)}")
        self.bits = check_bits(bits)
        self.qmax = (1 << bits) - 1
        self.group_size = group_size
        self.widths = group_widths(weight.shape[1], group_size)
        # kept in its own dtype (a bf16 model: half the bytes of a float32 copy); every use promotes it to float32
        # exactly (bf16/fp16 -> fp32 is lossless), so the quantizer computes the same bits either way
        keep = weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
        self.register_buffer("weight", weight.detach().clone() if keep else weight.detach().float())

    #: trained with signed-gradient steps (SignRound) rather than Adam
    sign_steps = False

    def record(self) -> dict:
        """What :meth:`finish` returns, without changing the quantizer (a snapshot during the fit)."""
        return self.finish()

    @torch.no_grad()
    def project(self) -> None:
        """Put the learnt parameters back inside their bounds after an optimizer step (no bounds by default)."""

    def _register_range(self) -> None:
        """Buffers ``lo``/``hi``: per row and group min(min W, 0) / max(max W, 0), the range clipping scales."""
        lo, hi = group_range(self.weight, self.widths) if self.widths else (self.weight.new_zeros(
            self.weight.shape[0], 0, dtype=torch.float32),) * 2
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)

    def _empty_record(self) -> dict:
        """The integer record of a part with no columns."""
        empty = self.weight.new_zeros(self.weight.shape[0], 0, dtype=torch.float32)
        return {"codes": empty.to(torch.uint8), "scale": empty, "zero": empty}

    @property
    def n_columns(self) -> int:
        return self.weight.shape[1]

    #: names of the tensors (parameters and buffers, each with one entry per output row on dim 0) from which
    #: :meth:`forward_rows` computes the fake-quantized weight
    ROW_TENSORS: tuple[str, ...] = ("weight",)

    def row_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of :attr:`ROW_TENSORS` by name: every row of the fake-quantized weight depends on that row of
        each of them only."""
        return {name: getattr(self, name) for name in self.ROW_TENSORS}

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight, float32 ``(out_features, n_columns)``."""
        return self.forward_rows(self.row_tensors())

    def forward_rows(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fake-quantized weight of the rows that ``t`` (:meth:`row_tensors`, or the same rows of each) holds;
        row-local, so the rows computed in chunks are bit for bit the rows of the whole (what
        :class:`hiq.quant.hybrid.HybridLinear` recomputes in its backward)."""
        raise NotImplementedError

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        return expand_groups(t, self.widths)


class LWCQuantizer(_PartQuantizer):
    """Learnable weight clipping for a column block; parameters ``upper``/``lower`` logits per row and group."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int | None, init: float = LWC_INIT):
        super().__init__(weight, bits, group_size)
        n_groups = len(self.widths)
        self._register_range()
        self.upper = nn.Parameter(torch.full((weight.shape[0], n_groups), float(init)))
        self.lower = nn.Parameter(torch.full((weight.shape[0], n_groups), float(init)))

    ROW_TENSORS = ("weight", "lo", "hi", "upper", "lower")

    def _params(self, ste: bool, t: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = t or self.row_tensors()
        hi = torch.sigmoid(t["upper"]) * t["hi"]
        lo = torch.sigmoid(t["lower"]) * t["lo"]
        return scale_zero(lo, hi, self.qmax, round_ste if ste else torch.round)

    def forward_rows(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.n_columns == 0:
            return t["weight"].float()
        scale, zero = self._params(True, t)
        s, z = self._expand(scale), self._expand(zero)
        codes = (round_ste(t["weight"] / s) + z).clamp(0, self.qmax)
        return (codes - z) * s

    @torch.no_grad()
    def finish(self) -> dict:
        """Integer codes (uint8), scale and zero (float32 per row and group) of the learnt clipping."""
        if self.n_columns == 0:
            return self._empty_record()
        scale, zero = self._params(ste=False)
        codes = (torch.round(self.weight / self._expand(scale)) + self._expand(zero)).clamp(0, self.qmax)
        return {"codes": codes.to(torch.uint8), "scale": scale.detach().clone(), "zero": zero.detach().clone()}

    def regularizer(self, beta: float) -> torch.Tensor:
        return self.weight.new_zeros((), dtype=torch.float32)


class AdaRoundQuantizer(_PartQuantizer):
    """Learnable up/down rounding (``V`` per weight) on a fixed min-max grid for a column block."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int | None):
        super().__init__(weight, bits, group_size)
        if self.widths:
            scale, zero = scale_zero(*group_range(self.weight, self.widths), self.qmax)
        else:
            scale = zero = weight.new_zeros(weight.shape[0], 0).float()
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.hard = False
        if self.n_columns:
            x = self.weight / self._expand(scale)
            frac = (x - torch.floor(x)).clamp(0.0, 1.0 - 1e-6)
            v = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)
        else:
            v = self.weight.float()
        self.v = nn.Parameter(v)

    ROW_TENSORS = ("weight", "scale", "zero", "v")

    def rounding(self, v: torch.Tensor | None = None) -> torch.Tensor:
        """h(V) in [0, 1] (soft), or exactly 0/1 once ``hard`` is set (``v``: these rows of ``V``; all by default)."""
        v = self.v if v is None else v
        if self.hard:
            return (v >= 0).float()
        return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def forward_rows(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.n_columns == 0:
            return t["weight"].float()
        s, z = self._expand(t["scale"]), self._expand(t["zero"])
        codes = (torch.floor(t["weight"] / s) + self.rounding(t["v"]) + z).clamp(0, self.qmax)
        return (codes - z) * s

    def regularizer(self, beta: float) -> torch.Tensor:
        """``Σ (1 − |2h(V) − 1|^β)``: 0 when every weight is rounded hard, ``n`` when all sit half-way."""
        if self.n_columns == 0:
            return self.weight.new_zeros((), dtype=torch.float32)
        return (1.0 - (2.0 * self.rounding() - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def finish(self) -> dict:
        self.hard = True
        return self.record()

    @torch.no_grad()
    def record(self) -> dict:
        """Codes with hard rounding (``h(V) = [V >= 0]``), scale and zero; the quantizer itself stays as it is."""
        if self.n_columns == 0:
            return self._empty_record()
        s, z = self._expand(self.scale), self._expand(self.zero)
        codes = (torch.floor(self.weight / s) + (self.v >= 0).float() + z).clamp(0, self.qmax)
        return {"codes": codes.to(torch.uint8), "scale": self.scale.clone(), "zero": self.zero.clone()}


class SignRoundQuantizer(_PartQuantizer):
    """Learned rounding of every weight plus learned min/max clipping, hard from the first step (the quantizer of
    SignRound / AutoRound, arXiv 2309.05516, written from the paper's description).

    ``lo' = min_scale · min(min W, 0)``, ``hi' = max_scale · max(max W, 0)`` per row and group, ``s, z`` from
    ``[lo', hi']`` (:func:`hiq.quant.grid.scale_zero`, straight-through zero point), and
    ``Ŵ = s·(clamp(round_ste(W/s + V) + z, 0, 2^b − 1) − z)``: the forward is always the hard quantized weight,
    gradients reach the per-weight offset ``V`` (kept in [−0.5, 0.5]: at most one grid step from nearest) and the
    clipping multipliers (kept in [0, 1], initialised to 1 = min-max) through the straight-through estimator.
    It is trained by signed-gradient steps (:class:`hiq.blockfit.SignSGD`); :meth:`project` keeps the bounds.
    """

    sign_steps = True  # trained with signed-gradient steps, not Adam

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int | None):
        super().__init__(weight, bits, group_size)
        n_groups = len(self.widths)
        self._register_range()
        self.offset = nn.Parameter(torch.zeros_like(self.weight, dtype=torch.float32))
        self.min_scale = nn.Parameter(torch.ones(weight.shape[0], n_groups))
        self.max_scale = nn.Parameter(torch.ones(weight.shape[0], n_groups))

    ROW_TENSORS = ("weight", "lo", "hi", "offset", "min_scale", "max_scale")

    def _params(self, ste: bool, t: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = t or self.row_tensors()
        return scale_zero(t["lo"] * t["min_scale"], t["hi"] * t["max_scale"], self.qmax,
                          round_ste if ste else torch.round)

    def forward_rows(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.n_columns == 0:
            return t["weight"].float()
        scale, zero = self._params(True, t)
        s, z = self._expand(scale), self._expand(zero)
        codes = (round_ste(t["weight"] / s + t["offset"]) + z).clamp(0, self.qmax)
        return (codes - z) * s

    @torch.no_grad()
    def init_clip(self, importance: torch.Tensor) -> None:
        """Start the clipping multipliers (both ends alike) at the factor of each row and group whose
        round-to-nearest grid has the least input-weighted squared error
        (:func:`hiq.quant.grid.weighted_clip_search`; ``importance``: this part's columns' mean squared inputs)
        instead of min-max. The learned rounding then starts from that grid."""
        if self.n_columns == 0:
            return
        if importance.numel() != self.n_columns:
            raise ValueError(f"{importance.numel()} column importances for a part with {self.n_columns} columns")
        best = weighted_clip_search(self.weight, self.widths, self.lo, self.hi, self.qmax, importance)
        self.min_scale.copy_(best)
        self.max_scale.copy_(best)

    @torch.no_grad()
    def project(self) -> None:
        """Back inside the bounds after a step: offset in [−0.5, 0.5], clipping multipliers in [0, 1]."""
        self.offset.clamp_(-0.5, 0.5)
        self.min_scale.clamp_(0.0, 1.0)
        self.max_scale.clamp_(0.0, 1.0)

    @torch.no_grad()
    def finish(self) -> dict:
        """Integer codes (uint8), scale and zero (float32 per row and group) of the learnt rounding and clipping."""
        if self.n_columns == 0:
            return self._empty_record()
        scale, zero = self._params(ste=False)
        s, z = self._expand(scale), self._expand(zero)
        codes = (torch.round(self.weight / s + self.offset) + z).clamp(0, self.qmax)
        return {"codes": codes.to(torch.uint8), "scale": scale.detach().clone(), "zero": zero.detach().clone()}

    def regularizer(self, beta: float) -> torch.Tensor:
        return self.weight.new_zeros((), dtype=torch.float32)


QUANTIZERS = {"adaround": AdaRoundQuantizer, "lwc": LWCQuantizer, "signround": SignRoundQuantizer}

"""Asymmetric uniform (min-max) weight quantization with an integer zero point.

A weight matrix ``W`` of shape ``(out_features, in_features)`` is quantized either

* per output channel (``group_size=None``): one ``(scale, zero)`` pair per row, or
* per group (``group_size=g``): one pair per run of ``g`` consecutive input columns of a row,
  so the parameters have shape ``(out_features, in_features // g)``.

For ``b`` bits the integer grid is ``0 .. qmax`` with ``qmax = 2**b - 1`` and

    codes = clamp(round(w / scale) + zero, 0, qmax)
    w_hat = scale * (codes - zero)

Scales and zero points are always computed in float32, whatever the weight dtype.  Zero points
are returned as float32 tensors holding integer values (convenient for arithmetic); codes are
``torch.uint8``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = [
    "MIN_SCALE",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "QuantSpec",
    "SpecLike",
    "as_spec",
    "check_bits",
    "check_shape",
    "dequantize",
    "dequantize_part",
    "expand_groups",
    "fake_quant_part",
    "fake_quant_rtn",
    "group_range",
    "group_widths",
    "minmax_params",
    "normalize_group_size",
    "quantize",
    "rtn",
    "scale_zero",
    "setting_label",
]

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)

#: Lower bound for a scale.  Only reached by groups whose min-max range is (almost) zero, e.g. an
#: all-zero group; every weight of such a group then maps to the zero point and dequantizes to 0.
MIN_SCALE: float = 1e-10


def _join(values: tuple[int, ...]) -> str:
    return ", ".join(str(v) for v in values)


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported weight bit width, else raise ``ValueError``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {_join(SUPPORTED_BITS)}")
    return bits


def normalize_group_size(group_size: int | None) -> int | None:
    """Map user input to a canonical group size.

    ``None``, ``-1`` and ``0`` mean per output channel and are returned as ``None``; any other value
    must be one of :data:`SUPPORTED_GROUP_SIZES`, otherwise ``ValueError`` is raised.
    """
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(
            f"group_size={group_size!r} is not supported; choose one of {_join(SUPPORTED_GROUP_SIZES)} "
            "or None (-1/0) for per-channel"
        )
    if group_size in (-1, 0):
        return None
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size} is not supported; choose one of {_join(SUPPORTED_GROUP_SIZES)} "
            "or None (-1/0) for per-channel"
        )
    return group_size


_SPEC_RE = re.compile(
    r"""^w?(?P<bits>\d+)            # weight bits, optional leading 'w'
        (?:a\d+)?                    # optional activation bits, e.g. 'a16' (ignored)
        (?:[-_]?(?:g(?P<group>-?\d+)|per[-_]?channel|pc))?   # optional group / per-channel suffix
        $""",
    re.VERBOSE,
)


def setting_label(bits: int, group_size: int | None = None, bits_high: int | None = None,
                  method: str | None = None) -> str:
    """The one way hiq names a setting: ``W2 per-channel``, ``W2/3 g128`` (b_N/b_H), ``RTN W4 g64``."""
    widths = f"W{bits}" if bits_high in (None, bits) else f"W{bits}/{bits_high}"
    label = f"{widths} {'per-channel' if group_size in (None, 0, -1) else f'g{group_size}'}"
    return f"{method.upper()} {label}" if method else label


@dataclass(frozen=True)
class QuantSpec:
    """Bit width and grouping of an asymmetric uniform weight quantizer.

    Args:
        bits: weight bit width, one of :data:`SUPPORTED_BITS`.
        group_size: number of consecutive input columns sharing a scale/zero point, one of
            :data:`SUPPORTED_GROUP_SIZES`; ``None`` (or ``-1``/``0``, normalised to ``None``) means one
            scale/zero per output channel (row).
    """

    bits: int
    group_size: int | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        object.__setattr__(self, "group_size", normalize_group_size(self.group_size))

    @property
    def qmax(self) -> int:
        """Largest integer code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def per_channel(self) -> bool:
        """True when there is one scale/zero point per output channel."""
        return self.group_size is None

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``"W2 per-channel"`` or ``"W3 g128"``."""
        return setting_label(self.bits, self.group_size)

    def n_groups(self, in_features: int) -> int:
        """Number of scale/zero pairs per row for a layer with ``in_features`` input columns."""
        return 1 if self.group_size is None else in_features // self.group_size

    @classmethod
    def parse(cls, text: str | int | QuantSpec) -> QuantSpec:
        """Build a spec from text such as ``"w2"``, ``"W3g128"``, ``"w4-g64"``, ``"W2A16g128"`` or ``"2"``.

        ``"w3-per-channel"``/``"w3pc"`` and ``"w3g-1"`` are per-channel as well.  An ``int`` is taken as
        the bit width (per-channel) and a ``QuantSpec`` is returned unchanged.
        """
        if isinstance(text, QuantSpec):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            return cls(text)
        if not isinstance(text, str):
            raise TypeError(f"cannot parse a QuantSpec from {type(text).__name__}")
        cleaned = re.sub(r"\s+", "", text.strip().lower())
        match = _SPEC_RE.match(cleaned)
        if match is None:
            raise ValueError(
                f"cannot parse quantization spec {text!r}; expected e.g. 'w2', 'W3g128', 'w4-g64' or '2'"
            )
        group = match.group("group")
        return cls(int(match.group("bits")), None if group is None else int(group))


SpecLike = QuantSpec | str | int


def as_spec(spec: SpecLike) -> QuantSpec:
    """Coerce a :class:`QuantSpec`, a spec string (see :meth:`QuantSpec.parse`) or a bit width."""
    return QuantSpec.parse(spec)


def check_shape(weight: torch.Tensor, spec: SpecLike) -> tuple[int, int]:
    """Validate that ``weight`` is a 2-D ``(out_features, in_features)`` matrix usable with ``spec``.

    For grouped specs ``in_features`` must be divisible by the group size.  Returns
    ``(out_features, in_features)``; raises ``ValueError`` otherwise.
    """
    spec = as_spec(spec)
    if weight.dim() != 2:
        raise ValueError(
            f"expected a 2-D weight of shape (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    if out_features == 0 or in_features == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if spec.group_size is not None and in_features % spec.group_size != 0:
        raise ValueError(
            f"in_features={in_features} is not divisible by group_size={spec.group_size} "
            f"(weight shape {tuple(weight.shape)})"
        )
    return out_features, in_features


def _grouped(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View a float32 copy of ``weight`` as ``(out, n_groups, g)``."""
    out_features, in_features = check_shape(weight, spec)
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    g = in_features if spec.group_size is None else spec.group_size
    return weight.detach().to(torch.float32).reshape(out_features, in_features // g, g)


def _check_params(
    scale: torch.Tensor, zero: torch.Tensor, out_features: int, in_features: int, spec: QuantSpec
) -> None:
    expected = (out_features, spec.n_groups(in_features))
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {spec.label} on a ({out_features}, {in_features}) "
                f"weight needs shape {expected}"
            )


def scale_zero(lo: torch.Tensor, hi: torch.Tensor, qmax: int,
               rounding=torch.round) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of a range ``[lo, hi]`` (``lo <= 0 <= hi``): ``scale = max((hi - lo) / qmax, MIN_SCALE)``,
    ``zero = clamp(rounding(-lo / scale), 0, qmax)``. Every quantizer of hiq builds its grid here (``rounding``:
    ``torch.round``, or a straight-through round where the range is learnt)."""
    scale = ((hi - lo) / qmax).clamp(min=MIN_SCALE)
    return scale, rounding(-lo / scale).clamp(0, qmax)


def group_widths(n_columns: int, group_size: int | None) -> list[int]:
    """Widths of the column groups of a (part of a) weight: one per row (``group_size=None``), or runs of
    ``group_size`` columns and a shorter last group with its own scale and zero (``[]`` for no columns)."""
    if n_columns == 0:
        return []
    if group_size is None or group_size >= n_columns:
        return [n_columns]
    full, rest = divmod(n_columns, group_size)
    return [group_size] * full + ([rest] if rest else [])


def expand_groups(values: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """``(out, n_groups)`` per-group values -> ``(out, n_columns)`` (each value repeated over its group). One group
    per row gives a broadcast view (no copy: the per-step quantizer forward of a per-channel layer stays cheap), so
    never write into the result."""
    if len(widths) == 1:
        return values.expand(-1, widths[0])
    if len(set(widths)) == 1:
        return values.repeat_interleave(widths[0], dim=1)
    return values.repeat_interleave(torch.tensor(widths, device=values.device), dim=1)


def group_range(weight: torch.Tensor, widths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and group ``(min(min w, 0), max(max w, 0))`` in float32, each ``(out, n_groups)``."""
    w = weight.detach().float()
    lo = torch.stack([c.amin(dim=1) for c in w.split(widths, dim=1)], dim=1).clamp(max=0.0)
    hi = torch.stack([c.amax(dim=1) for c in w.split(widths, dim=1)], dim=1).clamp(min=0.0)
    return lo, hi


#: Clipping factors :func:`weighted_clip_search` tries: 1.0 (min-max) down to 0.5 of the range in steps of 0.025.
CLIP_FACTORS = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))


def group_sums(values: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """``(out, n_columns)`` -> ``(out, n_groups)``: the sum over each group's columns (:func:`group_widths`)."""
    if len(widths) == 1:
        return values.sum(dim=1, keepdim=True)
    if len(set(widths)) == 1:
        return values.reshape(values.shape[0], len(widths), widths[0]).sum(dim=2)
    return torch.stack([c.sum(dim=1) for c in values.split(widths, dim=1)], dim=1)


@torch.no_grad()
def weighted_clip_search(weight: torch.Tensor, widths: list[int], lo: torch.Tensor, hi: torch.Tensor, qmax: int,
                         importance: torch.Tensor, factors: tuple[float, ...] = CLIP_FACTORS) -> torch.Tensor:
    """Per row and group, the factor ``c`` of ``factors`` whose round-to-nearest grid of the clipped range
    ``[c·lo, c·hi]`` (:func:`scale_zero`) has the least weighted squared error ``Σ_j importance_j (w_j − q(w_j))²``
    over the group's columns; ``importance``: one non-negative value per column (the layer's mean squared input
    per channel, so the error is the output error's expectation for inputs with a diagonal second moment).
    Returns ``(out, n_groups)`` float32; ties keep the larger factor (min-max first). Memory: two float32 copies of
    the weight; time: ``len(factors)`` elementwise passes over it."""
    w = weight.float()
    imp = importance.float().to(w.device).reshape(1, -1)
    best = torch.ones_like(lo, dtype=torch.float32)
    best_err = torch.full_like(best, float("inf"))
    q = torch.empty_like(w)
    for c in factors:
        scale, zero = scale_zero(lo * c, hi * c, qmax)
        s, z = expand_groups(scale, widths), expand_groups(zero, widths)
        torch.div(w, s, out=q)
        q.round_().add_(z).clamp_(0, qmax).sub_(z).mul_(s).sub_(w).square_().mul_(imp)
        err = group_sums(q, widths)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, c), best)
    return best


def dequantize_part(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group_size: int | None) -> torch.Tensor:
    """Float32 weights from codes ``(out, n)`` and per-group ``scale``/``zero`` ``(out, n_groups)``; the last group
    may be shorter (:func:`group_widths`)."""
    if codes.shape[1] == 0:
        return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    widths = group_widths(codes.shape[1], group_size)
    return (codes.float() - expand_groups(zero.float(), widths)) * expand_groups(scale.float(), widths)


def fake_quant_part(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """RTN fake quantization of a column block whose width need not be a multiple of ``group_size`` (a shorter
    last group gets its own scale and zero); same values as :func:`fake_quant_rtn` where both apply."""
    widths = group_widths(weight.shape[1], group_size)
    if not widths:
        return weight.clone()
    qmax = (1 << check_bits(bits)) - 1
    scale, zero = scale_zero(*group_range(weight, widths), qmax)
    s, z = expand_groups(scale, widths), expand_groups(zero, widths)
    codes = (torch.round(weight.detach().float() / s) + z).clamp(0, qmax)
    return (s * (codes - z)).to(weight.dtype)


def minmax_params(weight: torch.Tensor, spec: SpecLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point per row (per-channel) or per group of ``g`` consecutive columns.

    For every row/group, ``lo = min(min(w), 0)`` and ``hi = max(max(w), 0)``: the range is widened to
    contain 0, so **0 is always exactly representable** (the code equal to the zero point dequantizes
    to exactly 0.0) and every weight lies inside the grid, hence round-to-nearest errs by at most
    ``scale / 2``.  Then ``scale = max((hi - lo) / qmax, MIN_SCALE)`` (the floor only matters for
    all-zero groups) and ``zero = clamp(round(-lo / scale), 0, qmax)``.

    Computed in float32 whatever the weight dtype.

    Returns:
        ``(scale, zero)``, both float32 of shape ``(out_features, n_groups)`` (``n_groups = 1``
        per-channel); ``zero`` holds integers in ``[0, qmax]``.
    """
    spec = as_spec(spec)
    w = _grouped(weight, spec)
    return scale_zero(w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0), spec.qmax)


def quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: SpecLike) -> torch.Tensor:
    """Round ``weight`` to integer codes ``clamp(round(w / scale) + zero, 0, qmax)``.

    ``scale`` and ``zero`` have shape ``(out_features, n_groups)`` and are broadcast over the ``g``
    columns of each group.  Returns a ``torch.uint8`` tensor shaped like ``weight``.
    """
    spec = as_spec(spec)
    w = _grouped(weight, spec)
    out_features, in_features = weight.shape
    _check_params(scale, zero, out_features, in_features, spec)
    s = scale.to(device=w.device, dtype=torch.float32).unsqueeze(-1)
    z = zero.to(device=w.device, dtype=torch.float32).unsqueeze(-1)
    codes = (torch.round(w / s) + z).clamp_(0, spec.qmax)
    return codes.to(torch.uint8).reshape(out_features, in_features)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: SpecLike,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Map integer codes back to weights: ``scale * (codes - zero)``, cast to ``dtype``.

    The arithmetic is done in float32; only the result is cast.
    """
    spec = as_spec(spec)
    out_features, in_features = check_shape(codes, spec)
    _check_params(scale, zero, out_features, in_features, spec)
    g = in_features if spec.group_size is None else spec.group_size
    c = codes.to(torch.float32).reshape(out_features, in_features // g, g)
    s = scale.to(device=c.device, dtype=torch.float32).unsqueeze(-1)
    z = zero.to(device=c.device, dtype=torch.float32).unsqueeze(-1)
    return (s * (c - z)).reshape(out_features, in_features).to(dtype)


def rtn(weight: torch.Tensor, spec: SpecLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization with min-max parameters: returns ``(codes, scale, zero)``."""
    spec = as_spec(spec)
    scale, zero = minmax_params(weight, spec)
    return quantize(weight, scale, zero, spec), scale, zero


def fake_quant_rtn(weight: torch.Tensor, spec: SpecLike) -> torch.Tensor:
    """Quantize with :func:`rtn` and dequantize again; same shape, dtype and device as ``weight``."""
    spec = as_spec(spec)
    codes, scale, zero = rtn(weight, spec)
    return dequantize(codes, scale, zero, spec, dtype=weight.dtype)

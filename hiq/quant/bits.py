"""Average bits per weight, including the scale / zero-point overhead of grouped quantization.

Conventions (the ``convention`` argument)
-----------------------------------------
``"storage"`` (default) -- what an asymmetric ``b``-bit quantized layer really stores:
    every group of ``g`` weights (every row of ``in_features`` weights when per-channel) carries one
    scale of ``scale_bits`` bits (default 16: fp16) and one zero point stored as a ``b``-bit integer
    (``zero_bits`` defaults to ``b``), so

        avg = b + (scale_bits + zero_bits) / g          (grouped)
        avg = b + (scale_bits + zero_bits) / in_features (per-channel; tiny for wide layers)

    This is the layout of the AutoGPTQ ``QuantLinear`` kernels that GPTQ and OmniQuant's real
    quantization (``--real_quant``) pack into: fp16 ``scales``, ``b``-bit packed ``qzeros``.  (Their
    per-column int32 ``g_idx`` is not counted.)  Values: W2 g128 = 2.1406 (prints "2.14"),
    W2 g64 = 2.2813 ("2.28"), W3 g128 = 3.1484 ("3.15"), W4 g128 = 4.1563 ("4.16").

``"weights_only"`` -- just ``b``, the figure the GPTQ / OmniQuant / HiQ papers print for per-channel
    rows ("2.00").

``"paper"`` (alias ``"omniquant"``) -- reproduces the grouped figures printed in the papers' tables:
    "2.15" for W2A16g128, "2.30" (GPTQ) for W2A16g64 and "3.15" for W3A16g128.  Grouped layers are
    charged a fixed 19 bits per group, i.e. an fp16 scale plus a *3-bit* zero point, whatever ``b``
    (``zero_bits`` defaults to 3 instead of ``b``); per-channel layers are charged ``b`` (overhead
    ignored, as the tables print "2.00").  Values: W2 g128 = 2 + 19/128 = 2.1484 -> "2.15";
    W2 g64 = 2 + 19/64 = 2.2969 -> "2.30"; W3 g128 = 3.1484 -> "3.15"; W4 g128 = 4.1484 -> "4.15".

    How we found it: neither the OmniQuant README nor its code (github.com/OpenGVLab/OmniQuant) states
    how "2.15" is counted, so it was solved arithmetically.  A 2-decimal "2.15" at g128 needs
    18.56 <= overhead < 19.84 bits per group, i.e. exactly 19 bits with an integer bit budget; the
    true storage for W2 (16 + 2 = 18 bits) gives 2.14, fp16 scale + 4-bit zero (20 bits) gives 2.16,
    and fp16 scale + fp16 zero (32 bits) gives 2.25.  19 bits = 16 + 3 is exactly the W3 g128
    overhead (~0.15 bit/weight), and the same 19 bits also reproduce GPTQ's "2.30" at g64 and the
    "3.15" at W3 g128, so the tables appear to charge the 3-bit-setting overhead of ~0.15 bit/weight
    per 128 weights to every bit width.  Caveat: OmniQuant's "2.24" at W2 g64 is reproduced by *no*
    per-group accounting that also gives 2.15 at g128 (overhead proportional to 1/g would give
    >= 2.29; 2.24 is even below one fp16 scale per 64 weights, 2.25) -- treat it as a figure printed
    under a different, undocumented rule.

Whole models are summarised with :func:`average_bits_over_layers`, which weights each layer's bits
per weight by its parameter count.  Group sizes here may be any positive integer (e.g. 512), not only
the sizes :mod:`hiq.quant.grid` can quantize with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real

from hiq.quant.grid import QuantSpec, SpecLike, as_spec

__all__ = [
    "CONVENTIONS",
    "PAPER_ZERO_BITS",
    "average_bits",
    "average_bits_over_layers",
    "mixed_average_bits",
    "ratio_average_bits",
    "spec_average_bits",
    "stored_dtype",
    "stored_width",
]

CONVENTIONS: tuple[str, ...] = ("storage", "weights_only", "paper")
_ALIASES = {"omniquant": "paper"}

#: Zero-point width assumed by the ``"paper"`` convention (fp16 scale + 3-bit zero = 19 bits/group).
PAPER_ZERO_BITS = 3


def _convention(convention: str) -> str:
    name = _ALIASES.get(convention, convention)
    if name not in CONVENTIONS:
        allowed = ", ".join([*CONVENTIONS, *_ALIASES])
        raise ValueError(f"convention={convention!r} is not known; choose one of {allowed}")
    return name


def _check_bits(bits: int, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"{name}={bits!r} must be a positive integer")
    return bits


def _group(group_size: int | None) -> int | None:
    if group_size is None or group_size in (-1, 0):
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise ValueError(
            f"group_size={group_size!r} must be a positive integer or None (-1/0) for per-channel"
        )
    return group_size


def _check_in_features(in_features: int | None) -> int | None:
    if in_features is None:
        return None
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features={in_features!r} must be a positive integer")
    return in_features


def _overhead_per_weight(
    bits: int,
    group_size: int | None,
    in_features: int | None,
    scale_bits: int,
    zero_bits: int | None,
    convention: str,
    n_columns: float | None = None,
) -> float:
    """Scale + zero bits per weight of one quantized segment (``convention`` already resolved)."""
    if convention == "weights_only":
        return 0.0
    if convention == "paper":
        if group_size is None:
            return 0.0
        zb = PAPER_ZERO_BITS if zero_bits is None else zero_bits
    else:
        zb = bits if zero_bits is None else zero_bits
    per_group = scale_bits + zb
    if group_size is None:
        if in_features is None:
            raise ValueError(
                "in_features is required for per-channel accounting under the "
                f"{convention!r} convention (overhead is (scale_bits + zero_bits) / in_features)"
            )
        return per_group / in_features
    if in_features is not None:
        # Exact count: a ragged last group still needs its own scale and zero point.
        return math.ceil(in_features / group_size) * per_group / in_features
    return per_group / group_size


def average_bits(
    bits: int,
    group_size: int | None = None,
    in_features: int | None = None,
    *,
    scale_bits: int = 16,
    zero_bits: int | None = None,
    convention: str = "storage",
) -> float:
    """Average bits per weight of a ``bits``-bit asymmetric quantized layer.

    Args:
        bits: weight bit width ``b``.
        group_size: weights per scale/zero group; ``None`` (or ``-1``/``0``) means per output channel.
        in_features: input width of the layer.  Required for per-channel accounting under the
            ``"storage"`` convention; for grouped layers it makes a ragged last group count fully.
        scale_bits: bits per stored scale (16 = fp16).
        zero_bits: bits per stored zero point; default ``b`` (``"storage"``) or 3 (``"paper"``).
        convention: ``"storage"``, ``"weights_only"`` or ``"paper"`` (alias ``"omniquant"``); see the
            module docstring.

    Example: ``round(average_bits(2, 128, convention="paper"), 2) == 2.15``.
    """
    conv = _convention(convention)
    _check_bits(bits)
    _check_bits(scale_bits, "scale_bits")
    if zero_bits is not None:
        _check_bits(zero_bits, "zero_bits")
    group = _group(group_size)
    in_f = _check_in_features(in_features)
    return bits + _overhead_per_weight(bits, group, in_f, scale_bits, zero_bits, conv)


def spec_average_bits(spec: SpecLike, in_features: int | None = None, **kwargs: object) -> float:
    """:func:`average_bits` for a :class:`~hiq.quant.grid.QuantSpec` (or spec string such as ``"w2g128"``)."""
    qs: QuantSpec = as_spec(spec)
    return average_bits(qs.bits, qs.group_size, in_features, **kwargs)  # type: ignore[arg-type]


def mixed_average_bits(
    ratio_high: float,
    bits_high: int,
    bits_low: int,
    group_size: int | None = None,
    in_features: int | None = None,
    *,
    scale_bits: int = 16,
    zero_bits: int | None = None,
    convention: str = "storage",
) -> float:
    """Average bits per weight of a layer whose input columns are split into two precisions.

    A fraction ``ratio_high`` of the columns is quantized at ``bits_high`` and the rest at
    ``bits_low``, both with the same ``group_size``.

    * Grouped: the result is the column-weighted mean
      ``r * average_bits(bits_high, g) + (1 - r) * average_bits(bits_low, g)`` -- exact when the split
      falls on group boundaries (each group is entirely high or low precision).
    * Per-channel (``"storage"``): each row holds two segments, each with its own scale and zero point,
      so the overhead is ``(scale_bits + z_high) + (scale_bits + z_low)`` bits per row of
      ``in_features`` weights (only one pair when ``r`` is 0 or 1).  Under ``"paper"`` and
      ``"weights_only"`` it is ``r * bits_high + (1 - r) * bits_low``.
    """
    conv = _convention(convention)
    if not isinstance(ratio_high, Real) or isinstance(ratio_high, bool) or not 0.0 <= ratio_high <= 1.0:
        raise ValueError(f"ratio_high={ratio_high!r} must be a number in [0, 1]")
    r = float(ratio_high)
    _check_bits(bits_high, "bits_high")
    _check_bits(bits_low, "bits_low")
    _check_bits(scale_bits, "scale_bits")
    if zero_bits is not None:
        _check_bits(zero_bits, "zero_bits")
    group = _group(group_size)
    in_f = _check_in_features(in_features)

    weights = r * bits_high + (1.0 - r) * bits_low
    if group is not None:
        hi = _overhead_per_weight(bits_high, group, in_f, scale_bits, zero_bits, conv)
        lo = _overhead_per_weight(bits_low, group, in_f, scale_bits, zero_bits, conv)
        return weights + r * hi + (1.0 - r) * lo
    overhead = 0.0
    if r > 0.0:
        overhead += _overhead_per_weight(bits_high, None, in_f, scale_bits, zero_bits, conv)
    if r < 1.0:
        overhead += _overhead_per_weight(bits_low, None, in_f, scale_bits, zero_bits, conv)
    return weights + overhead


def average_bits_over_layers(layers: Iterable[tuple[int, float]]) -> float:
    """Parameter-weighted mean bits per weight over ``(n_params, bits_per_weight)`` pairs.

    Use it for a whole model, e.g. ``[(4096 * 4096, 2.15), (4096 * 11008, 3.15), ...]``; layers kept
    in fp16 can be listed with 16.0.
    """
    total_params = 0
    total_bits = 0.0
    for item in layers:
        n_params, bpw = item
        if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 0:
            raise ValueError(f"n_params={n_params!r} must be a non-negative integer")
        if not isinstance(bpw, Real) or isinstance(bpw, bool) or not math.isfinite(bpw) or bpw < 0:
            raise ValueError(f"bits_per_weight={bpw!r} must be a finite non-negative number")
        total_params += n_params
        total_bits += n_params * float(bpw)
    if total_params == 0:
        raise ValueError("average_bits_over_layers needs at least one layer with n_params > 0")
    return total_bits / total_params


def ratio_average_bits(ratios, n_params, bits_low: float, bits_high: float) -> float:
    """Parameter-weighted average *code* bits when layer ``i`` (``n_params[i]`` weights) has ``ratios[i]`` of its
    columns at ``bits_high`` and the rest at ``bits_low`` (the solver's budget: overhead excluded)."""
    ratios, n_params = list(ratios), [int(n) for n in n_params]
    if len(ratios) != len(n_params):
        raise ValueError(f"got {len(ratios)} ratios for {len(n_params)} layers")
    weighted = math.fsum(n * (bits_low + r * (bits_high - bits_low)) for r, n in zip(ratios, n_params, strict=True))
    return weighted / sum(n_params)


def stored_dtype(model):
    """The dtype an unquantized model's checkpoint stores (``dtype`` in the ``config.json`` of
    ``model.name_or_path``), else the dtype it is loaded in."""
    import json
    from pathlib import Path

    import torch

    dtype = None
    config = Path(str(getattr(model, "name_or_path", "") or "")) / "config.json"
    if config.is_file():
        saved = json.loads(config.read_text())
        name = saved.get("dtype") or saved.get("torch_dtype")
        dtype = getattr(torch, str(name).removeprefix("torch."), None) if name else None
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        dtype = next(model.parameters()).dtype
    return dtype


def stored_width(model) -> float:
    """Bits per weight of an unquantized model as stored (:func:`stored_dtype`; the bundled model: stored fp16, run
    in fp32: 16)."""
    import torch

    return float(torch.finfo(stored_dtype(model)).bits)

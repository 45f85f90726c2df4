"""Mixed-precision column split: the top-scored input columns at ``bits_high``, the rest at ``bits_low``.

The split used to measure the matrix M (and later by the hybrid quantizer): columns are ranked by their
impact score; the ``k = floor(ratio * in_features)`` best form the high-impact part. Each part is quantized
as its own matrix (columns in permuted order: high part by descending score, normal part in original
order), so a scale/zero group never mixes bit widths. With a group size ``g`` each part is cut into
consecutive runs of ``g`` of its columns; a part whose width is not a multiple of ``g`` gets a shorter last
group (its own scale and zero). ``floor`` keeps the achieved ratio at or below the nominal one, so a bit
budget computed from nominal ratios is never exceeded.
"""

from __future__ import annotations

import math

import torch

from hiq.quant.grid import check_bits, fake_quant_part, normalize_group_size


def high_impact_count(ratio: float, in_features: int) -> int:
    """Number of high-impact columns for a nominal ``ratio`` (floor; see the module docstring)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r} must be in [0, 1]")
    return math.floor(ratio * in_features + 1e-9)


def column_order(scores: torch.Tensor) -> torch.Tensor:
    """Input columns by descending impact score (ties broken by column index, so the order is deterministic)."""
    idx = torch.arange(scores.numel())
    # stable sort on -score keeps the lower index first among equal scores
    return idx[torch.sort(-scores.double(), stable=True).indices]


def split_columns(scores: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(high-impact column indices by descending score, normal column indices in original order)."""
    order = column_order(scores)
    k = high_impact_count(ratio, scores.numel())
    high = order[:k]
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    mask[high] = False
    return high, torch.nonzero(mask).flatten()


@torch.no_grad()
def mixed_fake_quant(
    weight: torch.Tensor,
    scores: torch.Tensor,
    ratio: float,
    bits_high: int,
    bits_low: int,
    group_size: int | None = None,
) -> torch.Tensor:
    """Dequantised weight with the top ``ratio`` columns (by ``scores``) at ``bits_high``, the rest at ``bits_low``."""
    check_bits(bits_high)
    check_bits(bits_low)
    group_size = normalize_group_size(group_size)
    if scores.numel() != weight.shape[1]:
        raise ValueError(f"{scores.numel()} column scores for a weight with {weight.shape[1]} input columns")
    high, normal = split_columns(scores, ratio)
    out = torch.empty_like(weight)
    out[:, high] = fake_quant_part(weight[:, high], bits_high, group_size)
    out[:, normal] = fake_quant_part(weight[:, normal], bits_low, group_size)
    return out

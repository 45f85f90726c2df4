"""Average-bits accounting (hiq.quant.bits)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hiq.quant import (
    CONVENTIONS,
    QuantSpec,
    average_bits,
    average_bits_over_layers,
    mixed_average_bits,
    spec_average_bits,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_channel_weights_only_is_b(bits: int) -> None:
    assert average_bits(bits, None, 4096, convention="weights_only") == bits
    assert average_bits(bits, convention="weights_only") == bits
    assert average_bits(bits, 128, convention="weights_only") == bits
    assert f"{average_bits(bits, None, convention='paper'):.2f}" == f"{bits}.00"


def test_storage_convention() -> None:
    # fp16 scale + b-bit zero point per group / row.
    assert average_bits(2, 128) == pytest.approx(2 + 18 / 128)
    assert average_bits(2, 64) == pytest.approx(2 + 18 / 64)
    assert average_bits(3, 128) == pytest.approx(3 + 19 / 128)
    assert average_bits(4, 128, zero_bits=16) == pytest.approx(4.25)
    assert average_bits(2, None, 4096) == pytest.approx(2 + 18 / 4096)
    assert average_bits(2, -1, 11008) == average_bits(2, 0, 11008) == average_bits(2, None, 11008)
    # Ragged last group is charged in full when in_features is known.
    assert average_bits(2, 128, 200) == pytest.approx(2 + 2 * 18 / 200)
    assert average_bits(2, 128, 4096) == pytest.approx(average_bits(2, 128))


def test_paper_convention_reproduces_table_figures() -> None:
    # The papers' tables: W2A16g128 -> 2.15, W2A16g64 -> 2.30 (GPTQ), W3A16g128 -> 3.15.
    assert round(average_bits(2, 128, convention="paper"), 2) == 2.15
    assert round(average_bits(2, 128, convention="omniquant"), 2) == 2.15
    assert round(average_bits(2, 64, convention="paper"), 2) == 2.30
    assert round(average_bits(3, 128, convention="paper"), 2) == 3.15
    assert f"{average_bits(2, 128, 4096, convention='paper'):.2f}" == "2.15"
    # ... which the true storage of a W2 g128 layer (18 bits/group) does not give.
    assert round(average_bits(2, 128), 2) == 2.14


def test_spec_average_bits() -> None:
    assert spec_average_bits("W2g128", convention="paper") == average_bits(2, 128, convention="paper")
    assert spec_average_bits(QuantSpec(3), 4096) == average_bits(3, None, 4096)


@settings(max_examples=50, deadline=None)
@given(
    r=st.floats(0.0, 1.0),
    b_h=st.sampled_from([3, 4, 8]),
    b_l=st.sampled_from([2, 3]),
    g=st.sampled_from([32, 64, 128]),
    conv=st.sampled_from(CONVENTIONS),
)
def test_mixed_grouped_is_weighted_mean(r: float, b_h: int, b_l: int, g: int, conv: str) -> None:
    manual = r * average_bits(b_h, g, convention=conv) + (1 - r) * average_bits(b_l, g, convention=conv)
    assert mixed_average_bits(r, b_h, b_l, g, convention=conv) == pytest.approx(manual)


def test_mixed_examples() -> None:
    # 10% of columns at 4 bits, 90% at 2 bits, g128, storage: weighted mean of 4.15625 and 2.140625.
    assert mixed_average_bits(0.1, 4, 2, 128) == pytest.approx(0.1 * 4.15625 + 0.9 * 2.140625)
    assert mixed_average_bits(0.25, 4, 2, None, 4096, convention="weights_only") == pytest.approx(2.5)
    # Per-channel storage: each row has a scale + zero for each of its two segments.
    assert mixed_average_bits(0.25, 4, 2, None, 4096) == pytest.approx(2.5 + (16 + 4 + 16 + 2) / 4096)
    # Degenerate ratios reduce to the single-precision figures.
    assert mixed_average_bits(0.0, 4, 2, None, 4096) == pytest.approx(average_bits(2, None, 4096))
    assert mixed_average_bits(1.0, 4, 2, 64) == pytest.approx(average_bits(4, 64))


def test_over_layers_weights_by_params() -> None:
    layers = [(4096 * 4096, 2.15), (4096 * 11008, 3.15), (1000, 16.0)]
    total = sum(n for n, _ in layers)
    manual = sum(n * b for n, b in layers) / total
    assert average_bits_over_layers(layers) == pytest.approx(manual)
    assert average_bits_over_layers(iter([(10, 2.0), (30, 4.0)])) == pytest.approx(3.5)
    assert average_bits_over_layers([(5, 3.0)]) == 3.0


def test_validation() -> None:
    with pytest.raises(ValueError, match="convention='bogus'"):
        average_bits(2, 128, convention="bogus")
    with pytest.raises(ValueError, match="in_features is required"):
        average_bits(2, None)
    with pytest.raises(ValueError, match="bits=0"):
        average_bits(0, 128)
    with pytest.raises(ValueError, match="group_size=-5"):
        average_bits(2, -5)
    with pytest.raises(ValueError, match="ratio_high=1.5"):
        mixed_average_bits(1.5, 4, 2, 128)
    with pytest.raises(ValueError, match="at least one layer"):
        average_bits_over_layers([])
    with pytest.raises(ValueError, match="n_params=-1"):
        average_bits_over_layers([(-1, 2.0)])

"""Properties of the asymmetric min-max quantization grid (hiq.quant.grid)."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hiq.quant import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantSpec,
    check_shape,
    dequantize,
    fake_quant_rtn,
    minmax_params,
    quantize,
    rtn,
)

GROUPS = (None, *SUPPORTED_GROUP_SIZES)
SPECS = [QuantSpec(b, g) for b, g in itertools.product(SUPPORTED_BITS, GROUPS)]
SPEC_IDS = [s.label.replace(" ", "-") for s in SPECS]
SHAPES = [(16, 128), (8, 256)]
DISTS = ["normal", "student_t", "uniform_offset"]


def make_weight(
    shape: tuple[int, int], dist: str, seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dist == "normal":
        w = torch.randn(shape, generator=gen) * 0.02
    elif dist == "student_t":
        # Heavy tails (df=2): a few large outliers per row, like LLM weights.
        normal = torch.randn(shape, generator=gen)
        chi2 = torch.randn((*shape, 2), generator=gen).pow(2).sum(-1)
        w = 0.02 * normal / torch.sqrt(chi2 / 2)
    elif dist == "uniform_offset":
        # All-positive rows/groups: exercises the "min clamped to <= 0" rule.
        w = torch.rand(shape, generator=gen) + 0.5
    else:  # pragma: no cover - guarded by parametrisation
        raise AssertionError(dist)
    return w.to(dtype)


def groups_view(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    out_f, in_f = t.shape
    g = in_f if spec.group_size is None else spec.group_size
    return t.reshape(out_f, in_f // g, g)


def check_grid_properties(w: torch.Tensor, spec: QuantSpec) -> None:
    codes, scale, zero = rtn(w, spec)
    out_f, in_f = w.shape
    n_groups = 1 if spec.group_size is None else in_f // spec.group_size

    # Codes: integer dtype, same shape, in range.
    assert codes.dtype == torch.uint8
    assert codes.shape == w.shape
    assert int(codes.min()) >= 0 and int(codes.max()) <= spec.qmax

    # Parameters: float32, (out, n_groups), positive scale, integer zero in [0, qmax].
    assert scale.shape == zero.shape == (out_f, n_groups)
    assert scale.dtype == zero.dtype == torch.float32
    assert bool((scale > 0).all())
    assert torch.equal(zero, zero.round())
    assert bool((zero >= 0).all()) and bool((zero <= spec.qmax).all())

    # Zero is exactly representable: the code equal to the zero point dequantizes to exactly 0.
    zero_codes = zero.to(torch.uint8).repeat_interleave(in_f // n_groups, dim=1)
    assert torch.equal(dequantize(zero_codes, scale, zero, spec), torch.zeros(out_f, in_f))

    fq32 = dequantize(codes, scale, zero, spec)
    # At most 2**b distinct dequantized values per row/group.
    sorted_vals = groups_view(fq32, spec).sort(dim=-1).values
    distinct = (sorted_vals.diff(dim=-1) != 0).sum(dim=-1) + 1
    assert int(distinct.max()) <= 2**spec.bits

    # RTN error <= scale / 2 everywhere (0 in [min, max] and the range spans the whole grid).
    w32 = w.to(torch.float32)
    err = groups_view((fq32 - w32).abs(), spec)
    bound = scale.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-6 * groups_view(w32.abs(), spec)
    assert bool((err <= bound).all()), float((err - bound).max())

    # fake_quant_rtn agrees with the explicit pipeline and keeps dtype/shape/device.
    fq = fake_quant_rtn(w, spec)
    assert fq.dtype == w.dtype and fq.shape == w.shape and fq.device == w.device
    assert torch.equal(fq, fq32.to(w.dtype))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dist", DISTS)
def test_grid_properties(spec: QuantSpec, shape: tuple[int, int], dist: str) -> None:
    seed = zlib.crc32(f"{spec.label}|{shape}|{dist}".encode())
    check_grid_properties(make_weight(shape, dist, seed=seed), spec)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("dist", DISTS)
def test_idempotent(spec: QuantSpec, dist: str) -> None:
    w = make_weight((16, 128), dist, seed=7)
    once = fake_quant_rtn(w, spec)
    twice = fake_quant_rtn(once, spec)
    torch.testing.assert_close(twice, once, rtol=1e-6, atol=1e-7)
    # The re-quantized codes are identical, not merely close.
    assert torch.equal(rtn(once, spec)[0], rtn(w, spec)[0])


@settings(max_examples=25, deadline=None)
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    group=st.sampled_from(GROUPS),
    rows=st.integers(1, 6),
    n_blocks=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-6, 3),
    dist=st.sampled_from(DISTS),
)
def test_grid_properties_hypothesis(
    bits: int, group: int | None, rows: int, n_blocks: int, seed: int, log_scale: float, dist: str
) -> None:
    spec = QuantSpec(bits, group)
    w = make_weight((rows, 128 * n_blocks), dist, seed) * (10.0**log_scale)
    check_grid_properties(w, spec)
    torch.testing.assert_close(fake_quant_rtn(fake_quant_rtn(w, spec), spec), fake_quant_rtn(w, spec))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_low_precision_inputs(dtype: torch.dtype, spec: QuantSpec) -> None:
    w = make_weight((8, 256), "student_t", seed=3, dtype=dtype)
    codes, scale, zero = rtn(w, spec)
    assert scale.dtype == torch.float32 and zero.dtype == torch.float32
    # Parameters are computed from the exact float32 upcast of the input.
    s32, z32 = minmax_params(w.to(torch.float32), spec)
    assert torch.equal(scale, s32) and torch.equal(zero, z32)
    assert torch.equal(codes, quantize(w.to(torch.float32), scale, zero, spec))

    fq = fake_quant_rtn(w, spec)
    assert fq.dtype == dtype and fq.shape == w.shape
    assert torch.isfinite(fq.to(torch.float32)).all()
    fq32 = dequantize(codes, scale, zero, spec)
    err = groups_view((fq.to(torch.float32) - w.to(torch.float32)).abs(), spec)
    eps = torch.finfo(dtype).eps
    bound = scale.unsqueeze(-1) / 2 * (1 + 1e-5) + eps * groups_view(fq32.abs(), spec)
    assert bool((err <= bound).all())


def test_exact_zeros_survive() -> None:
    w = make_weight((8, 256), "student_t", seed=11)
    w[:, ::5] = 0.0
    for spec in SPECS:
        fq = fake_quant_rtn(w, spec)
        assert bool((fq[:, ::5] == 0).all()), spec.label


def test_constant_and_zero_groups() -> None:
    w = torch.zeros(4, 128)
    w[1] = 0.37  # constant positive row
    w[2] = -1.5  # constant negative row
    w[3, :64] = 2.0
    for spec in SPECS:
        codes, scale, zero = rtn(w, spec)
        assert torch.isfinite(scale).all() and bool((scale > 0).all())
        fq = fake_quant_rtn(w, spec)
        assert torch.equal(fq[0], torch.zeros(128)), spec.label
        torch.testing.assert_close(fq, w, rtol=1e-6, atol=1e-7)


def test_per_channel_minmax_matches_definition() -> None:
    w = torch.tensor([[-1.0, 0.4, 2.0, 1.0], [0.1, 0.3, 0.6, 0.8]])
    scale, zero = minmax_params(w, QuantSpec(2))
    # Row 0: range [-1, 2] -> scale 1, zero 1. Row 1: min clamped to 0 -> scale 0.8/3, zero 0.
    torch.testing.assert_close(scale, torch.tensor([[1.0], [0.8 / 3]]))
    assert torch.equal(zero, torch.tensor([[1.0], [0.0]]))
    codes = quantize(w, scale, zero, QuantSpec(2))
    assert codes.tolist() == [[0, 1, 3, 2], [0, 1, 2, 3]]


def test_groups_are_consecutive_columns() -> None:
    # Each 32-column group gets its own range; a huge value only affects its own group.
    w = torch.randn(2, 128, generator=torch.Generator().manual_seed(0)) * 0.01
    w[0, 40] = 100.0
    spec = QuantSpec(4, 32)
    scale, _ = minmax_params(w, spec)
    assert scale.shape == (2, 4)
    assert float(scale[0, 1]) > 1.0
    assert float(scale[0, 0]) < 0.1 and float(scale[0, 2]) < 0.1 and float(scale[1].max()) < 0.1


# --------------------------------------------------------------------------- spec / validation


def test_spec_basics() -> None:
    assert QuantSpec(2).qmax == 3 and QuantSpec(3).qmax == 7 and QuantSpec(8).qmax == 255
    assert QuantSpec(2).label == "W2 per-channel"
    assert QuantSpec(3, 128).label == "W3 g128"
    assert QuantSpec(4, -1).group_size is None
    assert QuantSpec(4, 0) == QuantSpec(4, None)
    with pytest.raises(AttributeError):
        QuantSpec(2).bits = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("w2", QuantSpec(2)),
        ("W3g128", QuantSpec(3, 128)),
        ("w4-g64", QuantSpec(4, 64)),
        ("2", QuantSpec(2)),
        ("W2A16g128", QuantSpec(2, 128)),
        ("w8_g32", QuantSpec(8, 32)),
        (" W3 g128 ", QuantSpec(3, 128)),
        ("w3g-1", QuantSpec(3)),
        ("w4-per-channel", QuantSpec(4)),
        (3, QuantSpec(3)),
    ],
)
def test_spec_parse(text: str | int, expected: QuantSpec) -> None:
    assert QuantSpec.parse(text) == expected


def test_spec_parse_rejects() -> None:
    with pytest.raises(ValueError, match="cannot parse"):
        QuantSpec.parse("int4")
    with pytest.raises(ValueError, match="bits=5"):
        QuantSpec.parse("w5g128")
    with pytest.raises(ValueError, match="group_size=48"):
        QuantSpec.parse("w4g48")


def test_bad_bits() -> None:
    with pytest.raises(ValueError, match=r"bits=5 is not supported; choose one of 2, 3, 4, 8"):
        QuantSpec(5)
    with pytest.raises(ValueError, match="bits=1"):
        QuantSpec(1, 128)
    with pytest.raises(ValueError, match="bits=16"):
        rtn(torch.randn(4, 128), 16)


def test_bad_group_size() -> None:
    with pytest.raises(ValueError, match=r"group_size=48 is not supported; choose one of 32, 64, 128"):
        QuantSpec(4, 48)
    with pytest.raises(ValueError, match="group_size=256"):
        QuantSpec(2, 256)


def test_in_features_not_divisible() -> None:
    w = torch.randn(8, 100)
    with pytest.raises(ValueError, match=r"in_features=100 is not divisible by group_size=32"):
        check_shape(w, QuantSpec(4, 32))
    with pytest.raises(ValueError, match=r"in_features=100"):
        fake_quant_rtn(w, QuantSpec(2, 64))
    # Per-channel accepts any width.
    assert fake_quant_rtn(w, QuantSpec(2)).shape == (8, 100)


def test_bad_shapes_and_params() -> None:
    with pytest.raises(ValueError, match="2-D"):
        rtn(torch.randn(128), QuantSpec(4))
    with pytest.raises(ValueError, match="2-D"):
        rtn(torch.randn(2, 4, 128), QuantSpec(4, 32))
    w = torch.randn(4, 128)
    scale, zero = minmax_params(w, QuantSpec(4, 32))
    with pytest.raises(ValueError, match="scale has shape"):
        quantize(w, scale[:, :2], zero, QuantSpec(4, 32))
    with pytest.raises(ValueError, match="needs shape"):
        dequantize(torch.zeros(4, 128, dtype=torch.uint8), scale, zero, QuantSpec(4, 64))


def test_spec_strings_accepted_by_functions() -> None:
    w = make_weight((4, 128), "normal", seed=5)
    torch.testing.assert_close(fake_quant_rtn(w, "w3g64"), fake_quant_rtn(w, QuantSpec(3, 64)))

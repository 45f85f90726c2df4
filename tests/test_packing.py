"""Exact dense bit packing (hiq.quant.packing)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hiq.quant import SUPPORTED_BITS, QuantSpec, pack_codes, packed_nbytes, rtn, unpack_codes


def reference_pack(values: list[int], bits: int) -> list[int]:
    """Bit-stream packing with a Python big integer: code i at bits [i*bits, (i+1)*bits), LSB first."""
    stream = 0
    for i, v in enumerate(values):
        stream |= v << (i * bits)
    nbytes = math.ceil(len(values) * bits / 8)
    return list(stream.to_bytes(nbytes, "little"))


def random_codes(numel: int, bits: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (numel,), generator=gen, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("numel", [1, 2, 3, 7, 8, 13, 24, 1000, 4099])
def test_round_trip_and_length(bits: int, numel: int) -> None:
    codes = random_codes(numel, bits, seed=numel * 10 + bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(numel * bits / 8) == packed_nbytes(numel, bits)
    out = unpack_codes(packed, bits, numel)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)
    assert packed.tolist() == reference_pack(codes.tolist(), bits)


def test_three_bit_is_dense() -> None:
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert packed.numel() == 3  # 8 codes x 3 bits = 24 bits
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes.tolist()))
    assert packed.tolist() == [stream & 0xFF, (stream >> 8) & 0xFF, (stream >> 16) & 0xFF]


def test_known_layouts() -> None:
    # Little-endian bit order: the first code sits in the lowest bits of the first byte.
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00_11_10_01]
    assert pack_codes(torch.tensor([0xA, 0x5, 0xF]), 4).tolist() == [0x5A, 0x0F]
    assert pack_codes(torch.tensor([7]), 3).tolist() == [0b111]
    assert pack_codes(torch.tensor([200, 3]), 8).tolist() == [200, 3]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), data=st.data())
def test_round_trip_hypothesis(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=0, max_size=300))
    codes = torch.tensor(values, dtype=torch.int64)
    packed = pack_codes(codes, bits)
    assert packed.tolist() == reference_pack(values, bits)
    assert unpack_codes(packed, bits, len(values)).tolist() == values


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_multidim_codes_from_rtn(bits: int) -> None:
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(bits))
    codes, _, _ = rtn(w, QuantSpec(bits, 32))
    packed = pack_codes(codes, bits)
    assert packed.numel() == 6 * 128 * bits // 8
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).reshape(codes.shape), codes)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_integer_dtypes(dtype: torch.dtype) -> None:
    codes = torch.tensor([0, 5, 7, 1, 2], dtype=dtype)
    assert unpack_codes(pack_codes(codes, 3), 3, 5).tolist() == [0, 5, 7, 1, 2]


def test_empty() -> None:
    packed = pack_codes(torch.empty(0, dtype=torch.uint8), 3)
    assert packed.numel() == 0 and packed.dtype == torch.uint8
    assert unpack_codes(packed, 3, 0).numel() == 0


def test_out_of_range_codes_rejected() -> None:
    with pytest.raises(ValueError, match=r"code value 4 does not fit in bits=2"):
        pack_codes(torch.tensor([0, 1, 4, 3]), 2)
    with pytest.raises(ValueError, match=r"code value 8 does not fit in bits=3"):
        pack_codes(torch.tensor([8, 1], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"code value 300 does not fit in bits=8"):
        pack_codes(torch.tensor([300]), 8)
    with pytest.raises(ValueError, match=r"code value -1 is negative"):
        pack_codes(torch.tensor([-1, 2]), 4)


def test_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError, match=r"bits=5 is not supported; choose one of 2, 3, 4, 8"):
        pack_codes(torch.tensor([1]), 5)
    with pytest.raises(ValueError, match="bits=6"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), 6, 1)
    with pytest.raises(TypeError, match="integer"):
        pack_codes(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="need 2 packed bytes, got 3"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 5)
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes(torch.zeros(2, dtype=torch.int32), 4, 4)

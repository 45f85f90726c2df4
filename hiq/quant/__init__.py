"""Quantization primitives: the asymmetric uniform grid, exact bit packing and average-bits accounting."""

from hiq.quant.bits import (
    CONVENTIONS,
    PAPER_ZERO_BITS,
    average_bits,
    average_bits_over_layers,
    mixed_average_bits,
    spec_average_bits,
)
from hiq.quant.grid import (
    MIN_SCALE,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantSpec,
    SpecLike,
    as_spec,
    check_bits,
    check_shape,
    dequantize,
    fake_quant_rtn,
    minmax_params,
    normalize_group_size,
    quantize,
    rtn,
)
from hiq.quant.packing import pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "CONVENTIONS",
    "MIN_SCALE",
    "PAPER_ZERO_BITS",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "QuantSpec",
    "SpecLike",
    "as_spec",
    "average_bits",
    "average_bits_over_layers",
    "check_bits",
    "check_shape",
    "dequantize",
    "fake_quant_rtn",
    "minmax_params",
    "mixed_average_bits",
    "normalize_group_size",
    "pack_codes",
    "packed_nbytes",
    "quantize",
    "rtn",
    "spec_average_bits",
    "unpack_codes",
]

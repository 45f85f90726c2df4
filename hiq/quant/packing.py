"""Exact, dense bit packing of integer quantization codes.

Layout: the codes are flattened (row-major) and written one after another into a bit stream, code
``i`` occupying stream bits ``[i * bits, (i + 1) * bits)`` with its least significant bit first.
Stream bit ``k`` is bit ``k % 8`` (LSB = 0) of byte ``k // 8``, i.e. little-endian bit order.  So
``b``-bit codes really take ``b`` bits each: 8 three-bit codes fill exactly 3 bytes, and ``n`` codes
take ``ceil(n * b / 8)`` bytes; unused high bits of the last byte are zero.

Packing works on chunks of ``L = lcm(b, 8) / b`` codes (``L * b`` bits = a whole number of bytes):
each chunk is assembled into one integer word and split into bytes, all with vectorised torch ops.
"""

from __future__ import annotations

import math

import torch

from hiq.quant.grid import check_bits

__all__ = ["pack_codes", "packed_nbytes", "unpack_codes"]

# Chunks of codes handled per vectorised step; bounds the int32 temporaries to a few tens of MB.
_CHUNKS_PER_STEP = 1 << 20


def _layout(bits: int) -> tuple[int, int]:
    """Return ``(codes_per_chunk, bytes_per_chunk)`` for a bit width."""
    bits_per_chunk = math.lcm(bits, 8)
    return bits_per_chunk // bits, bits_per_chunk // 8


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes :func:`pack_codes` produces for ``numel`` codes: ``ceil(numel * bits / 8)``."""
    check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape; flattened row-major) densely into a 1-D ``torch.uint8`` tensor.

    Args:
        codes: integer tensor with values in ``[0, 2**bits - 1]``.
        bits: code width, one of :data:`hiq.quant.grid.SUPPORTED_BITS`.

    Returns:
        ``torch.uint8`` tensor of length ``ceil(codes.numel() * bits / 8)`` on ``codes.device``.

    Raises:
        ValueError: unsupported ``bits`` or codes outside ``[0, 2**bits - 1]``.
        TypeError: ``codes`` is not an integer tensor.
    """
    check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    flat = codes.detach().reshape(-1)
    numel = flat.numel()
    nbytes = packed_nbytes(numel, bits)
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)

    qmax = (1 << bits) - 1
    hi = int(flat.max().item())
    lo = int(flat.min().item())
    if hi > qmax:
        raise ValueError(f"code value {hi} does not fit in bits={bits} (allowed range 0..{qmax})")
    if lo < 0:
        raise ValueError(f"code value {lo} is negative; bits={bits} codes must lie in 0..{qmax}")

    per_chunk, bytes_per_chunk = _layout(bits)
    n_chunks = -(-numel // per_chunk)
    padded = torch.zeros(n_chunks * per_chunk, dtype=torch.int32, device=codes.device)
    padded[:numel] = flat.to(torch.int32)
    chunks = padded.reshape(n_chunks, per_chunk)

    code_shift = torch.arange(per_chunk, dtype=torch.int32, device=codes.device) * bits
    byte_shift = torch.arange(bytes_per_chunk, dtype=torch.int32, device=codes.device) * 8
    out = torch.empty(n_chunks, bytes_per_chunk, dtype=torch.uint8, device=codes.device)
    for start in range(0, n_chunks, _CHUNKS_PER_STEP):
        block = chunks[start : start + _CHUNKS_PER_STEP]
        # Fields do not overlap, so the sum is the bitwise OR; at most 24 bits, fits int32.
        words = (block << code_shift).sum(dim=1, dtype=torch.int32)
        out[start : start + _CHUNKS_PER_STEP] = ((words.unsqueeze(1) >> byte_shift) & 0xFF).to(torch.uint8)
    return out.reshape(-1)[:nbytes]


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: return the first ``numel`` codes as a 1-D ``torch.uint8`` tensor.

    ``packed`` must be a 1-D ``torch.uint8`` tensor of exactly ``ceil(numel * bits / 8)`` bytes.
    Reshape the result to restore the original shape.
    """
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a torch.uint8 tensor, got dtype {packed.dtype}")
    if packed.dim() != 1:
        raise ValueError(f"packed must be 1-D, got shape {tuple(packed.shape)}")
    nbytes = packed_nbytes(numel, bits)
    if packed.numel() != nbytes:
        raise ValueError(f"{numel} codes of bits={bits} need {nbytes} packed bytes, got {packed.numel()}")
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=packed.device)

    if 8 % bits == 0:  # whole codes per byte (2, 4, 8 bits): shift the bytes themselves, no int32 words
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]

    per_chunk, bytes_per_chunk = _layout(bits)
    n_chunks = -(-nbytes // bytes_per_chunk)
    padded = torch.zeros(n_chunks * bytes_per_chunk, dtype=torch.int32, device=packed.device)
    padded[:nbytes] = packed.to(torch.int32)
    chunks = padded.reshape(n_chunks, bytes_per_chunk)

    byte_shift = torch.arange(bytes_per_chunk, dtype=torch.int32, device=packed.device) * 8
    code_shift = torch.arange(per_chunk, dtype=torch.int32, device=packed.device) * bits
    mask = (1 << bits) - 1
    out = torch.empty(n_chunks, per_chunk, dtype=torch.uint8, device=packed.device)
    for start in range(0, n_chunks, _CHUNKS_PER_STEP):
        block = chunks[start : start + _CHUNKS_PER_STEP]
        words = (block << byte_shift).sum(dim=1, dtype=torch.int32)
        out[start : start + _CHUNKS_PER_STEP] = ((words.unsqueeze(1) >> code_shift) & mask).to(torch.uint8)
    return out.reshape(-1)[:numel]

"""The low-bit matmul behind :class:`hiq.packed.PackedLinear`: PyTorch's own int4 weight-only kernel.

A packed hiq layer is two weight parts over gathered input columns (high-impact at b_H bits, the rest at b_N
bits), each with per-row (or per-row-and-group) scale ``s`` and integer zero ``z``: ``w = s * (code - z)``.
PyTorch ships a maintained int4 weight-only matmul, ``aten._weight_int4pack_mm_for_cpu``, that computes
``x @ W.T`` with ``W = (q - 8) * scale + zero`` per row and group of 32/64/128/256 input columns. hiq's codes map
onto it exactly: ``q = code`` (2- and 3-bit codes fit a 4-bit slot), ``scale = s`` and ``zero = s * (8 - z)``.
Each part is padded to whole kernel groups (padded input columns are zero, so their codes never count) and its
rows to a multiple of :data:`ROW_ALIGN`.

At load each part is converted once (:func:`prepare_part`) to the kernel's layout: 4 bits per code, plus the
kernel's bf16 ``(scale, zero)`` table and the exact float16 scales and integer zeros. The bit-packed file stays
the format on disk; in memory only the kernel layout is kept. Three ways to compute a forward
(:func:`int4_linear`):

- ``kernel``: few tokens (decode) with bf16/fp16 activations: the int4 kernel, bf16 activations (its fast path
  on CPU; fp16 activations are cast). Scales and zero terms are rounded to bf16, so the result is close to, not
  equal to, the dequantised model.
- ``dequant-gemm``: many tokens (prefill) with bf16/fp16 activations: the codes are decoded from the kernel layout
  a few hundred rows at a time, dequantised in float32 (exact) and multiplied by a float32 GEMM, the fast dense
  dtype on CPUs without bf16 matrix units. Never more than one chunk of float weights exists.
- ``exact``: float32 activations: the whole float32 weight in original column order, then ``F.linear``: bit for
  bit the dequantised model (what ``hiq fit`` evaluated). This is the reference, not the fast path.

The kernel's layout is not documented and differs between CPU builds (AVX2 and AVX-512 block rows differently),
so hiq reads it by probing the kernel once per process (:func:`cpu_layout`) and checks what it learnt on a random
matrix; where the probe fails, layers keep the dequantising path and say so once.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["KERNEL_GROUP_SIZES", "ROW_ALIGN", "Int4Layout", "Int4Part", "cpu_layout", "decode_codes",
           "int4_linear", "kernel_group_size", "kernel_unsupported_reason", "prepare_part"]

#: Group sizes the int4 kernel takes (``qGroupSize``).
KERNEL_GROUP_SIZES = (32, 64, 128, 256)
#: Output rows are padded to a multiple of this, so every block of the kernel's layout is full (AVX-512 blocks
#: 64 rows, AVX2 32).
ROW_ALIGN = 64
#: At most this many tokens go through the int4 kernel; more go through ``dequant-gemm`` (measured crossover on
#: one 7B-shaped layer: ``benchmarks/serve_speed.py``).
KERNEL_MAX_TOKENS = 16
#: Output rows dequantised per step of ``dequant-gemm`` and ``exact``: bounds the float32 temporaries.
ROWS_PER_STEP = 256


@dataclass(frozen=True)
class Int4Layout:
    """How ``_convert_weight_to_int4pack_for_cpu`` lays out codes: rows in blocks of ``block_rows``; per input
    column ``block_rows / 2`` bytes of a block; local row ``r`` in nibble ``slot[r]`` (nibble ``2j`` = low half of
    byte ``j``, ``2j + 1`` = high half)."""

    block_rows: int
    slot: tuple[int, ...]


def _ops_available() -> bool:
    return hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(
        torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``uint8 (..., B)`` -> ``uint8 (..., 2B)``: low then high nibble of each byte."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def _learn_layout() -> Int4Layout:
    rows, cols = 2 * ROW_ALIGN, 32
    n = torch.arange(rows, dtype=torch.int32)[:, None].expand(rows, cols)
    k = torch.arange(cols, dtype=torch.int32)[None, :].expand(rows, cols)

    def probe(values: torch.Tensor) -> torch.Tensor:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.contiguous(), 2)
        return _nibbles(packed.reshape(-1)).long()

    row_of = probe(n % 16) + 16 * probe((n // 16) % 16)   # nibble index -> the row it holds
    col_of = probe(k % 16) + 16 * probe(k // 16)          # nibble index -> the column it holds
    index = torch.empty(rows, cols, dtype=torch.long)
    index[row_of, col_of] = torch.arange(rows * cols)
    block = int(index[0, 1] - index[0, 0])
    if block not in (8, 16, 32, 64) or rows % block:
        raise RuntimeError(f"unexpected int4 layout (row block {block})")
    slot = index[:block, 0]
    local = torch.arange(rows) % block
    expected = ((torch.arange(rows) // block) * (block * cols))[:, None] + torch.arange(cols)[None] * block \
        + slot[local][:, None]
    if not torch.equal(index, expected) or sorted(slot.tolist()) != list(range(block)):
        raise RuntimeError("int4 layout is not row-blocked")
    layout = Int4Layout(block, tuple(int(s) for s in slot))
    # check on another shape with random codes
    check = torch.randint(0, 16, (ROW_ALIGN * 3, 96), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(check, 2)
    if not torch.equal(decode_codes(packed, layout, 0, check.shape[0]).int(), check):
        raise RuntimeError("decoding the learnt int4 layout does not give the codes back")
    return layout


@functools.cache
def cpu_layout() -> Int4Layout | None:
    """The CPU int4 kernel's layout on this machine (probed once per process); None where the kernel is missing
    or its layout is not the row-blocked one hiq can decode (layers then keep the dequantising path)."""
    if not _ops_available():
        return None
    try:
        return _learn_layout()
    except RuntimeError as err:
        warnings.warn(f"hiq: the int4 kernel's weight layout could not be read ({err}); packed layers use the "
                      f"dequantising path", stacklevel=2)
        return None


def decode_codes(packed: torch.Tensor, layout: Int4Layout, row_start: int, row_stop: int) -> torch.Tensor:
    """Rows ``[row_start, row_stop)`` (block-aligned) of a kernel-layout weight as ``uint8 (rows, K)`` codes."""
    block = layout.block_rows
    k = packed.shape[-1] * 2
    flat = packed.reshape(-1)[row_start * k // 2: row_stop * k // 2]
    nib = _nibbles(flat.view(-1, k, block // 2))                              # (blocks, K, block) in slot order
    slot = torch.tensor(layout.slot, device=packed.device)
    return nib.index_select(2, slot).transpose(1, 2).reshape(row_stop - row_start, k)


def kernel_group_size(width: int, group_size: int | None) -> int | None:
    """The kernel group size for a part of ``width`` columns quantised with ``group_size`` (None: per row); None
    when the kernel cannot hold it."""
    if group_size is None or group_size >= width:   # one scale per row: any kernel group; least padding + table
        return min(KERNEL_GROUP_SIZES, key=lambda g: (-(-width // g) * g * 4 + -(-width // g) * 32, -g))
    return group_size if group_size in KERNEL_GROUP_SIZES else None


def kernel_unsupported_reason(geometry: dict) -> str | None:
    """Why a layer of this geometry cannot use the int4 kernel (None: it can)."""
    if cpu_layout() is None:
        return "the int4 kernel is not available in this torch build"
    for part, bits, width in (("high", geometry["bits_high"], geometry["n_high"]),
                              ("normal", geometry["bits_low"], geometry["in_features"] - geometry["n_high"])):
        if width and bits > 4:
            return f"its {part} part has {bits}-bit codes (the kernel holds at most 4)"
        if width and kernel_group_size(width, geometry["group_size"]) is None:
            return f"group size {geometry['group_size']} (the kernel takes {', '.join(map(str, KERNEL_GROUP_SIZES))})"
    return None


@dataclass
class Int4Part:
    """One part of a layer in the kernel's layout (tensors are registered as buffers by the owner)."""

    columns: torch.Tensor     # long (width,): the input columns of this part, in stored order
    qweight: torch.Tensor     # uint8 (rows_padded, width_padded / 2), the kernel's layout: q = code + shift
    scale_zero: torch.Tensor  # bfloat16 (width_padded / kgroup, rows_padded, 2): the kernel's table
    scale: torch.Tensor       # float16 (out, n_groups): exact scales
    offset: torch.Tensor      # uint8 (out, n_groups): zero + shift, so that w = scale * (q - offset) exactly
    widths: tuple[int, ...]   # the part's group widths (hiq's grouping)
    kernel_group: int


def prepare_part(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, columns: torch.Tensor,
                 widths: list[int], kernel_group: int) -> Int4Part:
    """Convert one part (``codes`` int ``(out, width)`` at ``bits`` bits, ``scale`` float16 and ``zero`` integer
    ``(out, n_groups)`` over hiq's groups ``widths``) to the kernel's layout.

    The kernel computes ``(q - 8) * scale + zero_term`` with ``scale`` and ``zero_term`` rounded to bf16. Codes are
    shifted per group, ``q = code + t`` with ``t = clamp(8 - zero, 0, 16 - 2^bits)``, so ``zero_term = s * (8 -
    zero - t)`` is exactly 0 for codes of up to 3 bits (``t = 8 - zero``): then only the scale is rounded."""
    out, width = codes.shape
    rows = -(-out // ROW_ALIGN) * ROW_ALIGN
    padded = -(-width // kernel_group) * kernel_group
    reps = torch.tensor(widths)
    zero = zero.round().to(torch.int32)
    shift = (8 - zero).clamp(0, 16 - (1 << bits))
    q = torch.full((rows, padded), 8, dtype=torch.int32)
    q[:out, :width] = codes.to(torch.int32) + shift.repeat_interleave(reps, dim=1)
    qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    del q
    offset = zero + shift
    # hiq's groups are whole kernel groups, or one group per row that every kernel group repeats: each kernel group
    # takes the values of the hiq group holding its first column (kernel groups wholly in the padding get zeros)
    starts = torch.arange(0, padded, kernel_group)
    group = torch.searchsorted(reps.cumsum(0), starts, right=True).clamp(max=len(widths) - 1)
    s = torch.zeros(rows, len(starts), dtype=torch.float32)
    z = torch.zeros(rows, len(starts), dtype=torch.float32)
    s[:out], z[:out] = scale.float()[:, group], offset.float()[:, group]
    s[:, starts >= width] = 0
    table = torch.stack((s, s * (8 - z)), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    return Int4Part(columns=columns.long(), qweight=qweight, scale_zero=table, scale=scale.to(torch.float16),
                    offset=offset.to(torch.uint8), widths=tuple(widths), kernel_group=kernel_group)


def _dequantize_rows(part: Int4Part, layout: Int4Layout, r0: int, r1: int, out_features: int) -> torch.Tensor:
    """Float32 weights of rows ``[r0, r1)`` of a part, ``(r1 - r0, width)``, exact (integer codes times float16
    scales); ``r0`` block-aligned, ``r1`` block-aligned or ``out_features``."""
    stop = min(-(-r1 // layout.block_rows) * layout.block_rows, part.qweight.shape[0])
    width = part.columns.numel()
    codes = decode_codes(part.qweight, layout, r0, stop)[: r1 - r0, :width].float()
    scale, zero = part.scale[r0:r1].float(), part.offset[r0:r1].float()
    if len(part.widths) > 1:
        reps = torch.tensor(part.widths, device=codes.device)
        scale, zero = scale.repeat_interleave(reps, dim=1), zero.repeat_interleave(reps, dim=1)
    return (codes - zero) * scale


def dequantized_weight(parts: list[Int4Part], layout: Int4Layout, in_features: int, out_features: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(out, in)`` weight in original column order (float32 values, exact; cast to ``dtype``)."""
    device = parts[0].qweight.device
    weight = torch.empty(out_features, in_features, dtype=dtype, device=device)
    for r0 in range(0, out_features, ROWS_PER_STEP):
        r1 = min(r0 + ROWS_PER_STEP, out_features)
        for part in parts:
            weight[r0:r1].index_copy_(1, part.columns, _dequantize_rows(part, layout, r0, r1, out_features).to(dtype))
    return weight


def _gather(x: torch.Tensor, part: Int4Part, dtype: torch.dtype) -> torch.Tensor:
    cols = x.index_select(1, part.columns).to(dtype)
    pad = part.qweight.shape[1] * 2 - cols.shape[1]
    return F.pad(cols, (0, pad)) if pad else cols


def int4_linear(x: torch.Tensor, parts: list[Int4Part], layout: Int4Layout, in_features: int, out_features: int,
                bias: torch.Tensor | None, mode: str | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` of a layer held as ``parts``; ``mode`` None picks ``exact`` for float32 activations,
    ``kernel`` for at most :data:`KERNEL_MAX_TOKENS` tokens, else ``dequant-gemm`` (see the module doc)."""
    shape = x.shape
    x2 = x.reshape(-1, in_features)
    tokens = x2.shape[0]
    if mode is None:
        mode = "exact" if x.dtype == torch.float32 else "kernel" if tokens <= KERNEL_MAX_TOKENS else "dequant-gemm"
    if mode == "exact":
        y = F.linear(x2, dequantized_weight(parts, layout, in_features, out_features, x.dtype))
    elif mode == "kernel":
        y = None
        for part in parts:
            yp = torch.ops.aten._weight_int4pack_mm_for_cpu(_gather(x2, part, torch.bfloat16), part.qweight,
                                                            part.kernel_group, part.scale_zero)
            y = yp if y is None else y.add_(yp)
        y = y[:, :out_features].to(x.dtype)
    elif mode == "dequant-gemm":
        xs = [x2.index_select(1, p.columns).float() for p in parts]
        y = torch.empty(tokens, out_features, dtype=torch.float32, device=x.device)
        for r0 in range(0, out_features, ROWS_PER_STEP):
            r1 = min(r0 + ROWS_PER_STEP, out_features)
            acc = None
            for xp, part in zip(xs, parts, strict=True):
                term = xp @ _dequantize_rows(part, layout, r0, r1, out_features).T
                acc = term if acc is None else acc.add_(term)
            y[:, r0:r1] = acc
        y = y.to(x.dtype)
    else:
        raise ValueError(f"mode={mode!r}; choose exact, kernel or dequant-gemm")
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], out_features)

"""Export to the compressed-tensors ``pack-quantized`` layout (what vLLM and transformers load), for runs whose every
layer has one bit width: no high-impact columns (ratio 0, the uniform-bit baselines).

compressed-tensors stores signed codes ``q = code - 2^(b-1)`` packed into int32 words, a ``weight_scale`` per row
(strategy ``channel``) or per row and group of ``group_size`` columns (strategy ``group``), and for asymmetric
schemes the zero point ``zero - 2^(b-1)`` packed the same way along the rows; it dequantises ``(q - zp) * scale``,
which is hiq's ``(code - zero) * scale``. Layers are grouped by bit width into ``config_groups`` whose targets name
the modules exactly. The packing itself is compressed-tensors' own (``pack_to_int32``).

What a layer with high-impact columns needs and no runtime offers: two bit widths inside one weight matrix (a
column subset at b_H, the rest at b_N, each with its own scales) plus an input-column permutation. No
compressed-tensors scheme, GPTQ/AWQ kernel or vLLM layer holds that; :mod:`hiq.packed` does, with its own
unpacking path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hiq.artifacts import write_manifest
from hiq.quant.record import LayerRecord

__all__ = ["check_single_width", "save_compressed_tensors"]


def check_single_width(records: dict[str, LayerRecord]) -> None:
    """Raise ``ValueError`` naming the first layer that holds columns of two widths (or a grouped layer whose
    columns do not split into whole groups, which the ``group`` strategy cannot hold)."""
    for name, record in records.items():
        if record.n_high:
            raise ValueError(
                f"layer {name} has {record.n_high} high-impact columns at {record.bits_high} bits beside "
                f"{record.bits_low}-bit ones; compressed-tensors holds one bit width per layer: export "
                f"compressed-tensors only for runs with every ratio 0 (e.g. --ratios.fixed_ratio=0), use the packed "
                f"format otherwise")
        g, width = record.group_size, record.in_features
        if g is not None and width % g:
            raise ValueError(f"layer {name}: {width} columns are not a whole number of groups of {g}; the "
                             f"compressed-tensors group strategy needs equal groups")


def _scheme(bits: int, group_size: int | None, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False,
                            strategy="group" if group_size else "channel", group_size=group_size)
    return QuantizationScheme(targets=targets, weights=args)


def save_compressed_tensors(model: nn.Module, records: dict[str, LayerRecord], out_dir: str | Path, tokenizer=None,
                            dtype: torch.dtype | None = None, info: dict | None = None) -> Path:
    """Write ``records`` (full module name -> finished single-width record) and the model's other tensors as a
    compressed-tensors ``pack-quantized`` checkpoint, atomically."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import save_file

    from hiq.artifacts import staged_directory
    from hiq.packed import unquantized_tensors, write_model_files
    from hiq.quant.bits import stored_dtype

    records = {name: LayerRecord.from_dict(r) for name, r in records.items()}  # a block file's form is read too
    check_single_width(records)
    out_dir = Path(out_dir)
    dtype = dtype or stored_dtype(model)
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    skip: set[str] = set()
    by_bits: dict[int, list[str]] = {}
    group_size = None
    for name, record in records.items():
        part, bits = record.normal, record.bits_low
        offset = 1 << (bits - 1)
        group_size = record.group_size
        codes = part.codes.to(torch.int16) - offset
        zero = part.zero.round().to(torch.int16) - offset
        tensors[f"{name}.weight_packed"] = pack_to_int32(codes.to(torch.int8), bits)
        tensors[f"{name}.weight_scale"] = part.scale.to(dtype).contiguous()
        tensors[f"{name}.weight_zero_point"] = pack_to_int32(zero.to(torch.int8), bits, packed_dim=0)
        tensors[f"{name}.weight_shape"] = torch.tensor(tuple(part.codes.shape), dtype=torch.int64)
        bias = getattr(modules[name], "bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().to(dtype).contiguous()
        skip.update({f"{name}.weight", f"{name}.bias"})
        by_bits.setdefault(bits, []).append(name)
    tensors.update(unquantized_tensors(model, skip, dtype))

    groups = {f"group_{i}": _scheme(bits, group_size, [f"re:^{n.replace('.', '[.]')}$" for n in names])
              for i, (bits, names) in enumerate(sorted(by_bits.items()))}
    quantized = set(records)
    ignore = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in quantized)
    qconfig = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                                 ignore=ignore)
    with staged_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_model_files(tmp, model, qconfig.model_dump(mode="json"), dtype, tokenizer)
        write_manifest(tmp, info or {})
    return out_dir

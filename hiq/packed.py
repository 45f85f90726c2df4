"""The deployable hiq checkpoint: codes bit-packed at each part's width, loadable with ``from_pretrained``.

Layout of a packed directory (format version :data:`FORMAT_VERSION`)::

    config.json          the source model's config plus ``quantization_config`` (:class:`HiQConfig`):
                         quant_method "hiq", format_version, per-layer geometry keyed by full module name
                         (in/out features, b_H, b_N, number of high-impact columns, group size, bias) and the
                         sha256 of every weight file
    model.safetensors    per quantized linear ``<name>.``:
                           high_index   int16 (int32 past 32767 columns): the high-impact input columns, in the
                                        order their codes are stored; the normal columns follow in original order
                           high_codes / normal_codes   uint8, the part's ``(out, width)`` codes packed at b_H / b_N
                                        bits (:func:`hiq.quant.packing.pack_codes`: dense little-endian stream)
                           high_scale / normal_scale   float16 ``(out, n_groups)``
                           high_zero / normal_zero     uint8, the integer zero points packed at the part's width
                           bias         (when the layer has one) in the stored dtype
                         (a part with no columns has no tensors); everything else (embeddings, norms, head) as in
                         the source model, in its stored dtype
    tokenizer files, generation_config.json, hiq.json (setting, recipe, ratios)

Loading: ``import hiq`` registers the ``hiq`` quantization config and quantizer with transformers
(:func:`register`), so ``AutoModelForCausalLM.from_pretrained(dir)`` builds the model with :class:`PackedLinear`
modules holding the packed buffers. Before any tensor is read, every weight file is checked against its sha256
and every layer's tensors against the config's geometry (:func:`check_checkpoint`): a truncated or edited file,
a config that disagrees with the tensors or an unknown format version is a :class:`PackedFormatError` naming the
file and the problem, never a model with wrong weights. Loading needs torch, transformers, safetensors and hiq,
none of hiq's training dependencies (Lightning, HiGHS, datasets).

Inference: :class:`PackedLinear` unpacks its codes and dequantises them on each forward (the CPU/torch path; there
is no fused GPU kernel yet): the model in memory stays packed, one layer's float weight lives only for the
duration of its matmul. The dequantised weight equals the one ``hiq fit`` evaluated bit for bit: scales are
rounded to float16 when a layer is finished (:meth:`hiq.quant.hybrid.HybridLinear.finish`), codes and zeros are
integers.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hiq.artifacts import file_sha256, staged_directory, write_manifest
from hiq.quant.grid import group_widths
from hiq.quant.packing import pack_codes, packed_nbytes, unpack_codes
from hiq.quant.record import LayerRecord

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "HiQConfig",
    "PackedFormatError",
    "PackedLinear",
    "check_checkpoint",
    "file_sha256",
    "layer_geometry",
    "pack_layer",
    "packed_average_bits",
    "packed_tensor_specs",
    "prepare_kernels",
    "register",
    "save_packed",
]

FORMAT_VERSION = 1
QUANT_METHOD = "hiq"
PARTS = ("high", "normal")
WEIGHTS_NAME = "model.safetensors"
_GEOMETRY_KEYS = ("in_features", "out_features", "bits_high", "bits_low", "n_high", "group_size", "bias")


class PackedFormatError(ValueError):
    """A packed checkpoint is unreadable or inconsistent; the message names the file and the problem."""


def _index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


def layer_geometry(record: LayerRecord, bias: bool) -> dict:
    """What a loader needs to build a layer's buffers, from a finished record
    (:meth:`hiq.quant.hybrid.HybridLinear.finish`)."""
    return {"in_features": record.in_features, "out_features": record.out_features, "bits_high": record.bits_high,
            "bits_low": record.bits_low, "n_high": record.n_high, "group_size": record.group_size, "bias": bool(bias)}


def _part_widths(geometry: dict) -> dict[str, tuple[int, int]]:
    """``part -> (columns, bits)``."""
    n_high = geometry["n_high"]
    return {"high": (n_high, geometry["bits_high"]), "normal": (geometry["in_features"] - n_high,
                                                                geometry["bits_low"])}


def packed_tensor_specs(geometry: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """``suffix -> (shape, dtype)`` of one layer's tensors in the file (bias dtype None: any float dtype)."""
    out = geometry["out_features"]
    specs: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    if geometry["n_high"]:
        specs["high_index"] = ((geometry["n_high"],), _index_dtype(geometry["in_features"]))
    for part, (width, bits) in _part_widths(geometry).items():
        if not width:
            continue
        n_groups = len(group_widths(width, geometry["group_size"]))
        specs[f"{part}_codes"] = ((packed_nbytes(out * width, bits),), torch.uint8)
        specs[f"{part}_scale"] = ((out, n_groups), torch.float16)
        specs[f"{part}_zero"] = ((packed_nbytes(out * n_groups, bits),), torch.uint8)
    if geometry["bias"]:
        specs["bias"] = ((out,), None)
    return specs


def pack_layer(record: LayerRecord) -> dict[str, torch.Tensor]:
    """The packed tensors of one finished layer (without bias), keyed by suffix."""
    out: dict[str, torch.Tensor] = {}
    if record.n_high:
        out["high_index"] = record.perm[:record.n_high].to(_index_dtype(record.in_features)).contiguous()
    for part, bits, codes_of in record.parts():
        codes, scale, zero = codes_of.codes, codes_of.scale, codes_of.zero
        if codes.shape[1] == 0:
            continue
        half = scale.to(torch.float16)
        if not torch.equal(half.float(), scale.float()):
            raise ValueError(f"{part} scales are not float16 values: the record predates record format 2 "
                             f"(hiq.quant.hybrid.RECORD_FORMAT); rerun the reconstruction to export it packed")
        out[f"{part}_codes"] = pack_codes(codes, bits)
        out[f"{part}_scale"] = half.contiguous()
        out[f"{part}_zero"] = pack_codes(zero.round().to(torch.int32), bits)
    return out


#: Read by a loader that does not know ``quant_method: hiq`` (transformers without ``import hiq``), which would
#: otherwise skip the quantization config and return randomly initialised linears with a warning.
GUARD_MESSAGE = "hiq packed checkpoint: run `import hiq` before from_pretrained (pip install hiq)"
GUARD_KEY = "hiq_packed_checkpoint.run_import_hiq_before_from_pretrained"


def load_guard(first_layer: str) -> dict[str, torch.Tensor]:
    """Two tensors that make a load without hiq registered fail instead of returning a wrong model: ``<first
    layer>.weight`` as the message's bytes (a size mismatch with the float weight the model expects, which
    transformers refuses) and :data:`GUARD_KEY` (listed in transformers' load report, naming the fix). hiq's
    quantizer ignores both."""
    message = torch.tensor(list(GUARD_MESSAGE.encode()), dtype=torch.uint8)
    return {f"{first_layer}.weight": message, GUARD_KEY: message.clone()}


class PackedLinear(nn.Module):
    """A linear layer holding an hiq layer packed; each forward unpacks and dequantises its weight.

    The weight in original column order is ``W[:, high_index] = deq(high)`` and ``W[:, normal columns] =
    deq(normal)`` with ``deq = scale * (codes - zero)`` per row and group, computed in float32 (exact for float16
    scales and integer codes) and cast to the input's dtype.
    """

    def __init__(self, geometry: dict, device: torch.device | str | None = None,
                 bias_dtype: torch.dtype | None = None):
        super().__init__()
        missing = [k for k in _GEOMETRY_KEYS if k not in geometry]
        if missing:
            raise ValueError(f"layer geometry lacks {missing}")
        self.geometry = {k: geometry[k] for k in _GEOMETRY_KEYS}
        self.in_features, self.out_features = int(geometry["in_features"]), int(geometry["out_features"])
        self.n_high, self.group_size = int(geometry["n_high"]), geometry["group_size"]
        self.bits_high, self.bits_low = int(geometry["bits_high"]), int(geometry["bits_low"])
        for suffix, (shape, dtype) in packed_tensor_specs(self.geometry).items():
            if suffix == "bias":
                self.bias = nn.Parameter(torch.empty(shape, dtype=bias_dtype or torch.float32, device=device),
                                         requires_grad=False)
            else:
                self.register_buffer(suffix, torch.zeros(shape, dtype=dtype, device=device))
        if not self.geometry["bias"]:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, n_high={self.n_high}, "
                f"bits_high={self.bits_high}, bits_low={self.bits_low}, group_size={self.group_size}")

    def permutation(self) -> torch.Tensor:
        """Original column of each stored column: high-impact columns, then the others in original order."""
        device = self.normal_scale.device if self.n_high < self.in_features else self.high_index.device
        if not self.n_high:
            return torch.arange(self.in_features, device=device)
        high = self.high_index.long()
        keep = torch.ones(self.in_features, dtype=torch.bool, device=device)
        keep[high] = False
        return torch.cat([high, keep.nonzero().flatten()])

    #: Output rows dequantised per step: bounds the float32 temporaries of a forward to a few MB per step.
    ROWS_PER_STEP = 256

    def _part_rows(self, part: str, width: int, bits: int, zero: torch.Tensor, rows: slice) -> torch.Tensor:
        """Float32 weights of rows ``rows`` of one part, ``(len(rows), width)``; ``zero`` = the part's unpacked
        ``(out, n_groups)`` zero points."""
        n = rows.stop - rows.start
        widths = group_widths(width, self.group_size)
        # codes are stored row-major, so a run of whole rows is a run of the stream; with b | 8 and whole bytes
        # per row it starts on a byte boundary, else unpack from the row-run's first full byte
        first, last = rows.start * width * bits, rows.stop * width * bits
        packed = getattr(self, f"{part}_codes")
        start_byte, skip = divmod(first, 8)
        if skip:  # a row-run not starting on a byte boundary (odd widths at 3 bits): unpack from the stream start
            codes = unpack_codes(packed, bits, rows.stop * width)[rows.start * width:]
        else:
            codes = unpack_codes(packed[start_byte: (last + 7) // 8], bits, n * width)
        codes = codes.view(n, width)
        zero = zero[rows]
        scale = getattr(self, f"{part}_scale")[rows].float()
        if len(widths) == 1:
            return (codes.float() - zero.float()) * scale
        reps = torch.tensor(widths, device=codes.device)
        return (codes.float() - zero.float().repeat_interleave(reps, dim=1)) * scale.repeat_interleave(reps, dim=1)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, in)`` weight in original column order, built ``ROWS_PER_STEP`` rows at a time (the float32
        values are exact: integer codes times float16 scales; then cast to ``dtype``)."""
        if self.kernel_ready:
            from hiq import kernels

            return kernels.dequantized_weight(self._kernel_parts(), kernels.cpu_layout(), self.in_features,
                                              self.out_features, dtype)
        parts = [(p, w, b) for p, (w, b) in _part_widths(self.geometry).items() if w]
        perm = self.permutation()
        ref = getattr(self, f"{parts[0][0]}_scale")
        weight = torch.empty(self.out_features, self.in_features, dtype=dtype, device=ref.device)
        zeros = {p: unpack_codes(getattr(self, f"{p}_zero"), b, getattr(self, f"{p}_scale").numel())
                 .view(self.out_features, -1) for p, _, b in parts}
        for r0 in range(0, self.out_features, self.ROWS_PER_STEP):
            rows = slice(r0, min(r0 + self.ROWS_PER_STEP, self.out_features))
            stored = torch.cat([self._part_rows(p, w, b, zeros[p], rows) for p, w, b in parts], dim=1)
            weight[rows] = torch.empty_like(stored).index_copy_(1, perm, stored).to(dtype)
        return weight

    # --- the kernel path (hiq.kernels) -------------------------------------------------------------------------

    #: True once :meth:`prepare_kernel` converted the layer to the int4 kernel's layout.
    kernel_ready = False

    def prepare_kernel(self) -> str | None:
        """Convert the packed buffers once to the int4 kernel's layout (:mod:`hiq.kernels`) and drop the bit-packed
        codes; returns None, or why the layer keeps the dequantising path (it then stays as loaded)."""
        from hiq import kernels

        if self.kernel_ready:
            return None
        reason = kernels.kernel_unsupported_reason(self.geometry)
        device = self.high_index.device if self.n_high else self.normal_scale.device
        if reason is None and device.type != "cpu":
            reason = f"its buffers are on {device} (the kernel layout is prepared on CPU; load, then move)"
        if reason is not None:
            return reason
        perm = self.permutation()
        columns = {"high": perm[:self.n_high], "normal": perm[self.n_high:]}
        for part, (width, bits) in _part_widths(self.geometry).items():
            if not width:
                continue
            scale = getattr(self, f"{part}_scale")
            zero = unpack_codes(getattr(self, f"{part}_zero"), bits, scale.numel()).view(self.out_features, -1)
            codes = unpack_codes(getattr(self, f"{part}_codes"), bits, self.out_features * width)
            widths = group_widths(width, self.group_size)
            prepared = kernels.prepare_part(codes.view(self.out_features, width), scale, zero, bits, columns[part],
                                            widths, kernels.kernel_group_size(width, self.group_size))
            del codes
            delattr(self, f"{part}_codes")
            delattr(self, f"{part}_zero")
            self.register_buffer(f"{part}_columns", prepared.columns)
            self.register_buffer(f"{part}_qweight", prepared.qweight)
            self.register_buffer(f"{part}_scale_zero", prepared.scale_zero)
            self.register_buffer(f"{part}_offset", prepared.offset)
            setattr(self, f"_{part}_meta", (prepared.widths, prepared.kernel_group))
        self.kernel_ready = True
        return None

    def _kernel_parts(self):
        from hiq.kernels import Int4Part

        parts = []
        for part, (width, _) in _part_widths(self.geometry).items():
            if width:
                widths, group = getattr(self, f"_{part}_meta")
                parts.append(Int4Part(columns=getattr(self, f"{part}_columns"),
                                      qweight=getattr(self, f"{part}_qweight"),
                                      scale_zero=getattr(self, f"{part}_scale_zero"),
                                      scale=getattr(self, f"{part}_scale"), offset=getattr(self, f"{part}_offset"),
                                      widths=widths, kernel_group=group))
        return parts

    def resident_bytes(self) -> int:
        """Bytes of the layer's tensors as held in memory now (buffers and bias)."""
        return sum(t.numel() * t.element_size() for t in self.buffers()) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def forward(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.kernel_ready:
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        from hiq import kernels

        if mode is None and x.device.type != "cpu":  # the CPU kernel only runs on CPU; the other paths anywhere
            mode = "exact" if x.dtype == torch.float32 else "dequant-gemm"
        return kernels.int4_linear(x, self._kernel_parts(), kernels.cpu_layout(), self.in_features,
                                   self.out_features, bias, mode)


def write_model_files(directory: Path, model: nn.Module, quantization_config: dict, dtype: torch.dtype,
                      tokenizer=None) -> None:
    """``config.json`` (the model's, with ``quantization_config`` and the stored dtype), the generation config and
    the tokenizer of a quantized checkpoint."""
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    config["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def unquantized_tensors(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state outside the quantized layers (``skip``), floats cast to ``dtype``; a tied weight (e.g.
    ``lm_head`` = ``embed_tokens``) once, under its first name."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        ident = (value.data_ptr(), value.dtype, tuple(value.shape))
        if value.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = (value.detach().to(dtype) if value.is_floating_point() else value.detach()).cpu().contiguous()
    return out


def save_packed(model: nn.Module, records: dict[str, LayerRecord], out_dir: str | Path, tokenizer=None,
                dtype: torch.dtype | None = None, info: dict | None = None) -> Path:
    """Write the packed checkpoint of ``model`` whose block linears ``records`` describe (full module name ->
    finished record); atomically (a temporary directory renamed into place). ``dtype``: of the unquantized tensors
    (default: the dtype the source checkpoint stores). ``info`` goes to ``hiq.json``."""
    from safetensors.torch import save_file

    from hiq.quant.bits import stored_dtype

    out_dir = Path(out_dir)
    if not records:
        raise ValueError("no quantized layers to pack (was the reconstruction run?)")
    dtype = dtype or stored_dtype(model)
    records = {name: LayerRecord.from_dict(r) for name, r in records.items()}  # a block file's form is read too
    modules = dict(model.named_modules())
    unknown = sorted(set(records) - set(modules))
    if unknown:
        raise ValueError(f"records for layers the model does not have: {unknown[:5]}")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    skip: set[str] = set()
    for name, record in records.items():
        module = modules[name]
        has_bias = getattr(module, "bias", None) is not None
        geometry = layer_geometry(record, has_bias)
        if (geometry["out_features"], geometry["in_features"]) != tuple(module.weight.shape):
            raise ValueError(f"record for {name} is {geometry['out_features']}x{geometry['in_features']}, the layer "
                             f"is {tuple(module.weight.shape)}")
        layers[name] = geometry
        for suffix, tensor in pack_layer(record).items():
            tensors[f"{name}.{suffix}"] = tensor
        if has_bias:
            tensors[f"{name}.bias"] = module.bias.detach().to(dtype).contiguous()
        skip.update({f"{name}.weight", f"{name}.bias"})
    tensors.update(unquantized_tensors(model, skip, dtype))
    tensors.update(load_guard(next(iter(records))))

    with staged_directory(out_dir) as tmp:
        # one metadata key: safetensors writes a metadata dict in hash order, so more keys would make the bytes
        # differ between two exports of the same weights
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        first = next(iter(records.values()))
        config = HiQConfig(layers=layers, bits=first.bits_low, bits_high=first.bits_high, group_size=first.group_size,
                           checksums={WEIGHTS_NAME: file_sha256(tmp / WEIGHTS_NAME)})
        write_model_files(tmp, model, config.to_dict(), dtype, tokenizer)
        write_manifest(tmp, {"format_version": FORMAT_VERSION, **(info or {})})
    return out_dir


def prepare_kernels(model: nn.Module) -> dict[str, str]:
    """Convert every :class:`PackedLinear` of a loaded model to the int4 kernel's layout (done by
    ``from_pretrained``); returns ``{layer: why it keeps the dequantising path}`` and warns once, naming them."""
    fallback: dict[str, str] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    for name, module in layers:
        reason = module.prepare_kernel()
        if reason is not None:
            fallback[name] = reason
    if fallback:
        by_reason: dict[str, list[str]] = {}
        for name, reason in fallback.items():
            by_reason.setdefault(reason, []).append(name)
        detail = "; ".join(f"{reason}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} ({len(names)})"
                           for reason, names in by_reason.items())
        warnings.warn(f"hiq: {len(fallback)} of {len(layers)} packed layers keep the dequantising path (slower: "
                      f"the float weight is rebuilt at every call) because {detail}", stacklevel=2)
    return fallback


def packed_average_bits(model: nn.Module) -> tuple[float, float, int] | None:
    """``(code bits, storage bits, layers)`` over a loaded model's :class:`PackedLinear` layers, per weight (storage:
    codes + an fp16 scale and a b-bit zero per row and group, the ``storage`` rule); None without any."""
    code = storage = numel = layers = 0
    for module in model.modules():
        if not isinstance(module, PackedLinear):
            continue
        layers += 1
        numel += module.in_features * module.out_features
        for part, (width, bits) in _part_widths(module.geometry).items():
            if width:
                groups = getattr(module, f"{part}_scale").numel()
                code += module.out_features * width * bits
                storage += module.out_features * width * bits + groups * (16 + bits)
    return (code / numel, storage / numel, layers) if layers else None


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``key -> (shape, safetensors dtype)`` of a safetensors file, checking the data is all there."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PackedFormatError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise PackedFormatError(f"{path}: header of {n} bytes does not fit in the file's {size} bytes "
                                    f"(truncated or not a safetensors file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise PackedFormatError(f"{path}: unreadable safetensors header ({err})") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end != size:
        raise PackedFormatError(f"{path}: the header describes {8 + n + end} bytes, the file has {size} "
                                f"(truncated or appended to)")
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}


_ST_DTYPES = {torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.float16: "F16"}


def check_checkpoint(directory: str | Path, config: HiQConfig | dict, files: list[str] | None = None) -> None:
    """Everything a load relies on, before any tensor is read: format version, each weight file's sha256 and
    length, and each layer's tensors present with the shape and dtype its geometry implies."""
    directory = Path(directory)
    cfg = config.to_dict() if isinstance(config, HiQConfig) else dict(config)
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise PackedFormatError(f"{directory / 'config.json'}: hiq format_version {version!r} is not known to this "
                                f"hiq (reads version {FORMAT_VERSION}); upgrade hiq or re-export the run with "
                                f"`hiq export RUN_DIR`")
    checksums = cfg.get("checksums") or {}
    names = [Path(f).name for f in files] if files else sorted(checksums)
    if not names:
        raise PackedFormatError(f"{directory / 'config.json'}: quantization_config lists no weight files")
    header: dict[str, tuple[tuple[int, ...], str]] = {}
    owner: dict[str, Path] = {}
    for name in names:
        path = directory / name
        if not path.is_file():
            raise PackedFormatError(f"{path}: missing (the config lists it)")
        expected = checksums.get(name)
        if expected is None:
            raise PackedFormatError(f"{path}: not listed in the config's checksums; the checkpoint was changed "
                                    f"after export")
        part = _read_header(path)
        actual = file_sha256(path)
        if actual != expected:
            raise PackedFormatError(f"{path}: sha256 {actual[:12]}... differs from the {expected[:12]}... recorded "
                                    f"at export; the file was modified or corrupted: re-export it")
        header.update(part)
        owner.update(dict.fromkeys(part, path))
    layers = cfg.get("layers") or {}
    if not layers:
        raise PackedFormatError(f"{directory / 'config.json'}: quantization_config has no layers")
    for layer, geometry in layers.items():
        try:
            specs = packed_tensor_specs(geometry)
        except (KeyError, TypeError) as err:
            raise PackedFormatError(f"{directory / 'config.json'}: layer {layer} has an incomplete geometry "
                                    f"({err})") from None
        for suffix, (shape, dtype) in specs.items():
            key = f"{layer}.{suffix}"
            if key not in header:
                raise PackedFormatError(f"{directory}: tensor {key} is missing from {', '.join(names)}")
            got_shape, got_dtype = header[key]
            if got_shape != shape or (dtype is not None and got_dtype != _ST_DTYPES[dtype]):
                want = f"{list(shape)} {_ST_DTYPES.get(dtype, 'float')}"
                raise PackedFormatError(f"{owner[key]}: tensor {key} is {list(got_shape)} {got_dtype}, the config's "
                                        f"geometry for {layer} ({geometry}) needs {want}")


# --- transformers integration ----------------------------------------------------------------------------------

def _config_base():
    from transformers.utils.quantization_config import QuantizationConfigMixin

    return QuantizationConfigMixin


class HiQConfig(_config_base()):
    """``quantization_config`` of a packed hiq checkpoint (``quant_method: hiq``)."""

    def __init__(self, layers: dict | None = None, bits: int | None = None, bits_high: int | None = None,
                 group_size: int | None = None, checksums: dict | None = None,
                 format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.bits, self.bits_high, self.group_size = bits, bits_high, group_size
        self.layers = dict(layers or {})
        self.checksums = dict(checksums or {})

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "bits": self.bits,
                "bits_high": self.bits_high, "group_size": self.group_size, "checksums": self.checksums,
                "layers": self.layers}


def _hf_quantizer_base():
    from transformers.quantizers.base import HfQuantizer

    return HfQuantizer


class HiQHfQuantizer(_hf_quantizer_base()):
    """Loads packed hiq checkpoints: checks the files, swaps the listed linears for :class:`PackedLinear`."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        version = self.quantization_config.format_version
        if version != FORMAT_VERSION:
            raise PackedFormatError(f"config.json: hiq format_version {version!r} is not known to this hiq (reads "
                                    f"version {FORMAT_VERSION}); upgrade hiq or re-export the run")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        files = [f for f in (checkpoint_files or []) if f]
        if files:
            check_checkpoint(Path(files[0]).parent, self.quantization_config, files)
        modules = dict(model.named_modules())
        # the load guard (:func:`load_guard`): PackedLinear has no ``weight``, so both tensors are unexpected keys
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
            rf"^{re.escape(GUARD_KEY)}$", *(rf"^{re.escape(n)}\.weight$" for n in self.quantization_config.layers)}
        for name, geometry in self.quantization_config.layers.items():
            old = modules.get(name)
            if old is None or not hasattr(old, "weight"):
                raise PackedFormatError(f"config.json: quantization_config names layer {name}, which the "
                                        f"{type(model).__name__} built from this config does not have")
            if tuple(old.weight.shape) != (geometry["out_features"], geometry["in_features"]):
                raise PackedFormatError(f"config.json: layer {name} is {tuple(old.weight.shape)} in the model but "
                                        f"{geometry['out_features']}x{geometry['in_features']} in "
                                        f"quantization_config")
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, PackedLinear(geometry, device=old.weight.device, bias_dtype=old.weight.dtype))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, module in model.named_modules():
            if isinstance(module, PackedLinear):
                for key, buf in module.named_buffers(recurse=False):
                    if buf.device.type == "meta":
                        raise PackedFormatError(f"{name}.{key} was not loaded from the checkpoint")
        prepare_kernels(model)
        return model

    def is_serializable(self, *args, **kwargs):
        # asked by save_pretrained only: the config's checksums describe the exported files and a re-save would
        # not match them, so it is refused with what to do instead of transformers' generic "not serializable"
        raise ValueError("a model loaded from a hiq packed checkpoint cannot be saved with save_pretrained: the "
                         "packed directory it was loaded from is already the deployable checkpoint (copy that "
                         "directory), or write a new one from the run with `hiq export RUN_DIR` "
                         "(hiq.api.export_run); hiq eval / generate read the packed directory as it is")

    @property
    def is_trainable(self):
        return False


def register() -> None:
    """Make ``quant_method: hiq`` known to transformers (idempotent); ``import hiq`` calls it."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not HiQConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(HiQConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not HiQHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(HiQHfQuantizer)

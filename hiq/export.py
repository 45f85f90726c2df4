"""The checkpoints of a run, one path for ``hiq fit``'s export stage and for ``hiq export``.

A run's quantized weights are its block records (``blocks/block_XX.safetensors``: per layer the integer codes,
scales, zero points and the column permutation, :class:`hiq.quant.record.LayerRecord`) and, when the end-to-end
tuning kept its result, the tuned scales (``tuning.safetensors``). :func:`read_block_records` gathers them by full
module name; :func:`write_checkpoint` writes one format of :data:`hiq.recipe.EXPORT_FORMATS`:

- ``packed``: the deployable checkpoint (:mod:`hiq.packed`, loaded by ``from_pretrained`` after ``import hiq``);
- ``compressed-tensors``: vLLM's format for single-width runs (:mod:`hiq.compressed`);
- ``dequantized``: ``model/``, a plain ``save_pretrained`` checkpoint of the dequantised weights (the model in
  memory; written in the source model's dtype unless ``export.dtype`` says otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from hiq.artifacts import ArtifactError, RunDir, load_tensors, staged_directory, write_manifest
from hiq.quant.record import LayerRecord
from hiq.recipe import digest

#: The note every dequantised ``model/`` carries in its ``hiq.json``.
DEQUANTIZED_NOTE = "weights are dequantised; the packed checkpoint (export.formats: packed) holds the integer codes"


def read_block_records(run: RunDir, layout, model: nn.Module, n_blocks: int,
                       expected_keys: list[str] | None = None) -> tuple[dict[str, LayerRecord], list[str]]:
    """Every reconstructed layer's record keyed by full module name, from ``blocks/`` of ``run``, and each block's
    key. ``expected_keys``: the keys this run computed (the export stage), checked against each file's; without
    them (``hiq export``) the caller checks the keys against ``metrics.json``. A damaged file raises ``ValueError``
    naming it, a block of another run ``RuntimeError``."""
    records: dict[str, LayerRecord] = {}
    keys: list[str] = []
    for b in range(n_blocks):
        path = run.block(b)
        try:
            saved = load_tensors(path)
        except ArtifactError as err:
            raise ValueError(f"{err}; rerun hiq fit on the run directory to recompute it") from None
        if expected_keys is not None and saved.get("key") != expected_keys[b]:
            raise RuntimeError(f"{path} does not hold block {b} of this run (changed on disk since the "
                               f"reconstruction); rerun to recompute it")
        keys.append(saved["key"])
        for local, record in saved["layers"].items():
            records[layout.full_name(model, b, local)] = LayerRecord.from_dict(record)
    return records, keys


def weights_digest(model_name: str, block_keys: list[str], fingerprint: str | None = None,
                   tuning_key: str | None = None) -> str:
    """The key of a model's weights: its name and fingerprint, the keys of its reconstructed blocks and, when the
    scales were tuned end to end, the tuning's key (``metrics.json``)."""
    payload = {"model": model_name, "fingerprint": fingerprint, "blocks": list(block_keys) or None}
    if tuning_key is not None:  # runs without the tuning keep the key they always had
        payload["tuning"] = tuning_key
    return digest(payload)


def finished_weights(run: RunDir, fp_model: nn.Module, source: str, fingerprint: str,
                     metrics: dict) -> tuple[dict[str, LayerRecord], str]:
    """A finished run's records (``blocks/``, with ``tuning.safetensors``' scales when they belong to these
    weights) and the key of those weights, checked against ``metrics.json``'s (``metrics``; ``{}`` when it is
    missing): what ``hiq export`` writes. ``ValueError`` naming the file and the fix otherwise."""
    from hiq.layouts import layout_for

    layout = layout_for(fp_model)
    n_blocks = len(layout.blocks_of(fp_model))
    paths = sorted((run.root / "blocks").glob("block_*.safetensors"))
    expected = [run.block(b) for b in range(n_blocks)]
    if paths != expected:
        missing = [p.name for p in expected if p not in paths]
        raise ValueError(f"{run.root / 'blocks'}: {source} has {n_blocks} blocks; missing {missing or 'none'}, "
                         f"extra {[p.name for p in paths if p not in expected] or 'none'}: finish the run first")
    records, keys = read_block_records(run, layout, fp_model, n_blocks)
    weights_key = weights_digest(source, keys, fingerprint)
    if run.tuning.is_file():  # end-to-end tuned scales (hiq.tuning), when they belong to these weights
        try:
            tuning = load_tensors(run.tuning)
        except ArtifactError as err:
            raise ValueError(f"{err}; rerun hiq fit on the run directory to recompute it") from None
        tuned_key = weights_digest(source, keys, fingerprint, tuning["key"])
        if metrics.get("weights_key") in (None, tuned_key):
            records, weights_key = with_tuned_scales(records, tuning["scales"]), tuned_key
    if metrics.get("weights_key") not in (None, weights_key):
        raise ValueError(f"{run.root / 'blocks'} does not hold the weights {run.metrics} describes (key "
                         f"{weights_key} != {metrics['weights_key']}); rerun hiq fit on the run directory")
    return records, weights_key


def with_tuned_scales(records: dict[str, LayerRecord], scales: dict[str, dict]) -> dict[str, LayerRecord]:
    """The records with the end-to-end tuning's scales (``tuning.safetensors``' ``scales``) in place of theirs."""
    return {name: record.with_scales(scales[name]) for name, record in records.items()}


def write_checkpoint(fmt: str, model: nn.Module, records: dict[str, LayerRecord], target: str | Path, tokenizer,
                     info: dict) -> None:
    """Write format ``fmt`` (``packed`` or ``compressed-tensors``) of ``model`` with ``records`` to ``target``;
    ``info`` goes into its manifest (the key of the weights, the setting, the recipe, the source model)."""
    if fmt == "packed":
        from hiq.packed import save_packed

        save_packed(model, records, target, tokenizer=tokenizer, info=info)
    elif fmt == "compressed-tensors":
        from hiq.compressed import save_compressed_tensors

        save_compressed_tensors(model, records, target, tokenizer=tokenizer, info=info)
    else:
        raise ValueError(f"format {fmt!r}: write_checkpoint writes packed or compressed-tensors; the dequantised "
                         f"model/ is write_dequantized's")


def write_dequantized(model: nn.Module, tokenizer, target: str | Path, dtype, info: dict) -> None:
    """``save_pretrained`` of the model as it is in memory (its dequantised weights), in ``dtype``, with ``hiq.json``
    carrying ``info``. The model itself is not touched: each tensor is cast on its own (one that already has
    ``dtype`` is written as it is), so the weights the run evaluates next are still exactly the packed checkpoint's
    (casting the model to float16 and back rounded every float32 weight to float16: metrics.json then scored the
    model/ copy, up to 1e-5 off packed/)."""
    dtype_name = str(dtype).removeprefix("torch.")
    cast: dict[tuple, torch.Tensor] = {}  # a tied weight stays one tensor, so save_pretrained still sees the tie

    def as_dtype(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or t.dtype == dtype:
            return t.detach()
        ident = (t.data_ptr(), tuple(t.shape))
        if ident not in cast:
            cast[ident] = t.detach().to(dtype)
        return cast[ident]

    state = {k: as_dtype(v) for k, v in model.state_dict().items()}
    own_dtype = model.config.dtype
    with staged_directory(Path(target)) as tmp:
        try:
            model.save_pretrained(tmp, state_dict=state)
        finally:
            model.config.dtype = own_dtype  # save_pretrained writes the model's own dtype into the config
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = dtype_name
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, {**info, "dtype": dtype_name, "note": DEQUANTIZED_NOTE})


def dir_megabytes(path: str | Path) -> float:
    """The size of the files below ``path``, MB."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6

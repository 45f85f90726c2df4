"""One validation pass before any heavy work, for ``hiq fit`` and ``hiq eval`` alike, and the run folder's
manifest (``run.json``) that keeps one folder to one run.

Everything here is cheap (files, JSON, a tokenizer at most); it raises :class:`UserError` (a ``ValueError``)
whose message names the bad value and the fix. The CLI prints it as one line and exits 2.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hiq.artifacts import RunDir, load_json, save_json


class UserError(ValueError):
    """A mistake in what the user asked for (a value, a path); the message says which and how to fix it."""


def launcher() -> bool:
    """This process is the one the user started (not a DDP child that re-runs the command line)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def check_model_dir(path: str) -> str:
    """The resolved model path; a local folder must hold a readable ``config.json``, weights and a tokenizer."""
    from hiq.model import ModelLoadError, resolve_model_path

    try:
        resolved = resolve_model_path(path)
    except ModelLoadError as err:
        raise UserError(str(err)) from None
    folder = Path(resolved)
    if not folder.is_dir():
        return resolved  # a hub id: transformers resolves it (offline: from the cache)
    try:
        config = load_json(folder / "config.json")
    except (ValueError, OSError) as err:
        raise UserError(f"model path {path!r}: config.json is not readable JSON ({err}); write the folder with "
                        f"save_pretrained") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"model path {path!r}: config.json has no model_type; it is not a transformers config")
    if not any(next(folder.glob(p), None) for p in WEIGHT_PATTERNS):
        raise UserError(f"model path {path!r} holds config.json but no weights (model.safetensors or "
                        f"pytorch_model.bin); save the model there with model.save_pretrained({path!r})")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"model path {path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}); save it "
                        f"there too with tokenizer.save_pretrained({path!r})")
    return resolved


def model_context(resolved: str) -> int | None:
    """``max_position_embeddings`` of a local model folder (None when unknown)."""
    config = Path(resolved) / "config.json"
    if config.is_file():
        value = load_json(config).get("max_position_embeddings")
        return int(value) if value else None
    return None


def check_writable(path: str | Path, what: str, directory: bool = True) -> None:
    """``path`` can be created or written: its nearest existing ancestor is a writable directory (nothing is
    created here). A file where a directory is wanted, or the reverse, is an error too."""
    path = Path(path).expanduser()
    if path.exists():
        if directory and not path.is_dir():
            raise UserError(f"{what} {str(path)!r} is a file, not a directory; choose another path")
        if not directory and path.is_dir():
            raise UserError(f"{what} {str(path)!r} is a directory; give a file path (e.g. {path / 'result.json'})")
    probe = path if (directory and path.exists()) else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {str(path)!r}: {str(probe)!r} is a file, so nothing can be created under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r} is not writable ({str(probe)!r} does not allow this user to write); "
                        f"choose a writable location")


def check_calibration_text(tokens: int, nsamples: int, seqlen: int, dataset: str) -> None:
    """The calibration text holds ``nsamples`` x ``seqlen`` tokens (fewer: windows would overlap and repeat)."""
    if tokens <= seqlen + 1:
        fit = max(tokens - 2, 0)
        raise UserError(f"calibration text {dataset!r} has {tokens} tokens, too few for one window of "
                        f"data.seqlen={seqlen}; give more text" + (f" or lower data.seqlen to at most {fit}" if fit
                                                                      >= 2 else ""))
    if tokens < nsamples * seqlen:
        raise UserError(f"calibration text {dataset!r} has {tokens} tokens, fewer than data.nsamples x data.seqlen "
                        f"= {nsamples} x {seqlen} = {nsamples * seqlen} (the windows would overlap and repeat); "
                        f"lower data.nsamples to at most {max(tokens // seqlen, 1)} or data.seqlen to at most "
                        f"{max(tokens // nsamples, 2)}, or give more text")


def world_size_of(trainer: dict) -> int:
    """Processes a ``Trainer(**trainer)`` would run (``devices`` x ``num_nodes``); 1 for ``auto`` on one device."""
    devices, nodes = trainer.get("devices", "auto"), int(trainer.get("num_nodes") or 1)
    if isinstance(devices, list | tuple):
        n = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.strip().lstrip("-").isdigit()):
        n = int(devices)
        if n == -1:
            n = _available_devices(trainer.get("accelerator")) or 1
    else:  # "auto": every visible GPU (Lightning's choice), one process on a CPU
        n = 1 if str(trainer.get("accelerator") or "auto") == "cpu" else _available_devices("cuda")
    return max(n, 1) * nodes


def _available_devices(accelerator) -> int:
    import torch

    if str(accelerator) in ("cuda", "gpu", "auto"):
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    return os.cpu_count() or 1


def check_trainer(trainer: dict) -> int:
    """The accelerator exists and has the devices asked for; returns the number of processes."""
    import torch

    accelerator = str(trainer.get("accelerator") or "auto")
    devices = trainer.get("devices", "auto")
    if accelerator in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise UserError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU; use "
                            f"--trainer.accelerator=cpu")
        have = torch.cuda.device_count()
        if isinstance(devices, int) and devices > have:
            raise UserError(f"trainer.devices={devices} but this machine has {have} CUDA GPU(s); ask for at most "
                            f"{have}")
    if isinstance(devices, int) and devices == 0:
        raise UserError("trainer.devices=0; give at least 1 (or auto)")
    return world_size_of(trainer)


def check_offload_processes(offload: bool, world_size: int) -> None:
    """``model.offload`` (the weights in host memory, :mod:`hiq.offload`) runs on one process."""
    if offload and world_size > 1:
        raise UserError(f"model.offload (the weights in host memory) runs on one process; this run has {world_size} "
                        f"(trainer.devices x num_nodes): use --trainer.devices=1, or --model.offload=false where "
                        f"the model fits each device")


def check_divisible(name: str, batch_size: int, world_size: int) -> None:
    """A batch (``name``, over all processes) splits evenly over the ``world_size`` processes."""
    if batch_size % world_size:
        raise UserError(f"{name}={batch_size} is not divisible by the {world_size} processes "
                        f"(trainer.devices x num_nodes); use a multiple of {world_size}")


def check_batches(batch_size: int, windows: int, world_size: int) -> None:
    """The reconstruction batch splits evenly over the processes and fits into the windows each one gets."""
    check_divisible("reconstruction.batch_size", batch_size, world_size)
    if world_size > 1 and windows // world_size < batch_size // world_size:
        raise UserError(f"reconstruction.batch_size={batch_size} over {world_size} processes needs "
                        f"{batch_size // world_size} windows per process but each gets {windows // world_size} "
                        f"of the {windows}; raise data.nsamples or lower reconstruction.batch_size")


# ----------------------------------------------------------------------------------------------------------
# The run folder: one run per folder


#: The run folder's manifest: the model, recipe and calibration its artifacts come from (another value of any
#: of these is another run).
MANIFEST = RunDir.ENTRIES["manifest"]
#: Everything hiq writes into a run folder (``--overwrite`` removes exactly these).
ARTIFACTS = tuple(RunDir.ENTRIES.values())


def run_manifest(model: str, recipe: dict, calibration: dict) -> dict:
    return {"model": model, "recipe": recipe, "calibration": calibration}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def manifest_differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs; a recipe field added since ``old`` was written
    (:data:`hiq.recipe.LATER_FIELDS`) and set to the value that behaves as before is no difference."""
    from hiq.recipe import as_before

    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(unset)") != b.get(k, "(unset)") and not (k not in a and as_before(k, b[k]))]


def prepare_run_folder(root: str | Path, manifest: dict, overwrite: bool = False, write: bool = True) -> str:
    """Claim ``root`` for the run ``manifest`` describes: a new folder or one holding this same run (resume) is
    fine; one holding another run is refused, naming the differing keys, unless ``overwrite`` (then hiq's
    artifacts in it are removed first). Returns ``new``, ``resume``, ``overwritten`` or ``adopted`` (artifacts but
    no ``run.json``: each is reused only if its key and checksum match); writes ``run.json`` when ``write``."""
    root = Path(root)
    check_writable(root, "run directory (trainer.default_root_dir)")
    path = root / MANIFEST
    status = "new"
    if path.is_file():
        try:
            old = load_json(path, sealed=True)
            old = {k: old.get(k) for k in manifest}
        except ValueError as err:
            old = {"unreadable": str(err)}
        diff = manifest_differences(old, manifest)
        if not diff:
            if write:
                remove_leftovers(root)
            return "resume"
        if not overwrite:
            shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise UserError(f"run directory {str(root)!r} holds another run ({shown}); choose another directory "
                            f"(--trainer.default_root_dir) or replace that run with --overwrite=true")
        status = "overwritten"
    elif any((root / name).exists() for name in ARTIFACTS[1:]):
        status = "overwritten" if overwrite else "adopted"
    if status == "overwritten" and write:
        for name in ARTIFACTS:
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if write:
        remove_leftovers(root)
        save_json(path, manifest, sealed=True)
    return status


def remove_leftovers(root: Path) -> list[Path]:
    """Temporary files and directories a killed run left (``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``: every
    artifact is written beside its place, then renamed); removed before a run resumes in ``root``."""
    found = [p for pattern in (".*.tmp-*", ".*.old-*", "*/.*.tmp-*", "*/.*.old-*") for p in root.glob(pattern)]
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return found


# ----------------------------------------------------------------------------------------------------------
# Host memory: a model too large for this machine is refused before it is loaded, not killed half-way

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
#: a block fit's host working set on CPU, in bytes per weight of the block (the quantizers' permuted bf16 copy, float32
#: offsets, one layer's gradients, the saved bf16 weights, one chunk's recomputed fake-quant intermediates,
#: activations, heap not yet given back): set so that the estimate covers the measured peaks of the LLaMA-2-7B-shaped
#: slices (2 blocks 3.89 GiB against 4.05 estimated, 4 blocks 4.56 against 4.81; benchmarks/results/shaped_7b_cpu.md)
FIT_BYTES_PER_BLOCK_WEIGHT = 12
#: libraries (torch, transformers, lightning) and caches of a small calibration set
FIT_BASE_BYTES = 1 << 30


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, int]]:
    """``{tensor name: (elements, bytes as stored)}`` from the safetensors headers of a model folder (nothing is
    loaded); empty when the folder has no safetensors files."""
    import json
    import struct

    shapes: dict[str, tuple[int, int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in meta["shape"]:
                n *= d
            shapes[name] = (n, n * _SAFETENSORS_BYTES.get(meta["dtype"], 4))
    return shapes


def estimate_fit_memory(resolved: str, dtype_bytes: int, block_on_host: bool = True) -> dict[str, int] | None:
    """Peak host bytes of ``hiq fit`` on the model folder ``resolved`` loaded at ``dtype_bytes`` per weight: the
    model, plus one block's fit working set when blocks are fitted on the CPU, plus libraries. None when the folder
    has no safetensors (a hub id, .bin weights): then nothing is estimated."""
    import re

    folder = Path(resolved)
    shapes = checkpoint_shapes(folder) if folder.is_dir() else {}
    if not shapes:
        return None
    per_block: dict[str, int] = {}
    for name, (n, _) in shapes.items():
        m = re.search(r"\.(\d+)\.", name)
        if m:
            per_block[m.group(1)] = per_block.get(m.group(1), 0) + n
    model = sum(n for n, _ in shapes.values()) * dtype_bytes
    block_weights = max(per_block.values(), default=0)
    working = block_weights * FIT_BYTES_PER_BLOCK_WEIGHT if block_on_host else 0
    return {"model_bytes": model, "block_weights": block_weights, "working_bytes": working,
            "peak_bytes": model + working + FIT_BASE_BYTES}


def available_host_bytes() -> int:
    """Memory this process can still take: the system's available memory, or less under a cgroup limit."""
    import psutil

    available = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def check_host_memory(resolved: str, dtype_bytes: int, block_on_host: bool, available: int | None = None) -> None:
    """Refuse a fit whose estimated peak (:func:`estimate_fit_memory`) exceeds the host memory left, before the
    model is loaded. ``HIQ_SKIP_MEMORY_CHECK=1`` skips it (an estimate can be wrong for an unusual model)."""
    if os.environ.get("HIQ_SKIP_MEMORY_CHECK") == "1":
        return
    estimate = estimate_fit_memory(resolved, dtype_bytes, block_on_host)
    if estimate is None:
        return
    available = available_host_bytes() if available is None else available
    if estimate["peak_bytes"] > available:
        gib = 2**30
        where = (f" + one block's fit working set on the CPU {estimate['working_bytes'] / gib:.1f} GiB"
                 if block_on_host else "")
        raise UserError(
            f"model {resolved!r} needs about {estimate['peak_bytes'] / gib:.1f} GiB of host memory to quantize "
            f"(weights {estimate['model_bytes'] / gib:.1f} GiB at {dtype_bytes} bytes each{where} + "
            f"{FIT_BASE_BYTES / gib:.0f} GiB libraries and caches); {available / gib:.1f} GiB is available. Use a "
            f"machine with more memory, load it in bfloat16 (--model.dtype=bfloat16) if it is not, or set "
            f"HIQ_SKIP_MEMORY_CHECK=1 to try anyway")


_CLAIMED: set[tuple[str, str]] = set()


def claim_run_folder(root, model_name: str, recipe, calibration,
                     overwrite: bool = False, check_only: bool = False) -> str:
    """One run per folder (:func:`hiq.checks.prepare_run_folder`); DDP children only check, the launcher writes.
    ``check_only``: raise if the folder holds another run (and no ``overwrite``), change nothing."""
    manifest = run_manifest(model_name, recipe.run_dict(), asdict(calibration))
    if check_only:
        return prepare_run_folder(root, manifest, overwrite, write=False)
    claim = (str(Path(root).resolve()), json.dumps(manifest, sort_keys=True))
    if claim in _CLAIMED:  # hiq fit claimed it while validating, before the model loaded
        return "claimed"
    writes = launcher()
    status = prepare_run_folder(root, manifest, overwrite, write=writes)
    _CLAIMED.add(claim)
    if writes and status != "new":
        print(f"[hiq] run directory {root}: " + {
            "resume": "same run found; finished stages are reused after their checks",
            "overwritten": "another run's artifacts removed (--overwrite)",
            "adopted": "artifacts without run.json found; each is reused only if its key and checksum match"}[status],
            file=sys.stderr)
    return status


def check_windows(recipe, nsamples: int, world_size: int = 1) -> None:
    """Before any heavy work: the stages ask for no more calibration windows than there are."""
    rec, sens = recipe.reconstruction, recipe.sensitivity
    if rec.enabled:
        windows = min(rec.nsamples or nsamples, nsamples)
        check_batches(rec.batch_size, windows, world_size)
        if rec.batch_size > windows:
            raise ValueError(f"reconstruction.batch_size={rec.batch_size} is larger than the {windows} calibration "
                             f"windows the block fits get (data.nsamples={nsamples}"
                             + (f", reconstruction.nsamples={rec.nsamples}" if rec.nsamples else "")
                             + f"); lower reconstruction.batch_size to at most {windows} or raise data.nsamples")
        if rec.tune_steps and rec.tune_batch_size > windows:
            raise ValueError(f"reconstruction.tune_batch_size={rec.tune_batch_size} is larger than the {windows} "
                             f"calibration windows the end-to-end tuning gets; lower it to at most {windows}, raise "
                             f"data.nsamples, or set reconstruction.tune_steps=0 (no tuning)")
    if sens.enabled and recipe.ratios.mode == "optimal" and sens.nsamples > nsamples:
        raise ValueError(f"sensitivity.nsamples={sens.nsamples} is larger than data.nsamples={nsamples}; lower it "
                         f"or raise data.nsamples")


def default_run_dir(name: str, now: str | None = None) -> str:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``: one directory per run."""
    return str(Path("runs") / f"{name}-{now or time.strftime('%Y%m%d-%H%M%S')}")

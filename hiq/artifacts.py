"""The run directory: every artifact is written atomically (temporary file, then ``os.replace``), so a run
that stops anywhere leaves only complete files behind and a restart can trust what it finds."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_directory(target: str | Path):
    """Write a directory atomically: yields an empty temporary sibling; on success it replaces ``target`` (files
    0644, folder 0755: readable like any output); on an error it is removed and ``target`` stays as it was."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.chmod(0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ArtifactError(ValueError):
    """An artifact that cannot be trusted: unreadable, truncated, or its content no longer matches its checksum."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def _canonical(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def save_json(path: str | Path, payload: Any, sealed: bool = False) -> None:
    """JSON, atomically. ``sealed``: the dict also carries ``checksum`` (sha256 of its canonical form), checked by
    :func:`load_json` ``(sealed=True)`` so an edited or damaged file is never reused."""
    if sealed:
        payload = {k: v for k, v in payload.items() if k != "checksum"}
        payload["checksum"] = hashlib.sha256(_canonical(payload)).hexdigest()
    atomic_write_bytes(Path(path), (json.dumps(payload, indent=2) + "\n").encode())


def load_json(path: str | Path, sealed: bool = False) -> Any:
    """The JSON at ``path``; ``sealed``: raises :class:`ArtifactError` unless its ``checksum`` matches."""
    try:
        payload = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(path, f"not valid JSON ({err})") from None
    if sealed:
        if not isinstance(payload, dict) or "checksum" not in payload:
            raise ArtifactError(path, "has no checksum")
        body = {k: v for k, v in payload.items() if k != "checksum"}
        if hashlib.sha256(_canonical(body)).hexdigest() != payload["checksum"]:
            raise ArtifactError(path, "content does not match its checksum (edited or damaged)")
    return payload


TREE, CHECKSUM = "hiq_tree", "hiq_checksum"


def _flatten(node: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``node`` with each tensor replaced by ``{"tensor": name}`` (its safetensors entry)."""
    if isinstance(node, torch.Tensor):
        tensors[name] = node.detach().cpu().contiguous().clone()
        return {"tensor": name}
    if isinstance(node, dict):
        if not all(isinstance(k, str) for k in node):
            raise TypeError(f"{name or 'payload'}: artifact dict keys must be strings")
        return {"dict": {k: _flatten(v, f"{name}/{k}" if name else k, tensors) for k, v in node.items()}}
    if isinstance(node, list | tuple):
        return {"list": [_flatten(v, f"{name}/{i}", tensors) for i, v in enumerate(node)]}
    if node is None or isinstance(node, bool | int | float | str):
        return {"value": node}
    raise TypeError(f"{name}: cannot store a {type(node).__name__} in an artifact")


def _unflatten(node: dict, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _unflatten(v, tensors) for k, v in node["dict"].items()}
    if "list" in node:
        return [_unflatten(v, tensors) for v in node["list"]]
    return node["value"]


def tensors_checksum(tensors: dict[str, torch.Tensor], tree: str) -> str:
    """sha256 over the skeleton and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(tree.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_tensors(path: str | Path, payload: dict) -> None:
    """A dict of tensors, numbers, strings and lists/dicts of them as one safetensors file, atomically: tensors
    under their path (``layers/q_proj/high/codes``), the rest as a JSON skeleton in the header, plus a sha256 of
    both that :func:`load_tensors` checks."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_flatten(payload, "", tensors), separators=(",", ":"))
    metadata = {"format": "pt", TREE: tree, CHECKSUM: tensors_checksum(tensors, tree)}
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def load_tensors(path: str | Path) -> dict:
    """What :func:`save_tensors` wrote; :class:`ArtifactError` (naming the file) when it is truncated, not a
    safetensors file, or its content no longer matches the checksum."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    data = path.read_bytes()
    try:
        if len(data) < 8:
            raise ValueError(f"{len(data)} bytes, shorter than a safetensors header")
        n = int.from_bytes(data[:8], "little")
        if n > len(data) - 8:
            raise ValueError(f"header of {n} bytes but only {len(data) - 8} follow (truncated)")
        metadata = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        tensors = load(data)
    except (ValueError, SafetensorError, UnicodeDecodeError) as err:
        raise ArtifactError(path, f"not a readable safetensors file ({err})") from None
    if TREE not in metadata or CHECKSUM not in metadata:
        raise ArtifactError(path, "not a hiq artifact (no hiq_tree/hiq_checksum in its header)")
    if tensors_checksum(tensors, metadata[TREE]) != metadata[CHECKSUM]:
        raise ArtifactError(path, "content does not match its checksum (damaged or modified)")
    return _unflatten(json.loads(metadata[TREE]), tensors)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def directory_files(root: str | Path, manifest: str = "hiq.json") -> dict[str, str]:
    """sha256 of every file under ``root`` but ``manifest``, by relative path."""
    root = Path(root)
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != manifest}


def write_manifest(directory: str | Path, info: dict) -> None:
    """``hiq.json`` of an exported directory, written last: ``info`` plus the sha256 of every other file, sealed."""
    directory = Path(directory)
    save_json(directory / "hiq.json", {**info, "files": directory_files(directory)}, sealed=True)


def manifest_problem(directory: str | Path, key: str) -> str | None:
    """Why the exported ``directory`` cannot be reused under ``key`` (None: it can): missing or edited
    ``hiq.json``, another key, or a file missing, added or changed since it was written."""
    directory = Path(directory)
    path = directory / "hiq.json"
    if not path.is_file():
        return "no hiq.json" if directory.exists() else "not written yet"
    try:
        manifest = load_json(path, sealed=True)
    except ArtifactError as err:
        return err.reason
    if manifest.get("key") != key:
        return "written from other weights or options"
    files = directory_files(directory)
    recorded = manifest.get("files") or {}
    changed = sorted(set(files) ^ set(recorded)) + sorted(f for f in files if f in recorded and files[f] != recorded[f])
    if changed:
        return f"files changed since export: {', '.join(changed[:4])}" + (" ..." if len(changed) > 4 else "")
    return None


class RunDir:
    """The one list of what a run directory holds (:data:`ENTRIES`) and the path of each artifact in it."""

    #: Every file and folder hiq writes into a run directory, in the order the stages write them (``--overwrite``
    #: removes exactly these; the export folders are :data:`hiq.recipe.EXPORT_FORMATS`' values).
    ENTRIES = {"manifest": "run.json", "fisher": "fisher.safetensors", "sensitivity": "sensitivity",
               "ratios": "ratios.json", "plots": "plots", "blocks": "blocks", "tuning": "tuning.safetensors",
               "model": "model", "packed": "packed", "compressed-tensors": "compressed-tensors", "eval": "eval",
               "metrics": "metrics.json"}

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __getattr__(self, name: str) -> Path:  # run.fisher, run.ratios, run.tuning, run.metrics, run.model, ...
        if name in RunDir.ENTRIES:
            return self.root / RunDir.ENTRIES[name]
        raise AttributeError(f"a run directory has no {name!r}; it holds {', '.join(RunDir.ENTRIES)}")

    def sensitivity(self, block: int) -> Path:
        """The matrix M of one block (:mod:`hiq.sensitivity`)."""
        return self.root / "sensitivity" / f"block_{block:02d}.safetensors"

    def block(self, block: int) -> Path:
        """Finished block: integer codes, scales, zeros and permutation of its linears, plus losses."""
        return self.root / "blocks" / f"block_{block:02d}.safetensors"

    def evaluation(self, name: str) -> Path:
        return self.root / "eval" / f"{name}.json"


def peak_memory_mb() -> dict[str, float]:
    """This process's peak resident memory (and peak CUDA allocation, where a GPU was used), in MiB."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mb": round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out

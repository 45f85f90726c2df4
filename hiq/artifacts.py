"""The run directory: every artifact is written atomically (temporary file, then ``os.replace``), so a run
that stops anywhere leaves only complete files behind and a restart can trust what it finds."""

from __future__ import annotations

import contextlib
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


def save_json(path: str | Path, payload: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(payload, indent=2) + "\n").encode())


def load_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: str | Path, payload: dict) -> None:
    """``torch.save`` of plain containers of tensors/numbers/strings, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_tensors(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class RunDir:
    """Names of the artifacts inside one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def fisher(self) -> Path:
        return self.root / "fisher.pt"

    def sensitivity(self, block: int) -> Path:
        return self.root / "sensitivity" / f"block_{block:02d}.pt"

    @property
    def ratios(self) -> Path:
        return self.root / "ratios.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def block(self, block: int) -> Path:
        """Finished block: integer codes, scales, zeros and permutation of its linears, plus losses."""
        return self.root / "blocks" / f"block_{block:02d}.pt"

    def evaluation(self, name: str) -> Path:
        return self.root / "eval" / f"{name}.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def model(self) -> Path:
        return self.root / "model"


def peak_memory_mb() -> dict[str, float]:
    """This process's peak resident memory (and peak CUDA allocation, where a GPU was used), in MiB."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mb": round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out

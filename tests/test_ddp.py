"""Two DDP processes (gloo, CPU) give the same Fisher scores and ratios as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_fit_ratios import SMALL

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, name: str, *extra: str) -> Path:
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    run = tmp_path / name
    exe = Path(sys.executable).parent / "hiq"
    env = {k: v for k, v in os.environ.items() if k not in ("HIQ_RUN_DIR", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    proc = subprocess.run([str(exe), "fit", "--config", str(cfg), f"--trainer.default_root_dir={run}", *extra],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_two_processes_match_one(tmp_path):
    one = _run(tmp_path, "one")
    two = _run(tmp_path, "two", "--trainer.devices=2", "--trainer.strategy=ddp")
    f1 = torch.load(one / "fisher.pt", weights_only=True)
    f2 = torch.load(two / "fisher.pt", weights_only=True)
    assert f1["samples"] == f2["samples"] == SMALL["data"]["nsamples"]
    for name, s in f1["scores"].items():
        torch.testing.assert_close(f2["scores"][name], s, rtol=1e-5, atol=0)
    r1, r2 = (json.loads((d / "ratios.json").read_text()) for d in (one, two))
    assert [x["ratio"] for x in r1["layers"]] == [x["ratio"] for x in r2["layers"]]

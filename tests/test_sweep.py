"""The W&B sweep file: the command line an agent would run, offline, on the tiny config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHRINK = ["--data.nsamples=4", "--data.seqlen=64", "--sensitivity.nsamples=2", "--reconstruction.iterations=4",
          "--reconstruction.batch_size=2",
             "--reconstruction.tune_steps=2", "--evaluation.datasets=[wikitext2]", "--evaluation.seqlen=64",
          "--evaluation.max_windows=2", "--export.enabled=false", "--trainer.accelerator=cpu"]


def agent_command(sweep: dict, choice: int = 0) -> list[str]:
    """What ``wandb agent`` runs: the sweep's command with ${env} dropped and ${args} as --key=value."""
    args = [f"--{k}={v['values'][choice]}" for k, v in sweep["parameters"].items()]
    cmd = []
    for part in sweep["command"]:
        if part == "${env}":
            continue
        cmd.extend(args if part == "${args}" else [part])
    return cmd


def test_sweep_command_runs_offline_and_logs_into_the_run_dir(tmp_path):
    sweep = yaml.safe_load((ROOT / "configs/sweeps/tiny-w2.yaml").read_text())
    assert sweep["program"] == "hiq" and "${args}" in sweep["command"]
    cmd = agent_command(sweep, choice=0)
    assert cmd[:3] == ["hiq", "fit", "--config"] and "--ratios.target_avg_bits=2.05" in cmd
    run = tmp_path / "run"
    exe = str(Path(sys.executable).parent / "hiq")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "HIQ_RUN_DIR"}
    env["WANDB_MODE"] = "offline"
    proc = subprocess.run([exe, *cmd[1:], *SHRINK, f"--trainer.default_root_dir={run}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["recipe"]["ratios"]["target_avg_bits"] == 2.05 and metrics["avg_bits"] <= 2.05 + 1e-9
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))
    assert not (ROOT / "wandb").exists() or (ROOT / "wandb").stat().st_mtime < run.stat().st_mtime

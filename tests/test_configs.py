"""Every shipped config is what scripts/make_configs.py writes, and parses under `hiq fit`/`hiq eval`."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hiq.cli import build_eval_parser, main

ROOT = Path(__file__).resolve().parents[1]
FIT_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*/*.yaml")
                     if p.parent.name != "sweeps" and p.stem not in ("fp", "rtn-w2"))


def test_configs_match_their_generator():
    proc = subprocess.run([sys.executable, "scripts/make_configs.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_setting_for_every_model():
    names = {(p.parent.name, p.stem) for p in FIT_CONFIGS}
    for model in ("tiny", "llama-2-7b", "llama-2-13b"):
        for setting in ("w2", "w2-g128", "w2-g64", "w3", "w3-g128", "w3-g64"):
            assert (model, setting) in names


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fit_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    raw = yaml.safe_load(path.read_text())
    assert printed["ratios"]["target_avg_bits"] == raw["ratios"]["target_avg_bits"]
    assert printed["quant"] == raw["quant"] and printed["model"]["path"] == raw["model"]["path"]
    assert printed["reconstruction"]["iterations"] == raw["reconstruction"]["iterations"]
    # the wider candidate set (README "Wider candidate ratios"): the paper's five, 0 and ratios up to the whole layer
    candidates = [float(c) for c in printed["ratios"]["candidates"]]
    assert candidates == sorted(candidates) and {0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 1.0} <= set(candidates)
    if "llama" in path.parent.name:
        assert printed["reconstruction"]["iterations"] == 5000 and printed["data"]["nsamples"] == 128


def test_eval_configs_parse():
    for name in ("fp", "rtn-w2"):
        cfg = build_eval_parser().parse_args(["--config", str(ROOT / "configs" / "tiny" / f"{name}.yaml")])
        assert cfg.model.path == "tiny-llama"

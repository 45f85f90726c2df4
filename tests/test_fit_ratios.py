"""`hiq fit` end to end for Algorithm 1 on the bundled model (small calibration so it runs in seconds)."""

import json
import re

import yaml

from hiq.artifacts import load_tensors
from hiq.cli import main

SMALL = {
    "model": {"path": "tiny-llama"},
    "quant": {"bits": 2, "bits_high": 3},
    "data": {"dataset": "wikitext2", "split": "train", "nsamples": 4, "seqlen": 64, "seed": 0},
    "trainer": {"accelerator": "cpu"},
    "sensitivity": {"nsamples": 2, "fidelity_assignments": 6},
    "ratios": {"candidates": [0.05, 0.2], "target_avg_bits": 2.1, "mode": "optimal"},
    "reconstruction": {"enabled": False},
    "export": {"enabled": False},
    "evaluation": {"enabled": False},
}


def _config(tmp_path, **ratios):
    cfg = json.loads(json.dumps(SMALL))
    cfg["ratios"].update(ratios)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_writes_every_artifact_and_resumes(tmp_path):
    run = tmp_path / "run"
    cfg = _config(tmp_path)
    assert main(["fit", "--config", str(cfg), f"--trainer.default_root_dir={run}"]) == 0
    ratios = json.loads((run / "ratios.json").read_text())
    assert len(ratios["layers"]) == 56 and ratios["mode"] == "optimal"
    assert ratios["achieved_avg_bits"] <= 2.1 + 1e-9 and ratios["status"] == "Optimal"
    assert {x["ratio"] for x in ratios["layers"]} <= {0.05, 0.2}
    fisher = load_tensors(run / "fisher.safetensors")
    assert fisher["samples"] == 4 and len(fisher["scores"]) == 56
    blocks = sorted((run / "sensitivity").glob("block_*.safetensors"))
    assert len(blocks) == 8
    m0 = load_tensors(blocks[0])
    assert m0["matrix"].shape == (14, 14) and m0["evaluations"] == 14  # gram: the single perturbations only
    assert m0["method"] == "gram"
    assert "spearman" in m0["fidelity"]
    assert (run / "plots" / "fisher_channels.png").stat().st_size > 0
    assert (run / "plots" / "ratios_by_layer.png").stat().st_size > 0

    # a second run in the same directory reuses Fisher and M and gives the same ratios
    stamps = {p: p.stat().st_mtime_ns for p in [run / "fisher.safetensors", *blocks]}
    assert main(["fit", "--config", str(cfg), f"--trainer.default_root_dir={run}"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((run / "ratios.json").read_text())["layers"] == ratios["layers"]


def test_infeasible_budget_fails_before_any_heavy_work(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _config(tmp_path, target_avg_bits=2.01)
    assert main(["fit", "--config", str(cfg), f"--trainer.default_root_dir={run}"]) == 2
    assert re.search(r"hiq fit: error: .*target_avg_bits=2.01 is infeasible.*2\.050", capsys.readouterr().err)
    assert not (run / "fisher.safetensors").exists()


def test_uniform_mode_needs_no_matrix(tmp_path):
    run = tmp_path / "run"
    cfg = json.loads(json.dumps(SMALL))
    cfg["sensitivity"] = {"enabled": False}
    cfg["plots"] = {"enabled": False}
    cfg["ratios"]["mode"] = "uniform"
    path = tmp_path / "uniform.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path), f"--trainer.default_root_dir={run}"]) == 0
    ratios = json.loads((run / "ratios.json").read_text())
    assert {x["ratio"] for x in ratios["layers"]} == {0.05}  # 0.2 would need 2.2 bits
    assert not (run / "sensitivity").exists()


def test_optimal_mode_without_m_is_refused(tmp_path, capsys):
    cfg = json.loads(json.dumps(SMALL))
    cfg["sensitivity"] = {"enabled": False}
    path = tmp_path / "no-m.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path / 'run'}"]) == 2
    assert "ratios.mode=optimal needs the matrix M: set sensitivity.enabled=true" in capsys.readouterr().err
    assert not (tmp_path / "run" / "fisher.safetensors").exists()

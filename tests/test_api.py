"""The Python API on its own: a loaded model and token windows in, typed results out; clear errors."""

from pathlib import Path

import pytest
import torch

import hiq
from hiq.artifacts import load_tensors
from hiq.data import calibration_windows, load_text, tokenize_text

FAST = hiq.Recipe(ratios={"candidates": (0.05, 0.2), "target_avg_bits": 2.1, "mode": "optimal"},
                  sensitivity={"nsamples": 1, "fidelity_assignments": 0},
                  reconstruction={"enabled": False})


def test_quantize_a_loaded_model_on_given_windows(tiny_copy, tmp_path):
    model, tokenizer = tiny_copy
    windows = calibration_windows(tokenize_text(tokenizer, load_text("wikitext2", "train")), 3, 32, seed=1)
    result = hiq.quantize(model, tokenizer, recipe=FAST, calibration=windows, run_dir=tmp_path / "run",
                          trainer={"accelerator": "cpu"})
    assert result.model is model and result.run_dir == tmp_path / "run"
    assert len(result.ratios) == 56 and set(result.ratios.values()) <= {0.05, 0.2}
    assert all(model.get_submodule(name).in_features > 0 for name in result.ratios)  # full module names
    assert result.avg_bits is None and result.blocks == []  # reconstruction was off
    fisher = load_tensors(tmp_path / "run" / "fisher.safetensors")
    assert fisher["samples"] == 3 and fisher["calibration"]["split"] == "given"
    # other windows are other calibration: the Fisher scores are recomputed, not reused
    other = calibration_windows(tokenize_text(tokenizer, load_text("wikitext2", "train")), 3, 32, seed=2)
    stamp = (tmp_path / "run" / "fisher.safetensors").stat().st_mtime_ns
    hiq.quantize(model, tokenizer, recipe=FAST, calibration=other, run_dir=tmp_path / "run",
                 trainer={"accelerator": "cpu"})
    assert (tmp_path / "run" / "fisher.safetensors").stat().st_mtime_ns != stamp


def test_api_errors_name_the_value_and_the_fix(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="needs its tokenizer"):
        hiq.quantize(model, recipe=FAST, run_dir=tmp_path)
    with pytest.raises(TypeError, match="calibration must be a dataset name"):
        hiq.quantize(model, tokenizer, recipe=FAST, calibration=3.5, run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"calibration windows must be a \(nsamples, seqlen\) int64 tensor"):
        hiq.quantize(model, tokenizer, recipe=FAST, calibration=torch.zeros(4), run_dir=tmp_path)
    with pytest.raises(ValueError, match="data.nsamples=0 must be at least 1"):
        hiq.CalibrationOptions(nsamples=0)
    with pytest.raises(ValueError, match="evaluation.limit=5 applies to zero-shot tasks"):
        hiq.EvaluationOptions(limit=5)
    assert not any(tmp_path.iterdir())  # nothing written


def test_evaluate_a_loaded_model(tiny):
    model, tokenizer = tiny
    res = hiq.evaluate(model, tokenizer, hiq.EvaluationOptions(datasets=["wikitext2"], seqlen=64, max_windows=3))
    assert res["setting"] == "FP" and res["avg_bits"] == 16.0 and res["eval"]["wikitext2"]["windows"] == 3
    assert 1 < res["wikitext2_ppl"] < 1000 and "output" not in res


def test_budget_outside_the_candidates_reach_fails_with_the_range():
    with pytest.raises(ValueError, match=r"target_avg_bits=2\.5 is infeasible.*2\.050 \.\. 2\.200.*lower it"):
        hiq.Recipe(ratios={"candidates": (0.05, 0.2), "target_avg_bits": 2.5})
    with pytest.raises(ValueError, match=r"target_avg_bits=2\.01 .*raise it"):
        hiq.Recipe(ratios={"candidates": (0.05, 0.2), "target_avg_bits": 2.01})
    hiq.Recipe(ratios={"candidates": (0.05, 0.2), "target_avg_bits": 2.2})  # the edge is reachable


def test_batch_larger_than_the_windows_fails_before_any_stage(tmp_path):
    recipe = hiq.Recipe(ratios={"mode": "fixed", "fixed_ratio": 0.0}, sensitivity={"enabled": False},
                        reconstruction={"batch_size": 8})
    with pytest.raises(ValueError, match=r"reconstruction.batch_size=8 is larger than the 4 calibration windows"):
        hiq.quantize("tiny-llama", recipe=recipe, calibration=hiq.CalibrationOptions(nsamples=4, seqlen=64),
                     run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "fisher.safetensors").exists()


def test_fit_config_reads_every_section_and_keeps_the_seed(tmp_path):
    """hiq.FitConfig reads a config like hiq fit: every section, overrides, and seed_everything (not dropped)."""
    import yaml

    from hiq.api import FitConfig

    w2 = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "w2.yaml"
    cfg = FitConfig.load(w2, **{"ratios.mode": "uniform", "sensitivity.enabled": False})
    assert cfg.recipe.ratios.mode == "uniform" and not cfg.recipe.sensitivity.enabled
    assert cfg.seed_everything == 0 and cfg.recipe.quant.bits == 2
    assert FitConfig.load(w2, seed_everything=7).seed_everything == 7
    raw = yaml.safe_load(w2.read_text())
    raw["seed_everything"] = 5
    path = tmp_path / "seeded.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert FitConfig.load(path).seed_everything == 5
    raw["seed_everything"] = "five"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="seed_everything='five'; give an integer"):
        FitConfig.load(path)
    raw["seed_everything"], raw["quantise"] = 0, {"bits": 2}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"unknown sections \['quantise'\]"):
        FitConfig.load(path)

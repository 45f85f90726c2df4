"""Artifacts are checked before reuse, a run folder holds one run, and user mistakes fail early as one line."""

import json
import os
import shutil
from dataclasses import asdict

import pytest
import torch
import yaml

from hiq.artifacts import (
    ArtifactError,
    load_json,
    load_tensors,
    manifest_problem,
    save_json,
    save_tensors,
    write_manifest,
)
from hiq.checks import (
    UserError,
    check_calibration_text,
    check_model_dir,
    check_writable,
    prepare_run_folder,
    world_size_of,
)
from hiq.cli import main
from hiq.model import BUNDLED_MODELS, model_fingerprint
from tests.test_fit_ratios import SMALL

PAYLOAD = {"key": "k1", "seconds": 1.5, "layers": {"q_proj": {"codes": torch.arange(12, dtype=torch.uint8),
                                                               "scale": torch.rand(3, 1), "n_high": 4,
                                                               "group_size": None, "perm": torch.randperm(7)}},
           "list": [torch.ones(2), "text", True]}


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "zero":
        data = bytearray(len(data))
    elif how == "flip":  # one byte near the end: inside the tensor data, not the header
        data[-3] ^= 0xFF
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


def test_tensor_artifact_roundtrip(tmp_path):
    path = tmp_path / "a.safetensors"
    save_tensors(path, PAYLOAD)
    back = load_tensors(path)
    assert back["key"] == "k1" and back["seconds"] == 1.5 and back["layers"]["q_proj"]["group_size"] is None
    for name in ("codes", "scale", "perm"):
        assert torch.equal(back["layers"]["q_proj"][name], PAYLOAD["layers"]["q_proj"][name])
    assert torch.equal(back["list"][0], torch.ones(2)) and back["list"][1:] == ["text", True]
    from safetensors.torch import load_file  # a plain safetensors file any tool can read

    assert "layers/q_proj/codes" in load_file(path)


@pytest.mark.parametrize("how", ["truncate", "zero", "flip", "empty"])
def test_damaged_tensor_artifact_is_named(tmp_path, how):
    path = tmp_path / "block_03.safetensors"
    save_tensors(path, PAYLOAD)
    _damage(path, how)
    with pytest.raises(ArtifactError, match="block_03.safetensors"):
        load_tensors(path)


def test_sealed_json_detects_edits(tmp_path):
    path = tmp_path / "wikitext2.json"
    save_json(path, {"ppl": 63.7, "key": "k"}, sealed=True)
    assert load_json(path, sealed=True)["ppl"] == 63.7
    edited = json.loads(path.read_text())
    edited["ppl"] = 1.2345
    path.write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        load_json(path, sealed=True)
    path.write_text('{"ppl": 63')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_json(path, sealed=True)


def test_export_manifest_catches_changed_missing_and_added_files(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x" * 100)
    (out / "config.json").write_text("{}")
    write_manifest(out, {"key": "w1"})
    assert manifest_problem(out, "w1") is None
    assert "other weights" in manifest_problem(out, "w2")
    _damage(out / "model.safetensors", "truncate")
    assert "model.safetensors" in manifest_problem(out, "w1")
    write_manifest(out, {"key": "w1"})
    (out / "config.json").unlink()
    assert "config.json" in manifest_problem(out, "w1")
    assert manifest_problem(tmp_path / "nothing", "w1") == "not written yet"


def test_model_fingerprint_sees_one_changed_weight(tiny_copy):
    model, _ = tiny_copy
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.model.layers[5].mlp.down_proj.weight[3, 7] += 1e-3
    assert model_fingerprint(model) != before


def test_model_folder_checks(tmp_path):
    check_model_dir("tiny-llama")
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(BUNDLED_MODELS["tiny-llama"] / "config.json", only_config)
    with pytest.raises(UserError, match="holds config.json but no weights"):
        check_model_dir(str(only_config))
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(BUNDLED_MODELS["tiny-llama"], no_tokenizer)
    for f in no_tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    with pytest.raises(UserError, match="holds no tokenizer"):
        check_model_dir(str(no_tokenizer))
    (no_tokenizer / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is not readable JSON"):
        check_model_dir(str(no_tokenizer))
    with pytest.raises(UserError, match="does not exist"):
        check_model_dir(str(tmp_path / "missing"))


def test_writable_checks(tmp_path):
    check_writable(tmp_path / "a" / "b", "run directory")
    assert not (tmp_path / "a").exists()  # nothing created
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_writable(tmp_path / "file" / "sub", "run directory")
    with pytest.raises(UserError, match="is a directory"):
        check_writable(tmp_path, "output", directory=False)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(UserError, match="not writable"):
                check_writable(locked / "out.json", "output", directory=False)
        finally:
            locked.chmod(0o700)


def test_calibration_text_length():
    check_calibration_text(10_000, 4, 64, "x")
    with pytest.raises(UserError, match="lower data.seqlen to at most 98"):
        check_calibration_text(100, 4, 2048, "short.txt")
    with pytest.raises(UserError, match="lower data.nsamples to at most 1 or data.seqlen to at most 25"):
        check_calibration_text(100, 4, 64, "short.txt")


def test_world_size():
    assert world_size_of({"accelerator": "cpu", "devices": "auto"}) == 1
    assert world_size_of({"accelerator": "cpu", "devices": 3}) == 3
    assert world_size_of({"accelerator": "cpu", "devices": "2", "num_nodes": 2}) == 4
    assert world_size_of({"devices": [0, 1]}) == 2


def test_run_folder_holds_one_run(tmp_path):
    run = tmp_path / "run"
    a = {"model": "tiny-llama", "recipe": {"quant": {"bits": 2}}, "calibration": {"nsamples": 4}}
    b = {"model": "tiny-llama", "recipe": {"quant": {"bits": 3}}, "calibration": {"nsamples": 4}}
    assert prepare_run_folder(run, a) == "new"
    (run / "blocks").mkdir()
    (run / "blocks" / ".block_01.safetensors.tmp-999").write_bytes(b"half")  # a killed run's leftovers
    (run / ".model.tmp-999").mkdir()
    assert prepare_run_folder(run, a) == "resume"
    assert not list(run.rglob(".*tmp-*"))
    (run / "blocks" / "block_00.safetensors").write_bytes(b"x")
    (run / "tuning.safetensors").write_bytes(b"x")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds another run \(recipe.quant.bits: 2 -> 3\).*--overwrite=true"):
        prepare_run_folder(run, b)
    assert (run / "blocks" / "block_00.safetensors").exists()
    assert prepare_run_folder(run, b, overwrite=True) == "overwritten"
    assert not (run / "blocks").exists() and (run / "notes.txt").exists()  # only hiq's own artifacts go
    assert not (run / "tuning.safetensors").exists()  # every entry of RunDir.ENTRIES, the tuned scales too
    assert load_json(run / "run.json", sealed=True)["recipe"]["quant"]["bits"] == 3
    legacy = tmp_path / "legacy"
    (legacy / "blocks").mkdir(parents=True)
    assert prepare_run_folder(legacy, a) == "adopted"


def test_a_run_from_before_a_later_field_resumes_at_its_old_behaviour(tmp_path):
    """run.json written before reconstruction.clip_init / loss_trim existed: the same recipe at their old behaviour
    resumes; turning one on is another run."""
    import hiq

    run = tmp_path / "run"
    before = {k: v for k, v in asdict(hiq.ReconstructionOptions()).items() if k not in ("clip_init", "loss_trim")}
    old = {"model": "tiny-llama", "recipe": {"reconstruction": before}, "calibration": {"nsamples": 4}}
    assert prepare_run_folder(run, old) == "new"
    now = {**old, "recipe": {"reconstruction": asdict(hiq.ReconstructionOptions())}}
    assert prepare_run_folder(run, now, write=False) == "resume"
    on = {**old, "recipe": {"reconstruction": asdict(hiq.ReconstructionOptions(loss_trim=0.001))}}
    with pytest.raises(UserError, match=r"recipe.reconstruction.loss_trim: '\(unset\)' -> 0.001"):
        prepare_run_folder(run, on)


# ----------------------------------------------------------------------------------------------------------
# hiq fit / hiq eval: a mistake is one line, exit code 2, before the model loads, nothing written


def _small(tmp_path, **sections) -> str:
    cfg = json.loads(json.dumps(SMALL))
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("extra,message", [
    (["--reconstruction.iteration=10"], "unrecognized arguments: --reconstruction.iteration=10"),
    (["--ratios.target_avg_bits=2.5"], "reachable average is 2.050 .. 2.200 bits"),
    (["--quant.bits=4", "--quant.bits_high=8", "--ratios.target_avg_bits=2.1"],
     "ratios.target_avg_bits=2.1 is infeasible: with candidates"),
    (["--trainer.devices=3", "--reconstruction.enabled=true"], "is not divisible by the 3 processes"),
    (["--data.dataset=/no/such.txt"], "dataset file '/no/such.txt' does not exist"),
    (["--data.seqlen=5000"], "exceeds the model's context"),
    (["--data.nsamples=0"], "data.nsamples=0 must be at least 1"),
    (["--sensitivity.method=triples"], "sensitivity.method='triples'; choose gram (default) or pairs"),
])
def test_fit_mistakes_are_one_line(tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    assert main(["fit", "--config", _small(tmp_path), f"--trainer.default_root_dir={run}", *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hiq fit: error")]
    assert len(err) == 1 and message in err[0]
    assert not run.exists()


def test_short_calibration_text_fails_before_the_model_loads(tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("A short calibration text. " * 20)
    run = tmp_path / "run"
    assert main(["fit", "--config", _small(tmp_path), f"--trainer.default_root_dir={run}",
                 f"--data.dataset={text}"]) == 2
    err = capsys.readouterr().err
    assert "fewer than data.nsamples x data.seqlen" in err and "lower data.nsamples" in err
    assert not run.exists()


def test_a_run_folder_with_another_recipe_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _small(tmp_path, sensitivity={"enabled": False}, plots={"enabled": False}, ratios={"mode": "uniform"})
    assert main(["fit", "--config", cfg, f"--trainer.default_root_dir={run}"]) == 0
    ratios = (run / "ratios.json").read_bytes()
    assert main(["fit", "--config", cfg, f"--trainer.default_root_dir={run}", "--quant.bits=3",
                 "--quant.bits_high=4", "--ratios.target_avg_bits=3.05"]) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "recipe.quant.bits: 2 -> 3" in err
    assert (run / "ratios.json").read_bytes() == ratios  # untouched
    assert main(["fit", "--config", cfg, f"--trainer.default_root_dir={run}", "--quant.bits=3",
                 "--quant.bits_high=4", "--ratios.target_avg_bits=3.05", "--overwrite=true"]) == 0
    assert json.loads((run / "ratios.json").read_text())["achieved_avg_bits"] > 3


def test_eval_output_is_checked_before_the_evaluation(tmp_path, capsys):
    out = tmp_path / "dir"
    out.mkdir()
    assert main(["eval", "--model.path=tiny-llama", f"--output={out}", "--evaluation.max_windows=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a directory; give a file path" in err[0]

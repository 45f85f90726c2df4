import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hiq.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_eval_writes_json_with_the_table_fields(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["eval", "--config", str(REPO / "configs/tiny/rtn-w2.yaml"), "--quant.bits=3",
               "--quant.group_size=64", "--evaluation.max_windows=2", f"--output={out}"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["setting"] == "RTN W3 g64" and res["bits"] == 3 and res["group_size"] == 64
    assert 3.0 < res["avg_bits"] < 3.5 and round(res["avg_bits_paper"], 2) == 3.30
    assert res["wikitext2_ppl"] > 1 and res["c4_ppl"] > 1 and res["wall_time_s"] > 0
    assert res["eval"]["wikitext2"]["windows"] == 2 and res["seqlen"] == 512
    assert "sample" in res["eval"]["c4"]["note"]
    assert json.loads(capsys.readouterr().out)["setting"] == "RTN W3 g64"


@pytest.mark.parametrize(
    "override,message",
    [
        ("--quant.bits=5", "bits=5 is not supported; choose one of 2, 3, 4, 8"),
        ("--quant.group_size=48", "group_size=48 is not supported"),
        ("--quant.method=gptq", "quant.method='gptq' is not supported"),
        ("--model.path=./no/such/model", "'./no/such/model' does not exist"),
        ("--evaluation.datasets=[wikitext3]", "wikitext3"),
    ],
)
def test_bad_input_fails_fast_and_writes_nothing(tmp_path, capsys, override, message):
    out = tmp_path / "r.json"
    rc = main(["eval", "--config", str(REPO / "configs/tiny/rtn-w2.yaml"), override, f"--output={out}"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_console_script_help_and_unknown_command():
    exe = Path(sys.executable).parent / "hiq"
    assert subprocess.run([exe, "--help"], capture_output=True, text=True).returncode == 0
    bad = subprocess.run([exe, "quantise"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'quantise'" in bad.stderr


@pytest.mark.parametrize("command", [[], ["fit"], ["eval"]])
def test_help_is_plain_text_with_the_subcommand_in_the_usage(command):
    exe = Path(sys.executable).parent / "hiq"
    out = subprocess.run([exe, *command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for markup in (":class:", ":func:", ":mod:", ":meth:", ":data:", "``"):
        assert markup not in text, f"{markup} in `hiq {' '.join(command)} --help`"
    if command:
        assert re.search(rf"^usage: hiq {command[0]} ", text, re.M), text[:200]


def test_the_loggers_run_config_carries_the_recipe(tiny_copy, tmp_path):
    """W&B's run config (any Lightning logger's hyperparameters) holds the recipe, its key and the calibration."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    import hiq
    from hiq.data import calibration_windows, load_text, tokenize_text

    model, tokenizer = tiny_copy
    windows = calibration_windows(tokenize_text(tokenizer, load_text("wikitext2", "train")), 4, 64, 0)
    logger = CSVLogger(tmp_path / "logs")
    recipe = hiq.Recipe(ratios=hiq.RatioOptions(mode="uniform", target_avg_bits=2.1),
                        sensitivity=hiq.SensitivityOptions(enabled=False),
                        reconstruction=hiq.ReconstructionOptions(enabled=False))
    trainer = L.Trainer(logger=logger, default_root_dir=str(tmp_path / "run"), limit_train_batches=0,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    hiq.quantize(model, tokenizer, recipe=recipe, calibration=windows, trainer=trainer)
    import yaml

    logged = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert logged["recipe"]["quant"]["bits"] == 2 and logged["recipe"]["ratios"]["target_avg_bits"] == 2.1
    assert logged["recipe_key"] == recipe.key() and logged["calibration"]["nsamples"] == 4

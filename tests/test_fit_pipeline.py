"""`hiq fit` end to end on the bundled model: Fisher -> M -> ratios -> hybrid reconstruction -> export -> eval."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

import hiq
from hiq.artifacts import load_tensors
from hiq.cli import main
from hiq.data import eval_windows, load_text, tokenize_text
from hiq.modules import HiQPipeline
from hiq.perplexity import perplexity
from hiq.pipeline import weights_digest
from hiq.quant.record import LayerRecord
from tests.test_fit_ratios import SMALL

E2E = json.loads(json.dumps(SMALL))
E2E["sensitivity"] = {"nsamples": 2, "fidelity_assignments": 0}
# the W2 default keeps each block's last step (keep_best: false); test_ddp pins keep_best: true (see there)
E2E["reconstruction"] = {"iterations": 12, "batch_size": 2, "log_every_n_steps": 4, "tune_steps": 6,
                         "tune_batch_size": 2}
E2E["export"] = {"enabled": True}
E2E["evaluation"] = {"datasets": ["wikitext2"], "seqlen": 64, "max_windows": 6, "tasks": "piqa,winogrande", "limit": 4}


def _config(tmp_path, cfg=None) -> str:
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(cfg or E2E))
    return str(path)


def _fit(cfg: str, run, *extra) -> dict:
    assert main(["fit", "--config", cfg, f"--trainer.default_root_dir={run}", *extra]) == 0
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    run = tmp / "run"
    return tmp, run, _fit(_config(tmp), run)


def test_metrics_blocks_and_model(finished, tiny):
    tmp, run, metrics = finished
    assert metrics["setting"] == "W2/3 per-channel"
    assert 2.0 < metrics["avg_bits"] <= 2.1 + 1e-9  # weight bits of the codes really written
    assert metrics["avg_bits_storage"] > metrics["avg_bits"]
    assert set(metrics["stage_seconds"]) >= {"fisher", "sensitivity", "ratios", "reconstruction", "evaluation"}
    assert metrics["device"] == "cpu" and metrics["memory"]["peak_rss_mb"] > 100  # MiB: the model alone is more
    # the whole recipe and its key are recorded, and the key is the recipe's own hash
    assert metrics["recipe"]["reconstruction"]["iterations"] == 12 and metrics["recipe"]["quant"]["bits_high"] == 3
    assert metrics["recipe_key"] == hiq.Recipe.from_dict(metrics["recipe"]).key()
    assert metrics["calibration"]["nsamples"] == 4 and metrics["calibration"]["seqlen"] == 64
    fp_model, tokenizer = tiny
    windows = eval_windows(tokenize_text(tokenizer, load_text("wikitext2", "test")), 64, 6)
    fp_ppl = perplexity(fp_model, windows)
    assert metrics["wikitext2_ppl"] > fp_ppl  # 2-bit weights cost something
    assert len(metrics["blocks"]) == 8
    # every block's linears are on their b-bit grids and the file holds what export needs
    block = load_tensors(run / "blocks" / "block_03.safetensors")
    rec = LayerRecord.from_dict(block["layers"]["self_attn.v_proj"])
    assert sorted(rec.perm.tolist()) == list(range(128))
    assert int(rec.high.codes.max()) <= 7 and int(rec.normal.codes.max()) <= 3
    assert block["steps"] == 12 and block["loss_final"] > 0
    # model/ is a plain Hugging Face checkpoint with the dequantised weights in the source's dtype (float16 here; the
    # run computed in float32), scoring what metrics.json says up to that rounding
    from transformers import AutoModelForCausalLM

    assert json.loads((run / "model" / "config.json").read_text())["dtype"] == "float16"
    exported = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    assert perplexity(exported, windows) == pytest.approx(metrics["wikitext2_ppl"], rel=1e-3)
    w = exported.model.layers[3].self_attn.v_proj.weight
    assert all(len(row.unique()) <= 8 + 4 for row in w)  # per row: at most 2^3 + 2^2 levels
    assert json.loads((run / "model" / "hiq.json").read_text())["setting"] == "W2/3 per-channel"
    # packed/ is the deployable checkpoint: the same weights at the true bit width
    packed = AutoModelForCausalLM.from_pretrained(run / "packed", dtype=torch.float32)
    assert perplexity(packed, windows) == pytest.approx(metrics["wikitext2_ppl"], rel=1e-6)
    assert metrics["exports"] == {"packed": str(run / "packed"), "dequantized": str(run / "model")}
    for path in (run / "ratios.json", run / "metrics.json", run / "packed" / "model.safetensors",
                 run / "model" / "model.safetensors"):
        assert path.stat().st_mode & 0o044 == 0o044, path  # readable by the user's group like any output
    packed_mb = (run / "packed" / "model.safetensors").stat().st_size
    assert packed_mb < 0.5 * (run / "model" / "model.safetensors").stat().st_size
    # zero-shot through lm-eval on the quantized model in memory (evaluation.tasks)
    zs = metrics["zeroshot"]
    assert list(zs["tasks"]) == ["piqa", "winogrande"] and zs["limit"] == 4 and zs["lm_eval_version"]
    assert all(r["n"] == 4 for r in zs["tasks"].values())
    assert metrics["zeroshot_avg"] == pytest.approx((zs["tasks"]["piqa"]["acc"] + zs["tasks"]["winogrande"]["acc"]) / 2)
    # the run's logger got the block fits' losses
    csv = next(run.glob("lightning_logs/version_*/metrics.csv")).read_text()
    assert "block_00/rec_loss" in csv and "block_07/round_reg" in csv


def test_hiq_export_rewrites_the_packed_checkpoint(finished, tmp_path, capsys):
    tmp, run, metrics = finished
    out = tmp_path / "again"
    assert main(["export", str(run), f"--output={out}"]) == 0
    assert "packed:" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == (run / "packed" / "model.safetensors").read_bytes()
    # not a single-width run: compressed-tensors is refused, naming a layer and the way out
    assert main(["export", str(run), "--formats=[compressed-tensors]", f"--output={tmp_path}/ct"]) == 2
    assert "high-impact columns" in capsys.readouterr().err and not (tmp_path / "ct").exists()
    # a block that is not this run's is refused
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    shutil.copy(broken / "blocks" / "block_01.safetensors", broken / "blocks" / "block_02.safetensors")
    assert main(["export", str(broken)]) == 2
    assert "does not hold the weights" in capsys.readouterr().err


def test_rerun_reuses_everything(finished):
    tmp, run, metrics = finished
    files = [run / "fisher.safetensors", *sorted((run / "blocks").glob("*.safetensors")),
             run / "model" / "model.safetensors", run / "packed" / "model.safetensors",
             run / "eval" / "wikitext2.json", run / "eval" / "zeroshot_piqa.json"]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = _fit(_config(tmp), run)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert again["wikitext2_ppl"] == metrics["wikitext2_ppl"]
    assert again["zeroshot"] == metrics["zeroshot"]


def test_resume_after_a_stop_gives_the_same_model(finished, tmp_path):
    tmp, run, metrics = finished
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    # a run stopped during block 5: blocks 5-7, the export and the evaluation never happened
    for b in (5, 6, 7):
        (resumed / "blocks" / f"block_{b:02d}.safetensors").unlink()
    for name in ("model", "eval"):
        shutil.rmtree(resumed / name)
    (resumed / "metrics.json").unlink()
    stamp = (resumed / "blocks" / "block_04.safetensors").stat().st_mtime_ns
    again = _fit(_config(tmp_path), resumed)
    assert (resumed / "blocks" / "block_04.safetensors").stat().st_mtime_ns == stamp
    assert again["wikitext2_ppl"] == metrics["wikitext2_ppl"]
    a, b = load_file(run / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_changed_ratios_redo_downstream_blocks(finished, tmp_path):
    tmp, run, _ = finished
    other = tmp_path / "other"
    shutil.copytree(run, other)
    # the same folder would be refused (another recipe); artifacts adopted without run.json are reused by key
    (other / "run.json").unlink()
    cfg = json.loads(json.dumps(E2E))
    cfg["ratios"].update(mode="fixed", fixed_ratio=0.05)
    stamp = (other / "blocks" / "block_00.safetensors").stat().st_mtime_ns
    again = _fit(_config(tmp_path, cfg), other)
    assert (other / "blocks" / "block_00.safetensors").stat().st_mtime_ns != stamp  # ratios differ: block redone
    assert again["ratio_mode"] == "fixed"
    block = load_tensors(other / "blocks" / "block_00.safetensors")
    assert block["layers"]["mlp.down_proj"]["n_high"] == 19  # floor(0.05 * 384)


def test_lwc_only_row_has_no_high_columns(tmp_path):
    cfg = json.loads(json.dumps(E2E))
    cfg["ratios"].update(mode="fixed", fixed_ratio=0.0)
    cfg["sensitivity"] = {"enabled": False}
    cfg["export"] = {"enabled": False}
    metrics = _fit(_config(tmp_path, cfg), tmp_path / "lwc")
    assert metrics["avg_bits"] == 2.0
    block = load_tensors(tmp_path / "lwc" / "blocks" / "block_00.safetensors")
    assert all(r["n_high"] == 0 for r in block["layers"].values())


def test_nan_in_a_block_stops_with_its_name_and_keeps_earlier_blocks(finished, tiny_copy, tmp_path):
    tmp, run, _ = finished
    # same run, but block 2 produces non-finite outputs under quantization (Fisher, M and ratios are reused)
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    for name in ("fisher.safetensors", "sensitivity", "ratios.json"):
        src = run / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, poisoned / name if src.is_dir() else poisoned)
    model, tokenizer = tiny_copy
    from hiq.quant.hybrid import HybridLinear

    def nan_while_quantized(mlp, args, output):  # block 2 turns non-finite once its linears are being quantized
        return output * float("nan") if isinstance(mlp.up_proj, HybridLinear) else output

    model.model.layers[2].mlp.register_forward_hook(nan_while_quantized)
    # the Python API on the model in memory (same weights, so Fisher/M/ratios are reused by key)
    recipe = hiq.Recipe(quant=E2E["quant"], ratios=E2E["ratios"], sensitivity=E2E["sensitivity"],
                        reconstruction=E2E["reconstruction"])
    with pytest.raises(FloatingPointError, match="block 2: reconstruction loss is nan"):
        hiq.quantize(HiQPipeline.from_model(model, tokenizer, name="tiny-llama"), recipe=recipe,
                     calibration=E2E["data"], run_dir=poisoned, trainer={"accelerator": "cpu"})
    assert sorted(p.name for p in (poisoned / "blocks").iterdir()) == ["block_00.safetensors", "block_01.safetensors"]
    for b in (0, 1):
        load_tensors(poisoned / "blocks" / f"block_{b:02d}.safetensors")
    assert not (poisoned / "metrics.json").exists() and not (poisoned / "model").exists()


def test_damaged_artifacts_are_recomputed_to_the_same_model(finished, tmp_path, capsys):
    tmp, run, metrics = finished
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)

    def cut(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    cut(damaged / "fisher.safetensors")
    block = damaged / "blocks" / "block_03.safetensors"
    data = bytearray(block.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in a code
    block.write_bytes(bytes(data))
    edited = json.loads((damaged / "eval" / "wikitext2.json").read_text())
    edited["ppl"] = 1.2345
    (damaged / "eval" / "wikitext2.json").write_text(json.dumps(edited))
    cut(damaged / "model" / "model.safetensors")
    (damaged / "packed" / "model.safetensors").write_bytes(b"\0" * 64)
    capsys.readouterr()
    again = _fit(_config(tmp_path), damaged)
    err = capsys.readouterr().err
    for name in ("fisher.safetensors is damaged", "block_03.safetensors is damaged", "wikitext2.json is damaged",
                 "model cannot be reused (files changed since export: model.safetensors)", "packed cannot be reused"):
        assert name in err
    assert "block 2: reused" in err and "block 4: reused" in err  # only the damaged block is recomputed
    assert again["wikitext2_ppl"] == metrics["wikitext2_ppl"] and again["weights_key"] == metrics["weights_key"]
    for part in ("model", "packed"):
        assert (damaged / part / "model.safetensors").read_bytes() == (run / part / "model.safetensors").read_bytes()


def test_a_model_changed_in_place_is_recomputed(tiny_copy, tmp_path, capsys):
    from tests.test_fit_ratios import _config as small_config

    model, tokenizer = tiny_copy
    path = tmp_path / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    cfg, run = small_config(tmp_path), tmp_path / "run"
    assert main(["fit", "--config", str(cfg), f"--model.path={path}", f"--trainer.default_root_dir={run}"]) == 0
    before = load_tensors(run / "fisher.safetensors")["scores"]
    with torch.no_grad():  # the same path, other weights
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(path)
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg), f"--model.path={path}", f"--trainer.default_root_dir={run}"]) == 0
    err = capsys.readouterr().err
    assert "fisher.safetensors was computed from another model" in err
    assert "block_00.safetensors was computed from another model" in err  # M too
    after = load_tensors(run / "fisher.safetensors")["scores"]
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_tuning_stage_moves_only_the_scales_and_export_holds_them(finished):
    tmp, run, metrics = finished
    t = metrics["tuning"]
    assert t["steps"] == 6 and t["kl_after"] <= t["kl_before"] and t["kl_tuned"] > 0
    assert metrics["stage_seconds"]["tuning"] > 0
    saved = load_tensors(run / "tuning.safetensors")
    record = LayerRecord.from_dict(load_tensors(run / "blocks" / "block_03.safetensors")["layers"]["self_attn.v_proj"])
    tuned = saved["scales"]["model.layers.3.self_attn.v_proj"]
    assert t["kept"] and not torch.equal(tuned["normal"], record.normal.scale)  # 6 steps lower the KL
    # the model that was scored and exported is the block fits' codes under the tuned scales
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run / "model")   # float16, the source's dtype
    w = exported.model.layers[3].self_attn.v_proj.weight.detach()
    assert w.dtype == torch.float16
    assert torch.equal(w, record.with_scales(tuned).dequantize().to(w.dtype))
    assert not torch.equal(w, record.dequantize().to(w.dtype))


def test_changing_only_the_tuning_keeps_every_block(finished, tmp_path, capsys):
    tmp, run, metrics = finished
    runs = {}
    for steps in (3, 0):
        other = tmp_path / f"tune{steps}"
        other.mkdir()
        for name in ("fisher.safetensors", "sensitivity", "ratios.json", "blocks"):
            (shutil.copytree if (run / name).is_dir() else shutil.copy)(run / name, other / name)
        blocks = {p.name: p.read_bytes() for p in (other / "blocks").glob("*.safetensors")}
        capsys.readouterr()
        runs[steps] = _fit(_config(tmp), other, f"--reconstruction.tune_steps={steps}", "--export.enabled=false",
                           "--evaluation.tasks=null", "--evaluation.limit=null")
        err = capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in (other / "blocks").glob("*.safetensors")} == blocks
        assert "block 7: reused" in err
        assert (f"tuning: {steps} steps" in err) == (steps > 0)
        assert (other / "tuning.safetensors").exists() == (steps > 0)
    assert runs[3]["tuning"]["steps"] == 3 and len({metrics["weights_key"], runs[3]["weights_key"],
                                                    runs[0]["weights_key"]}) == 3
    # without the tuning the weights keep the key they had before the stage existed
    assert "tuning" not in runs[0]
    assert runs[0]["weights_key"] == weights_digest(metrics["model"], [
        load_tensors(tmp_path / "tune0" / "blocks" / f"block_{b:02d}.safetensors")["key"] for b in range(8)],
        metrics["model_fingerprint"])

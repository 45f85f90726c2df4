"""The deployable checkpoint (hiq.packed, hiq.compressed) on the bundled model: exact round trip through
``from_pretrained``, size, loading without the training dependencies, bad files, compressed-tensors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hiq  # noqa: F401  (registers quant_method "hiq" with transformers)
from hiq.cli import main
from hiq.layouts import layout_for
from hiq.packed import PackedFormatError, PackedLinear, check_checkpoint, save_packed
from hiq.quant.hybrid import HybridLinear

TOKENS = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(0))


def quantized_records(model, group_size, ratios=(0.0, 0.1, 0.25), quantizers=("signround", "adaround")):
    """Finished records of every block linear (mixed ratios, untrained quantizers: real codes, no fit), installed
    into ``model`` as dequantised weights, as ``hiq fit`` leaves the model it evaluates."""
    gen = torch.Generator().manual_seed(1)
    records = {}
    for i, (name, lin) in enumerate(layout_for(model).linears_of(model)):
        scores = torch.rand(lin.in_features, generator=gen)
        hybrid = HybridLinear(lin, scores, ratios[i % len(ratios)], 3, 2, group_size,
                              high_quantizer=quantizers[i % len(quantizers)], normal_quantizer="signround")
        records[name] = hybrid.finish()
        with torch.no_grad():
            lin.weight.copy_(records[name].dequantize())
    return records


@pytest.fixture(scope="module", params=[None, 32], ids=["per-channel", "g32"])
def packed(request, tmp_path_factory, tiny):
    import copy

    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    records = quantized_records(model, request.param)
    out = save_packed(model, records, tmp_path_factory.mktemp("packed") / "packed", tokenizer=tokenizer,
                      info={"setting": "test"})
    return model, records, out


def test_round_trip_is_exact(packed):
    model, records, out = packed
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, PackedLinear)}
    assert set(layers) == set(records)  # every block linear is packed, nothing else
    for name, record in records.items():
        assert torch.equal(layers[name].dequantized_weight(), record.dequantize())
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)
    # the default load keeps the source's stored dtype (fp16) and runs
    half = AutoModelForCausalLM.from_pretrained(out)
    assert half.model.embed_tokens.weight.dtype == torch.float16
    assert torch.isfinite(half(TOKENS).logits.float()).all()


def test_save_pretrained_of_a_loaded_packed_model_says_what_to_do(packed, tmp_path):
    _, _, out = packed
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"already the deployable checkpoint.*hiq export RUN_DIR"):
        loaded.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_packed_size_is_the_storage_bits(packed):
    model, records, out = packed
    tensors = load_file(out / "model.safetensors")
    for name, record in records.items():
        nbytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(name + "."))
        storage_bits = record.bits()[1]
        assert nbytes <= storage_bits / 8 * 1.02 + 8, name  # codes + fp16 scale + b-bit zero, plus the index
        assert nbytes < record.perm.numel() * record.high.codes.shape[0] * 2 * 0.2  # < 20 % of fp16
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "hiq" and qc["format_version"] == 1 and set(qc["layers"]) == set(records)
    assert all((out / f).stat().st_mode & 0o044 == 0o044 for f in ("model.safetensors", "config.json"))


def test_evaluate_scores_the_packed_model_as_it_is(packed, tmp_path):
    model, records, out = packed
    from hiq.api import evaluate
    from hiq.recipe import EvaluationOptions

    ev = EvaluationOptions(datasets=["wikitext2"], seqlen=64, max_windows=4)
    ref = evaluate(model, tiny_tokenizer(out), evaluation=ev)
    got = evaluate(str(out), evaluation=ev)
    assert got["wikitext2_ppl"] == pytest.approx(ref["wikitext2_ppl"], rel=1e-6)
    assert got["quantized_layers"] == len(records) and 2.0 < got["avg_bits"] < 2.3
    assert got["avg_bits_storage"] > got["avg_bits"]
    # RTN on top of a packed model is refused before anything loads
    rc = main(["eval", f"--model.path={out}", "--quant.method=rtn", "--quant.bits=2", f"--output={tmp_path}/x.json"])
    assert rc == 2 and not (tmp_path / "x.json").exists()


def tiny_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_loads_without_the_training_dependencies(packed):
    """Only torch + transformers + safetensors + hiq: Lightning, HiGHS, datasets, wandb... cannot be imported."""
    model, _, out = packed
    with torch.no_grad():
        expected = model(TOKENS).logits[0, -1, :5].tolist()
    code = f"""
import sys
for name in ("lightning", "pytorch_lightning", "lightning_fabric", "highspy", "datasets", "wandb", "jsonargparse",
             "torchmetrics", "matplotlib", "lm_eval", "compressed_tensors"):
    sys.modules[name] = None  # as if not installed: imports fail, importlib.util.find_spec says absent
import torch, hiq
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)
x = torch.tensor({TOKENS.tolist()!r})
with torch.no_grad():
    print(m(x).logits[0, -1, :5].tolist())
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected


def _copy(out, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def _load_error(path) -> str:
    with pytest.raises(PackedFormatError) as err:
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return str(err.value)


def test_truncated_file_is_named(packed, tmp_path):
    bad = _copy(packed[2], tmp_path)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    msg = _load_error(bad)
    assert str(weights) in msg and "truncated" in msg


def test_flipped_byte_fails_the_checksum(packed, tmp_path):
    bad = _copy(packed[2], tmp_path)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-50] ^= 0xFF  # inside the last tensor's data: same length, same header
    weights.write_bytes(bytes(data))
    msg = _load_error(bad)
    assert str(weights) in msg and "sha256" in msg


def test_config_disagreeing_with_tensors(packed, tmp_path):
    bad = _copy(packed[2], tmp_path)
    config = json.loads((bad / "config.json").read_text())
    name = next(n for n, g in config["quantization_config"]["layers"].items() if g["n_high"])
    config["quantization_config"]["layers"][name]["n_high"] += 1
    (bad / "config.json").write_text(json.dumps(config))
    msg = _load_error(bad)
    assert name in msg and "needs" in msg


def test_unknown_format_version(packed, tmp_path):
    bad = _copy(packed[2], tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(config))
    msg = _load_error(bad)
    assert "format_version 99" in msg and "upgrade hiq" in msg


def test_check_checkpoint_accepts_the_export(packed):
    out = packed[2]
    check_checkpoint(out, json.loads((out / "config.json").read_text())["quantization_config"])


def test_generate_cli(packed, capsys):
    assert main(["generate", f"--model.path={packed[2]}", "--prompt=The", "--max_new_tokens=6"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The") and len(text.strip()) > 3


@pytest.mark.parametrize("group_size", [None, 128])
def test_compressed_tensors_decompress_bit_exactly(tiny_copy, tmp_path, group_size):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from transformers import CompressedTensorsConfig

    from hiq.compressed import save_compressed_tensors

    model, tokenizer = tiny_copy
    records = quantized_records(model, group_size, ratios=(0.0,), quantizers=("signround",))
    out = save_compressed_tensors(model, records, tmp_path / "ct", tokenizer=tokenizer)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    scheme = QuantizationScheme(**qc["config_groups"]["group_0"])
    tensors = load_file(out / "model.safetensors")
    for name, record in records.items():
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(weight, record.dequantize().half()), name
    # transformers loads it too (dequantising at load time) with the same weights
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    name, record = next(iter(records.items()))
    assert torch.equal(loaded.get_submodule(name).weight, record.dequantize().half())


def test_hiq_commands_load_the_compressed_tensors_export(tiny_copy, tmp_path, capsys):
    """hiq eval / hiq generate / the API take every format hiq exports, compressed-tensors included."""
    from hiq.api import evaluate
    from hiq.compressed import save_compressed_tensors
    from hiq.recipe import EvaluationOptions

    model, tokenizer = tiny_copy
    records = quantized_records(model, 128, ratios=(0.0,), quantizers=("signround",))
    out = save_compressed_tensors(model, records, tmp_path / "ct", tokenizer=tokenizer)
    ev = EvaluationOptions(datasets=["wikitext2"], seqlen=64, max_windows=4)
    ref = evaluate(model.half().float(), tokenizer, evaluation=ev)
    got = evaluate(str(out), evaluation=ev)
    assert got["wikitext2_ppl"] == pytest.approx(ref["wikitext2_ppl"], rel=1e-4)
    assert main(["generate", f"--model.path={out}", "--prompt", "The", "--max_new_tokens=5"]) == 0
    assert len(capsys.readouterr().out.strip()) > 0


def test_compressed_tensors_refuses_mixed_layers(tiny_copy, tmp_path):
    from hiq.compressed import save_compressed_tensors

    model, tokenizer = tiny_copy
    records = quantized_records(model, None, ratios=(0.1,))
    with pytest.raises(ValueError, match="high-impact columns"):
        save_compressed_tensors(model, records, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_dequantized_export_leaves_the_model_in_memory_as_it_was(tiny_copy, tmp_path):
    """model/ is written in float16 from a float32 model without casting the model: the weights the run evaluates
    next stay bit for bit those of packed/ (casting to float16 and back rounded them; metrics.json then scored
    model/, 5e-6 to 1e-5 relative off packed/ in a CI run)."""
    from hiq.export import write_dequantized

    model, tokenizer = tiny_copy
    with torch.no_grad():  # float32 values that float16 cannot hold, as the tuned scales' products are
        for p in model.parameters():
            p.add_(torch.rand_like(p) * 1e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write_dequantized(model, tokenizer, tmp_path / "model", torch.float16, {"key": "k"})
    assert next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "float16"
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert written.dtype == torch.float16 and written.config.tie_word_embeddings == model.config.tie_word_embeddings
    for k, v in written.state_dict().items():
        assert torch.equal(v, before[k].to(torch.float16)), k

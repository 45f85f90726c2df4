"""scripts/make_shaped_checkpoint.py: random-weight checkpoints with real architectures' shapes (cost and memory
measurements), written as sharded bf16 safetensors that transformers and hiq load."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_shaped_checkpoint.py"
NARROW = ["--hidden-size", "64", "--heads", "4", "--intermediate-size", "96", "--shard-mb", "0.5"]


def write(out: Path, arch: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), arch, "--blocks", "2", "--out", str(out), *NARROW, *extra],
                          capture_output=True, text=True, check=True)


@pytest.mark.parametrize(("arch", "kv_heads", "bias"), [("mistral-7b", 2, False), ("qwen2-7b", 2, True)])
def test_shaped_checkpoint_loads_with_transformers(tmp_path, arch, kv_heads, bias):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / arch
    done = write(out, arch, "--kv-heads", str(kv_heads))
    assert "RANDOM WEIGHTS" in done.stdout and "cost and memory only" in done.stdout
    assert "RANDOM WEIGHTS" in (out / "README.md").read_text()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (2, 64, kv_heads, 2560)
    attn = model.model.layers[1].self_attn
    assert attn.k_proj.weight.shape == (kv_heads * 16, 64)
    assert (attn.q_proj.bias is not None) == bias
    assert model.model.layers[0].input_layernorm.weight.eq(1).all()  # norms at 1, the rest random
    assert attn.q_proj.weight.dtype == torch.bfloat16 and 0.01 < attn.q_proj.weight.float().std() < 0.03
    ids = tokenizer("the cost of a block", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 2560) and torch.isfinite(logits).all()
    summary = json.loads((out / "shaped.json").read_text())
    assert summary["random_weights"] and summary["bytes"] == sum(
        p.numel() * 2 for p in model.state_dict().values())


def test_shaped_checkpoint_is_deterministic_and_refuses_a_full_folder(tmp_path):
    from safetensors.torch import load_file

    write(tmp_path / "a", "llama-2-7b", "--shard-mb", "100")
    write(tmp_path / "b", "llama-2-7b", "--shard-mb", "100")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = subprocess.run([sys.executable, str(SCRIPT), "llama-2-7b", "--out", str(tmp_path / "a")],
                           capture_output=True, text=True)
    assert again.returncode != 0 and "not empty" in again.stderr

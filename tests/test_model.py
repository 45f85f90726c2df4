import sys

import pytest
import torch
from torch import nn

from hiq.model import (
    ModelLoadError,
    all_block_linears,
    block_linears,
    find_blocks,
    record_execution_order,
    resolve_model_path,
)

LLAMA_ORDER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_missing_model_path_names_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="no-such-model.*does not exist"):
        resolve_model_path(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_hub_ids_pass_through_and_bundled_name_resolves():
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert resolve_model_path("tiny-llama").endswith("tiny-llama")


def test_bundled_model_blocks_and_linears(tiny):
    model, _ = tiny
    blocks = find_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert [n for n, _ in block_linears(blocks[0])] == LLAMA_ORDER
    names = [n for n, _ in all_block_linears(model)]
    assert len(names) == 7 * len(blocks) and "lm_head" not in " ".join(names)


def _tiny_config(kind):
    from transformers import AutoConfig

    common = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=128)
    if kind == "opt":
        return AutoConfig.for_model("opt", ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64,
                                    **common)
    return AutoConfig.for_model(kind, intermediate_size=128, num_key_value_heads=2, **common)


@pytest.mark.parametrize("kind,n_linear", [("llama", 7), ("mistral", 7), ("qwen2", 7), ("opt", 6)])
def test_block_discovery_is_generic(kind, n_linear):
    """Structure only (random weights, no quality claim): blocks and their linears are found for each layout."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind))
    blocks = find_blocks(model)
    assert len(blocks) == 3
    linears = block_linears(blocks[0])
    assert len(linears) == n_linear and all(isinstance(m, nn.Linear) for _, m in linears)


def test_linears_come_in_execution_order_for_opt():
    """OPT registers k_proj, v_proj, q_proj but calls q_proj first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_tiny_config("opt")).eval()
    assert [n for n, _ in block_linears(find_blocks(model)[0])][:3] == ["self_attn.k_proj", "self_attn.v_proj",
                                                                         "self_attn.q_proj"]
    record_execution_order(model)
    names = [n for n, _ in block_linears(find_blocks(model)[0])]
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]


def test_low_precision_cpu_linears_compute_in_float32_and_are_restored():
    """bf16 linears on the CPU go through float32 arithmetic (PyTorch's bf16 CPU matmuls without AVX-512 are plain
    loops): same dtypes in and out, values and gradients of the float32 computation rounded once."""
    from hiq.model import float32_cpu_linears, linear

    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 32, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, generator=g).to(torch.bfloat16).requires_grad_(True)
    out = linear(x, lin.weight, lin.bias)
    ref_x, ref_w = x.detach().float().requires_grad_(True), lin.weight.detach().float().requires_grad_(True)
    ref = torch.nn.functional.linear(ref_x, ref_w, lin.bias.detach().float())
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))
    upstream = torch.randn(out.shape, generator=g).to(torch.bfloat16)
    out.backward(upstream)
    ref.backward(upstream.float())
    assert x.grad.dtype == lin.weight.grad.dtype == lin.bias.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, ref_x.grad.to(torch.bfloat16))
    torch.testing.assert_close(lin.weight.grad.float(), ref_w.grad, rtol=1e-2, atol=1e-2)
    model = nn.Sequential(lin, nn.Linear(32, 8))  # the float32 one is left alone
    with float32_cpu_linears(model):
        assert "forward" in lin.__dict__ and "forward" not in model[1].__dict__
        torch.testing.assert_close(model[0](x.detach()), out.detach(), rtol=0, atol=0)
    assert "forward" not in lin.__dict__


def test_own_weights_releases_mapped_shards(tmp_path, tiny):
    """A checkpoint loaded in its own dtype comes back with weights the process owns (not views of the mapped
    safetensors file, which kept the replaced weights' pages resident on the 7B-shaped slice), values unchanged."""
    import torch

    from hiq.model import load_model_and_tokenizer, own_weights

    model, tokenizer = tiny
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model_and_tokenizer(str(tmp_path), dtype="float32")
    for name, t in [*loaded.named_parameters(), *loaded.named_buffers()]:
        assert t.untyped_storage().resizable(), name
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert own_weights(loaded) == 0  # nothing left to copy


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_returns_freed_heap_pages():
    """Freed tensors below glibc's mmap threshold stay in the heap, resident, until malloc_trim gives them back."""
    from hiq.model import release_free_memory

    def anon_mib() -> float:
        line = next(x for x in open("/proc/self/status") if x.startswith("RssAnon:"))
        return int(line.split()[1]) / 1024

    release_free_memory()
    kept = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KiB each, 250 MiB in the heap, every page touched
    last = torch.ones(16 * 1024)  # allocated last: the heap's top stays in use, so only a full trim can help
    del kept
    before = anon_mib()
    assert release_free_memory()
    assert before - anon_mib() > 150, (before, anon_mib())
    del last

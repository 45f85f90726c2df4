import pytest
import torch

from hiq.model import block_outputs, capture_block_inputs, find_blocks


def _hidden_per_block(model, windows):
    """Each block's output during the model's own forward, recorded by hooks."""
    outs = {}
    handles = [blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
               for i, blk in enumerate(find_blocks(model))]
    with torch.no_grad():
        model(windows, use_cache=False)
    for h in handles:
        h.remove()
    return [outs[i] for i in range(len(outs))]


def _replay_all(model, windows, batch_size):
    inputs = capture_block_inputs(model, windows, batch_size=batch_size)
    per_block = []
    for block in find_blocks(model):
        outs = block_outputs(block, inputs)
        per_block.append(torch.cat(outs))
        inputs = inputs.with_hidden(outs)
    return inputs, per_block


def test_replay_is_bit_exact_on_the_bundled_model(tiny, wikitext_test_ids):
    model, _ = tiny
    windows = wikitext_test_ids[:4 * 96].view(4, 96)
    reference = _hidden_per_block(model, windows)
    inputs, replayed = _replay_all(model, windows, batch_size=4)
    assert len(inputs) == 1 and "position_embeddings" in inputs.kwargs_for(0)
    for ref, rep in zip(reference, replayed, strict=True):
        assert torch.equal(ref, rep)


def test_keyword_arguments_are_stored_once_for_equal_batches(tiny, wikitext_test_ids):
    model, _ = tiny
    inputs = capture_block_inputs(model, wikitext_test_ids[: 3 * 32].view(3, 32), batch_size=1)
    assert len(inputs) == 3 and len(inputs._kwargs) == 1


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "opt"])
def test_replay_is_bit_exact_for_other_layouts(kind):
    """Structure only (untrained weights): capture every argument and replay, incl. OPT's tuple outputs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    if kind == "opt":
        cfg = AutoConfig.for_model("opt", ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64, **common)
    else:
        cfg = AutoConfig.for_model(kind, intermediate_size=128, num_key_value_heads=2, **common)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    windows = torch.randint(0, 128, (2, 16))
    reference = _hidden_per_block(model, windows)
    _, replayed = _replay_all(model, windows, batch_size=1)
    for ref, rep in zip(reference, replayed, strict=True):
        assert torch.equal(ref, rep)

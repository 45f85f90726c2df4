import pytest
import torch

from hiq.data import eval_windows
from hiq.model import all_block_linears
from hiq.perplexity import perplexity
from hiq.quant import QuantSpec
from hiq.quant.bits import average_bits_over_layers
from hiq.quant.rtn import quantize_model_rtn


@pytest.mark.parametrize("bits,group", [(2, None), (3, 64), (4, 32)])
def test_every_block_linear_lands_on_the_grid(tiny_copy, bits, group):
    model, _ = tiny_copy
    head_before = model.lm_head.weight.clone()
    records = quantize_model_rtn(model, QuantSpec(bits, group))
    assert len(records) == len(all_block_linears(model))
    g = group or model.config.hidden_size
    for _, lin in all_block_linears(model):
        w = lin.weight
        per_group = w.reshape(w.shape[0], -1, min(g, w.shape[1])) if group else w.unsqueeze(1)
        for row in per_group.reshape(-1, per_group.shape[-1])[:64]:
            assert row.unique().numel() <= 2**bits
    assert torch.equal(model.lm_head.weight, head_before)
    assert average_bits_over_layers([(r.numel, r.avg_bits) for r in records]) > bits  # scale + zero overhead is counted


def test_group_size_that_does_not_divide_leaves_model_untouched():
    """Structure only (an untrained 96-wide LLaMA): the shape check runs on every layer before any write."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=64)
    model = AutoModelForCausalLM.from_config(cfg)
    before = [lin.weight.clone() for _, lin in all_block_linears(model)]
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj.*96"):
        quantize_model_rtn(model, QuantSpec(2, 64))
    assert all(torch.equal(b, lin.weight) for b, (_, lin) in zip(before, all_block_linears(model), strict=True))


def test_lower_bits_hurt_the_trained_model_more(tiny, tiny_copy, wikitext_test_ids):
    """Quality ordering on the real model and text: FP < W4 < W2 (per-channel)."""
    import copy

    fp_model, _ = tiny
    windows = eval_windows(wikitext_test_ids, seqlen=512, max_windows=6)
    fp = perplexity(fp_model, windows)
    w4 = copy.deepcopy(fp_model)
    quantize_model_rtn(w4, QuantSpec(4))
    w2, _ = tiny_copy
    quantize_model_rtn(w2, QuantSpec(2))
    ppl4, ppl2 = perplexity(w4, windows), perplexity(w2, windows)
    assert fp < ppl4 < ppl2
    assert ppl2 > 1.5 * fp

import math

import pytest
import torch

from hiq.data import eval_windows
from hiq.perplexity import evaluate_dataset, perplexity


def test_perplexity_equals_direct_hf_loss(tiny, wikitext_test_ids):
    model, _ = tiny
    windows = eval_windows(wikitext_test_ids, seqlen=256, max_windows=4)
    with torch.no_grad():
        losses = [model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.double() for w in windows]
    direct = math.exp(torch.stack(losses).mean().item())
    assert perplexity(model, windows) == pytest.approx(direct, rel=1e-5)
    assert perplexity(model, windows, batch_size=3) == pytest.approx(direct, rel=1e-5)


def test_trained_model_is_far_better_than_uniform(tiny):
    model, tok = tiny
    res = evaluate_dataset(model, tok, "wikitext2", max_windows=4, progress=False)
    assert res.windows == 4 and res.split == "test"
    assert res.ppl < len(tok) / 10  # uniform guessing would score len(tok)


def test_c4_is_capped_at_256_windows_and_labelled(tiny):
    model, tok = tiny
    res = evaluate_dataset(model, tok, "c4", max_windows=2, progress=False)
    assert res.windows == 2 and "sample" in res.note


def test_seqlen_beyond_context_is_refused(tiny):
    model, tok = tiny
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"seqlen={limit + 1} exceeds"):
        evaluate_dataset(model, tok, "wikitext2", seqlen=limit + 1, max_windows=1, progress=False)

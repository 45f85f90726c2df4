import pytest
import torch

from hiq.impact import FisherAccumulator, fisher_scores
from hiq.model import all_block_linears


def _windows(ids, n=3, seqlen=48):
    return ids[: n * seqlen].view(n, seqlen)


def test_scores_equal_a_direct_per_sample_computation(tiny_copy, wikitext_test_ids):
    model, _ = tiny_copy
    windows = _windows(wikitext_test_ids)
    scores = fisher_scores(model, windows)
    name, lin = all_block_linears(model)[9]
    expected = torch.zeros(lin.in_features, dtype=torch.float64)
    for w in windows:
        x = w.unsqueeze(0)
        (g,) = torch.autograd.grad(model(x, labels=x).loss, lin.weight)
        expected += g.double().pow(2).sum(0)
    expected /= len(windows) * lin.out_features
    torch.testing.assert_close(scores[f"model.layers.{name}"].double(), expected, rtol=1e-5, atol=0)
    assert all(s.shape == (m.in_features,) and (s > 0).all() for (n, m), s in
               zip(all_block_linears(model), scores.values(), strict=True))


def test_gradients_are_freed_and_flags_restored(tiny_copy, wikitext_test_ids):
    model, _ = tiny_copy
    flags = [p.requires_grad for p in model.parameters()]
    fisher_scores(model, _windows(wikitext_test_ids, n=1))
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_deterministic_and_sharded_sums_match_one_process(tiny_copy, wikitext_test_ids):
    """Two 'ranks' holding half the samples each, summed, give the single-process scores (the DDP reduction)."""
    model, _ = tiny_copy
    windows = _windows(wikitext_test_ids, n=4)
    one = fisher_scores(model, windows)
    assert all(torch.equal(a, b) for a, b in zip(one.values(), fisher_scores(model, windows).values(), strict=True))
    ranks = [FisherAccumulator(model) for _ in range(2)]
    for r, acc in enumerate(ranks):
        acc.accumulate(windows[r::2])
    total = [torch.cat([*a.sums.values(), torch.tensor([float(a.samples)], dtype=torch.float64)]) for a in ranks]
    for acc in ranks:
        acc.reduce(lambda t: total[0] + total[1])
    for name, score in ranks[0].scores().items():
        torch.testing.assert_close(score, one[name], rtol=1e-6, atol=0)


def test_batched_pass_gives_the_per_sample_scores(tiny_copy, wikitext_test_ids):
    """Several windows per forward/backward: the same per-sample Fisher (each sample's own gradient, squared), up
    to float rounding; a window of another length starts its own batch."""
    model, _ = tiny_copy
    windows = _windows(wikitext_test_ids, n=5)
    one = fisher_scores(model, windows)
    for batch_size in (2, 5, 8):
        batched = fisher_scores(model, windows, batch_size=batch_size)
        for name, score in one.items():
            torch.testing.assert_close(batched[name], score, rtol=1e-4, atol=0)
    mixed = [*windows[:2], wikitext_test_ids[:30], windows[2]]
    acc = FisherAccumulator(model)
    calls = []
    acc.accumulate(mixed, batch_size=4, on_sample=lambda: calls.append(1))
    ref = FisherAccumulator(model)
    ref.accumulate(mixed)
    assert acc.samples == ref.samples == len(calls) == 4
    for name in acc.sums:
        torch.testing.assert_close(acc.sums[name], ref.sums[name], rtol=1e-4, atol=0)


def test_batch_size_below_one_is_refused(tiny_copy, wikitext_test_ids):
    model, _ = tiny_copy
    with pytest.raises(ValueError, match="batch_size=0"):
        FisherAccumulator(model).accumulate(_windows(wikitext_test_ids, n=1), batch_size=0)


def test_fisher_batch_size_is_in_no_key_or_run_manifest():
    """It changes only speed and memory: a run folder made with one batch size resumes with another, and M is reused."""
    from hiq.recipe import Recipe, SensitivityOptions

    one, eight = (Recipe(sensitivity=SensitivityOptions(fisher_batch_size=b)) for b in (1, 8))
    assert one.run_dict() == eight.run_dict()
    assert one.sensitivity.fingerprint() == eight.sensitivity.fingerprint()
    assert one.run_dict()["sensitivity"]["nsamples"] == one.sensitivity.nsamples

import itertools

import pytest
import torch

from hiq.model import block_linears, capture_block_inputs, find_blocks, run_block
from hiq.quant.grid import QuantSpec, fake_quant_rtn
from hiq.quant.mixed import high_impact_count, mixed_fake_quant, split_columns
from hiq.sensitivity import BlockLoss, SensitivitySettings, measure_block, quadratic_fidelity


def test_mixed_split_uses_two_grids_and_the_top_columns():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    scores = torch.rand(128)
    q = mixed_fake_quant(w, scores, 0.2, bits_high=4, bits_low=2, group_size=None)
    high, normal = split_columns(scores, 0.2)
    assert high.numel() == high_impact_count(0.2, 128) == 25
    assert set(high.tolist()) == set(torch.topk(scores, 25).indices.tolist())
    for row in range(16):
        assert q[row, high].unique().numel() <= 16 and q[row, normal].unique().numel() <= 4
    assert torch.equal(mixed_fake_quant(w, scores, 0.0, 4, 2), fake_quant_rtn(w, QuantSpec(2)))


def test_groups_never_mix_bit_widths_and_ragged_groups_work():
    torch.manual_seed(1)
    w = torch.randn(4, 128)
    scores = torch.rand(128)
    q = mixed_fake_quant(w, scores, 0.1, bits_high=3, bits_low=2, group_size=32)  # 12 high, 116 normal columns
    high, normal = split_columns(scores, 0.1)
    assert q[:, high].unique(dim=None).numel() <= 4 * 8  # one ragged group of 12 per row
    part = q[:, normal]
    for g in range(0, 116, 32):
        for row in range(4):
            assert part[row, g : g + 32].unique().numel() <= 4


@pytest.fixture(scope="module")
def block0(tiny, wikitext_test_ids):
    model, _ = tiny
    inputs = capture_block_inputs(model, wikitext_test_ids[: 2 * 64].view(2, 64))
    scores = {name: torch.rand(lin.in_features, generator=torch.Generator().manual_seed(i))
              for i, (name, lin) in enumerate(block_linears(find_blocks(model)[0]))}
    return find_blocks(model)[0], inputs, scores


def test_m_entries_follow_eq_7_and_8_and_weights_are_restored(block0):
    block, inputs, scores = block0
    settings = SensitivitySettings(candidates=(0.05, 0.2), bits_low=2, bits_high=3)
    before = [lin.weight.clone() for _, lin in block_linears(block)]
    res = measure_block(block, inputs, scores, settings, method="pairs")
    m, k, n_layers = res["matrix"], 2, 7
    assert res["evaluations"] == n_layers * k + 21 * k * k
    assert torch.equal(m, m.T)
    assert torch.equal(torch.diagonal(m), 2 * res["single_losses"].flatten())
    assert all(torch.equal(b, lin.weight) for b, (_, lin) in zip(before, block_linears(block), strict=True))
    # one off-diagonal entry recomputed by hand: L(d1 + d2) - L(d1) - L(d2)
    lins = [lin for _, lin in block_linears(block)]
    wq = {(i, j): mixed_fake_quant(lins[i].weight, scores[n], r, 3, 2)
          for (i, (n, _)), (j, r) in itertools.product(enumerate(block_linears(block)), enumerate((0.05, 0.2)))}
    loss = BlockLoss(block, inputs)
    l1, l2 = loss({lins[0]: wq[0, 1]}), loss({lins[6]: wq[6, 0]})
    pair = loss({lins[0]: wq[0, 1], lins[6]: wq[6, 0]})
    assert m[0 * k + 1, 6 * k + 0].item() == pytest.approx(pair - l1 - l2, rel=1e-9, abs=1e-12)
    assert (torch.diagonal(m) > 0).all()


def test_more_high_precision_columns_lower_the_single_loss(block0):
    block, inputs, scores = block0
    res = measure_block(block, inputs, scores, SensitivitySettings(candidates=(0.0, 1.0), bits_low=2, bits_high=4))
    single = res["single_losses"]
    assert (single[:, 1] < single[:, 0]).all()  # all columns at 4 bits beats all at 2 bits, for every layer


def test_quadratic_model_fidelity_is_reported(block0):
    block, inputs, scores = block0
    settings = SensitivitySettings(candidates=(0.02, 0.2), bits_low=2, bits_high=3)
    res = measure_block(block, inputs, scores, settings)
    fid = quadratic_fidelity(block, inputs, scores, settings, res["matrix"], n_assignments=12, seed=0)
    assert len(fid["predicted"]) == 12 and -1.0 <= fid["spearman"] <= 1.0


def test_gram_m_has_the_measured_diagonal_and_output_change_inner_products_off_it(block0):
    block, inputs, scores = block0
    settings = SensitivitySettings(candidates=(0.05, 0.2), bits_low=2, bits_high=3)
    before = [lin.weight.clone() for _, lin in block_linears(block)]
    gram = measure_block(block, inputs, scores, settings, method="gram")
    pairs = measure_block(block, inputs, scores, settings, method="pairs")
    m, k = gram["matrix"], 2
    assert gram["evaluations"] == 7 * k and gram["method"] == "gram"
    assert all(torch.equal(b, lin.weight) for b, (_, lin) in zip(before, block_linears(block), strict=True))
    assert torch.equal(m, m.T)
    # the diagonal is the same measured single loss as the pairs method's
    torch.testing.assert_close(gram["single_losses"], pairs["single_losses"], rtol=1e-5, atol=0.0)
    assert torch.equal(torch.diagonal(m), 2 * gram["single_losses"].flatten())
    # two candidates of one layer: never together, so 0 (as with pairs)
    assert m[0, 1] == 0 and m[12, 13] == 0
    # one cross-layer entry by hand: 2 <D1, D2> / N with D = change of the block's output
    lins = [lin for _, lin in block_linears(block)]
    names = [n for n, _ in block_linears(block)]
    w1 = mixed_fake_quant(lins[0].weight, scores[names[0]], 0.2, 3, 2)
    w2 = mixed_fake_quant(lins[6].weight, scores[names[6]], 0.05, 3, 2)

    def change(lin, w):
        total = []
        for i, h in enumerate(inputs.hidden):
            ref = run_block(block, h, inputs.kwargs_for(i), None)
            saved = lin.weight.data
            lin.weight.data = w
            try:
                total.append((run_block(block, h, inputs.kwargs_for(i), None) - ref).flatten())
            finally:
                lin.weight.data = saved
        return torch.cat(total).double()

    with torch.no_grad():
        expected = 2 * float(change(lins[0], w1) @ change(lins[6], w2)) / 2  # 2 samples
    assert m[0 * k + 1, 6 * k + 0].item() == pytest.approx(expected, rel=1e-4)
    # gram and pairs agree on the cross terms' sign and size where they are large
    big = pairs["matrix"].abs() > pairs["matrix"].abs().max() * 0.05
    assert (torch.sign(m[big]) == torch.sign(pairs["matrix"][big])).float().mean() > 0.5


def test_unknown_sensitivity_method_is_refused(block0):
    block, inputs, scores = block0
    with pytest.raises(ValueError, match="sensitivity method 'triples'; choose one of gram, pairs"):
        measure_block(block, inputs, scores, SensitivitySettings(), method="triples")


def test_gram_m_does_not_depend_on_how_windows_are_chunked(block0):
    """gram_matrix holds one candidate weight at a time and takes windows in chunks that fit its budget;
    one window per chunk and all windows in one chunk give the same bits as the block's K copies held at once."""
    from hiq.sensitivity import gram_matrix, quantized_candidates

    block, inputs, scores = block0
    settings = SensitivitySettings(candidates=(0.0, 0.05, 0.2), bits_low=2, bits_high=3)
    _, linears, held = quantized_candidates(block, scores, settings)
    made = []

    def weight_of(l_idx, m):
        made.append((l_idx, m))
        return held[l_idx][m]

    every = [(i, m) for i in range(7) for m in range(3)]
    one = gram_matrix(block, inputs, linears, weight_of, 3, budget=1)
    assert made == every * len(inputs)  # per chunk (one window each), each candidate weight once
    made.clear()
    together = gram_matrix(block, inputs, linears, weight_of, 3, budget=1 << 40)
    assert made == every and len(inputs) == 2
    assert all(torch.equal(a, b) for a, b in zip(one[:2], together[:2], strict=True)) and one[2] == together[2]
    measured = measure_block(block, inputs, scores, settings, method="gram")
    assert torch.equal(measured["matrix"], together[0])

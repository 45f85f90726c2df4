"""LWC, AdaRound and the hybrid linear on the bundled model's real weights."""

import pytest
import torch

from hiq.model import block_linears, find_blocks
from hiq.quant.grid import QuantSpec, fake_quant_rtn, group_widths
from hiq.quant.hybrid import HybridLinear
from hiq.quant.learned import GAMMA, ZETA, AdaRoundQuantizer, LWCQuantizer
from hiq.quant.mixed import mixed_fake_quant
from hiq.schedules import GammaAnnealing


@pytest.fixture(scope="module")
def layer(tiny):
    model, _ = tiny
    return dict(block_linears(find_blocks(model)[3]))["mlp.down_proj"]  # 384 input columns


def test_group_widths_keep_a_ragged_tail():
    assert group_widths(384, None) == [384]
    assert group_widths(300, 128) == [128, 128, 44]
    assert group_widths(40, 64) == [40]
    assert group_widths(0, 64) == []


@pytest.mark.parametrize("group_size", [None, 64])
def test_lwc_with_open_clipping_is_rtn(layer, group_size):
    w = layer.weight.detach().float()
    lwc = LWCQuantizer(w, 2, group_size, init=50.0)  # σ(50) = 1: no clipping
    torch.testing.assert_close(lwc(), fake_quant_rtn(w, QuantSpec(2, group_size)), rtol=0, atol=1e-6)


def test_lwc_init_clips_and_gets_gradients(layer):
    w = layer.weight.detach().float()
    lwc = LWCQuantizer(w, 2, None)
    assert torch.allclose(torch.sigmoid(lwc.upper), torch.tensor(0.98201379))
    out = lwc()
    assert len(out.unique()) > 4  # per row at most 4 levels, rows differ
    assert all(len(row.unique()) <= 4 for row in out)
    ((out - w) ** 2).sum().backward()
    assert lwc.upper.grad.abs().sum() > 0 and lwc.lower.grad.abs().sum() > 0


def test_adaround_starts_at_the_weight_and_hardens_to_a_grid(layer):
    w = layer.weight.detach().float()
    ada = AdaRoundQuantizer(w, 3, 128)
    # h(V) = fractional part: the soft quantizer is the weight itself, up to the grid's clamp at both ends
    s, z = ada._expand(ada.scale), ada._expand(ada.zero)
    torch.testing.assert_close(ada(), s * ((w / s + z).clamp(0, 7) - z), rtol=0, atol=1e-5)
    assert (ada() == w).float().mean() < 1 and (ada() - w).abs().lt(1e-5).float().mean() > 0.95
    h = ada.rounding()
    assert h.min() >= 0 and h.max() <= 1
    assert ada.regularizer(2.0) > 0
    record = ada.finish()
    hard = ada()
    assert ada.regularizer(2.0).item() == 0.0  # hard rounding: every h is 0 or 1
    for row in hard.split(128, dim=1):
        assert all(len(r.unique()) <= 8 for r in row)
    # untrained, V >= 0 <=> fractional part >= 0.5: the hard result is RTN on the same grid (ties aside:
    # torch.round goes half to even)
    differs = (hard - fake_quant_rtn(w, QuantSpec(3, 128))).abs() > 1e-6
    assert differs.float().mean() < 1e-3
    assert record["codes"].dtype == torch.uint8 and int(record["codes"].max()) <= 7


def test_rectified_sigmoid_constants():
    assert (ZETA, GAMMA) == (1.1, -0.1)
    v = torch.tensor([-100.0, 0.0, 100.0])
    q = AdaRoundQuantizer(torch.ones(1, 3), 2, None)
    q.v.data = v
    torch.testing.assert_close(q.rounding(), torch.tensor([0.0, 0.5, 1.0]))


@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("high", ["adaround", "lwc"])
def test_hybrid_record_roundtrip(layer, group_size, high):
    scores = torch.arange(384, dtype=torch.float64).flip(0)  # column 0 most important
    hybrid = HybridLinear(layer, scores, 0.2, 3, 2, group_size, high)
    assert hybrid.n_high == 76  # floor(0.2 * 384)
    assert torch.equal(hybrid.perm[:76], torch.arange(76))
    record = hybrid.finish()
    record.check_grid()
    # the record keeps float16-valued scales (what a packed checkpoint stores): the training-time weight up to
    # float16 rounding of the scales, codes unchanged
    for part in ("high", "normal"):
        assert torch.equal(record.part(part).scale, record.part(part).scale.half().float())
    torch.testing.assert_close(record.dequantize(), hybrid.quantized_weight(), rtol=2**-10, atol=1e-6)
    # groups never mix bit widths: the high part has its own groups (76 = 64 + 12 columns)
    if group_size == 64:
        assert record.high.scale.shape == (128, 2) and record.normal.scale.shape == (128, 5)
    weight_bits, storage = record.bits()
    assert weight_bits == 128 * (76 * 3 + 308 * 2) and storage > weight_bits
    x = torch.randn(5, 384)
    torch.testing.assert_close(hybrid(x), x @ hybrid.quantized_weight().T + (layer.bias or 0), rtol=1e-5, atol=1e-5)


def test_hybrid_at_init_matches_mixed_rtn_on_the_normal_part(layer):
    scores = torch.rand(384, generator=torch.Generator().manual_seed(0))
    hybrid = HybridLinear(layer, scores, 0.1, 3, 2, None, "lwc", lwc_init=50.0)
    expected = mixed_fake_quant(layer.weight.data, scores, 0.1, 3, 2, None)
    torch.testing.assert_close(hybrid.quantized_weight(), expected.float(), rtol=0, atol=1e-6)


def test_gamma_annealing_schedule():
    sched = GammaAnnealing(100, warmup=0.2, start=20, end=2)
    assert sched.value(0) == (20.0, False) and sched.value(19) == (20.0, False)
    assert sched.value(20) == (20.0, True)
    assert sched.value(60)[0] == pytest.approx(11.0)
    assert sched.value(100)[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="warmup=1.5"):
        GammaAnnealing(100, warmup=1.5)


def test_bad_high_quantizer_is_named(layer):
    with pytest.raises(ValueError, match="high_quantizer='gptq'"):
        HybridLinear(layer, torch.rand(384), 0.1, 3, 2, None, "gptq")


@pytest.mark.parametrize("group_size", [None, 64])
def test_signround_starts_at_rtn_and_finishes_on_its_forward(layer, group_size):
    from hiq.quant.grid import fake_quant_part
    from hiq.quant.learned import SignRoundQuantizer

    w = layer.weight.detach().float()[:, :300]  # 300 columns: a short last group at g64
    sr = SignRoundQuantizer(w, 2, group_size)
    assert torch.equal(sr(), fake_quant_part(w, 2, group_size))  # offset 0, clipping 1: round-to-nearest
    with torch.no_grad():  # any admissible state: the integer record dequantises to the forward
        sr.offset.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(0))
        sr.min_scale.uniform_(0.6, 1.0, generator=torch.Generator().manual_seed(1))
        sr.max_scale.uniform_(0.6, 1.0, generator=torch.Generator().manual_seed(2))
    rec = sr.finish()
    from hiq.quant.grid import dequantize_part

    torch.testing.assert_close(dequantize_part(rec["codes"], rec["scale"], rec["zero"], group_size), sr(),
                               rtol=0, atol=1e-6)
    assert int(rec["codes"].max()) <= 3 and rec["zero"].min() >= 0 and rec["zero"].max() <= 3


def test_signround_steps_lower_the_output_error_and_stay_in_bounds(layer):
    from hiq.blockfit import SignSGD
    from hiq.quant.learned import SignRoundQuantizer

    w = layer.weight.detach().float()
    x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(0))
    sr = SignRoundQuantizer(w, 2, None)
    opt = SignSGD(sr.parameters(), lr=0.01)

    def loss() -> torch.Tensor:
        return ((x @ sr().T - x @ w.T) ** 2).sum(-1).mean()

    start = loss().item()
    for _ in range(50):
        opt.zero_grad()
        loss().backward()
        assert sr.offset.grad.abs().sum() > 0 and sr.max_scale.grad.abs().sum() > 0  # straight-through
        opt.step()
        sr.project()
    assert loss().item() < 0.9 * start
    assert sr.offset.abs().max() <= 0.5 and 0 <= sr.min_scale.min() and sr.max_scale.max() <= 1
    assert sr.offset.abs().max() > 0.1  # the rounding of some weights really moved


def test_keep_best_returns_the_record_of_the_lowest_loss_step(tiny_copy):
    from hiq.blockfit import BlockReconstruction

    model, _ = tiny_copy
    block = find_blocks(model)[0]
    name, lin = block_linears(block)[0]
    hybrid = HybridLinear(lin, torch.rand(lin.in_features), 0.1, 3, 2, None, "signround", 4.0, "signround")
    module = BlockReconstruction(block, [hybrid], {}, 0, keep_best=True, lr_schedule="linear", iterations=3)
    records = {}
    for value, loss in ((0.1, 3.0), (0.2, 1.0), (0.3, 2.0)):
        with torch.no_grad():
            hybrid.normal.offset.fill_(value)
        records[value] = hybrid.record()
        module._remember_if_best(torch.tensor(loss))
    assert module.best_loss == 1.0 and module.best_step == 0
    (kept,) = module.finished_records()  # the integer record of the lowest-loss parameters, not the last ones
    codes = {v: r.normal.codes for v, r in records.items()}
    assert torch.equal(kept.normal.codes, codes[0.2]) and not torch.equal(codes[0.2], codes[0.3])
    assert torch.equal(kept.normal.scale, records[0.2].normal.scale)
    assert torch.all(hybrid.normal.offset == 0.3)  # the layer itself was left as the fit ended
    ada = HybridLinear(lin, torch.rand(lin.in_features), 0.1, 3, 2, None, "adaround", 4.0, "lwc")
    snapshot = ada.record()
    assert not ada.high.hard and all(torch.equal(snapshot.part(p).codes, ada.finish().part(p).codes)
                                     for p in ("high", "normal"))


def test_signround_cannot_share_an_optimizer_with_adam_parts():
    import hiq

    with pytest.raises(ValueError, match="use signround for both parts or for neither"):
        hiq.ReconstructionOptions(high_quantizer="adaround", normal_quantizer="signround")
    opts = hiq.ReconstructionOptions.preset("signround", iterations=7)
    assert (opts.high_quantizer, opts.normal_quantizer, opts.lr_schedule, opts.keep_best, opts.iterations) == \
        ("signround", "signround", "linear", False, 7)  # the last step's rounding (levers_w2_tiny.md)
    assert hiq.ReconstructionOptions.preset("signround") == hiq.ReconstructionOptions()  # the default
    paper = hiq.ReconstructionOptions.preset("paper")
    assert (paper.high_quantizer, paper.normal_quantizer, paper.lr_schedule, paper.keep_best) == \
        ("adaround", "lwc", "constant", False)
    with pytest.raises(ValueError, match="reconstruction preset 'best'"):
        hiq.ReconstructionOptions.preset("best")


def test_block_fits_clip_adam_gradients_but_not_signed_steps(tmp_path):
    import types

    import hiq
    from hiq.blockfit import inner_trainer

    rt = types.SimpleNamespace(device=torch.device("cpu"), is_global_zero=False, logger=None,
                               run=types.SimpleNamespace(root=tmp_path))
    signed = inner_trainer(rt, hiq.ReconstructionOptions.preset("signround", iterations=5), "b")
    paper = inner_trainer(rt, hiq.ReconstructionOptions.preset("paper", iterations=5), "b")
    # a signed step sees only each gradient's sign: scaling by the clipping factor cannot change it
    assert signed.gradient_clip_val is None
    assert paper.gradient_clip_val == 1.0


@pytest.mark.parametrize(("high", "normal", "group_size", "ratio"),
                         [("adaround", "lwc", None, 0.2), ("signround", "signround", None, 0.2),
                          ("signround", "signround", 64, 0.2), ("signround", "signround", None, 0.0)])
def test_recomputing_the_fake_quantized_weight_in_backward_gives_the_same_bits(layer, high, normal, group_size, ratio):
    """Wide layers recompute their fake-quantized weight in the backward pass (memory), in chunks of rows; outputs
    and every gradient are bit-identical to keeping the forward's intermediates, for one chunk and for several (the
    last one shorter). AdaRound's sigmoid is the exception in several chunks: where a chunk edge moves the vectorised
    loop's tail, its gradient can differ in the last bit (1 ulp measured), so it is compared to 1e-6 there."""
    x = torch.randn(2, 16, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    results = []
    for recompute_from, rows_of in ((1 << 62, None), (0, 1 << 62), (0, 5 * layer.in_features)):
        hybrid = HybridLinear(layer, torch.rand(layer.in_features, generator=torch.Generator().manual_seed(1)), ratio,
                              3, 2, group_size, high, 4.0, normal)
        hybrid.recompute_from = recompute_from
        if rows_of is not None:
            hybrid.recompute_rows_of = rows_of
        out = hybrid(x)
        (out.float().pow(2).sum() + hybrid.regularizer(4.0)).backward()
        results.append((out.detach(), [p.grad for p in hybrid.parameters()]))
    assert layer.out_features % 5 != 0  # the chunked run's last chunk is shorter
    out_a, grads_a = results[0]
    assert out_a.dtype == torch.bfloat16 and any(g is not None and g.abs().sum() > 0 for g in grads_a)
    for chunks, (out_b, grads_b) in zip(("one", "several"), results[1:], strict=True):
        assert torch.equal(out_a, out_b)
        for a, b in zip(grads_a, grads_b, strict=True):
            assert (a is None) == (b is None)
            assert a is not None or ratio == 0  # only an empty high part gets no gradient
            if a is not None and chunks == "several" and high == "adaround":
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
            elif a is not None:
                assert torch.equal(a, b)


@pytest.mark.parametrize(("high", "normal"), [("adaround", "lwc"), ("signround", "signround"), ("lwc", "lwc")])
def test_a_bf16_layer_is_quantized_as_its_float32_copy_would_be(layer, high, normal):
    """The quantizers keep a bf16 weight in bf16 (half the memory) and compute in float32: the fake-quantized
    weight, the gradients and the finished record are those of the same weight held in float32."""
    import copy

    scores = torch.rand(layer.in_features, generator=torch.Generator().manual_seed(2))
    half = copy.deepcopy(layer).to(torch.bfloat16)
    full = copy.deepcopy(half).float()
    results = []
    for lin in (half, full):
        hybrid = HybridLinear(lin, scores, 0.1, 3, 2, None, high, 4.0, normal)
        w = hybrid.quantized_weight()
        (w.pow(2).sum() + hybrid.regularizer(4.0)).backward()
        results.append((hybrid.high.weight.dtype, w.detach(), [p.grad for p in hybrid.parameters()], hybrid.finish()))
    (dtype_h, w_h, g_h, rec_h), (dtype_f, w_f, g_f, rec_f) = results
    assert (dtype_h, dtype_f) == (torch.bfloat16, torch.float32) and w_h.dtype == torch.float32
    assert torch.equal(w_h, w_f) and all(torch.equal(a, b) for a, b in zip(g_h, g_f, strict=True))
    for part in ("high", "normal"):
        assert all(torch.equal(getattr(rec_h.part(part), k), getattr(rec_f.part(part), k))
                   for k in ("codes", "scale", "zero"))


@pytest.mark.parametrize("fails", [False, True])
def test_fit_block_releases_the_weights_and_leaves_records_or_its_own(tiny, tmp_path, monkeypatch, fails):
    """While a block fits, its linears' own weights are released (the quantizers hold a copy); afterwards the block
    holds the records' weights, or after a failed fit exactly its own weights again."""
    import copy
    import types

    import hiq
    from hiq.blockfit import BlockReconstruction, fit_block
    from hiq.layouts import layout_for
    from hiq.model import block_outputs, capture_block_inputs

    model = copy.deepcopy(tiny[0])
    layout, block = layout_for(model), model.model.layers[1]
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, ids, batch_size=2, device="cpu")
    with torch.no_grad():
        targets = block_outputs(block, inputs, "cpu")
    names = [n for n, _ in layout.block_linears(block)]
    linears = dict(layout.block_linears(block))
    own = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    scores = {n: torch.rand(own[n].shape[1], generator=torch.Generator().manual_seed(1)) for n in names}
    sizes = []
    original_step = BlockReconstruction.training_step

    def step(self, batch, batch_idx):
        sizes.append([lin.weight.numel() for lin in linears.values()])
        if fails:
            raise FloatingPointError("stop here")
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(BlockReconstruction, "training_step", step)
    rt = types.SimpleNamespace(device=torch.device("cpu"), is_global_zero=False, logger=None, world_size=1,
                               trainer=None, run=types.SimpleNamespace(root=tmp_path))
    opts = hiq.ReconstructionOptions(iterations=2, batch_size=2)
    fit = lambda: fit_block(block, layout, 1, scores, dict.fromkeys(names, 0.2), inputs, targets,  # noqa: E731
                            hiq.QuantOptions(bits=2, bits_high=3), opts, rt, "b")
    if fails:
        with pytest.raises(FloatingPointError, match="stop here"):
            fit()
        expected = own
    else:
        layers, steps = fit()
        assert steps == 2
        expected = {n: layers[n].dequantize() for n in names}
    assert sizes and all(s == 0 for s in sizes[0])  # released while fitting
    for name, lin in layout.block_linears(block):
        assert isinstance(lin, torch.nn.Linear) and torch.equal(lin.weight, expected[name].to(lin.weight.dtype))


def test_sign_steps_inside_the_backward_move_the_offsets_exactly_as_after_it(tiny, tmp_path, monkeypatch):
    """SignSGD's step per parameter inside the backward (gradients dropped as they are used: one layer's at a time)
    gives bit for bit the records of the step after the backward, under the linear learning-rate decay."""
    import copy
    import types

    import hiq
    from hiq.blockfit import BlockReconstruction, SignSGD, fit_block
    from hiq.layouts import layout_for
    from hiq.model import block_outputs, capture_block_inputs

    ids = torch.randint(0, tiny[0].config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    held = []
    original = SignSGD.step

    def step(self, closure=None):
        loss = original(self, closure)
        held.append(sum(p.grad is not None for g in self.param_groups for p in g["params"]))
        return loss

    monkeypatch.setattr(SignSGD, "step", step)
    results = {}
    for inside in (True, False):
        monkeypatch.setattr(BlockReconstruction, "step_in_backward", inside)
        model = copy.deepcopy(tiny[0])
        layout, block = layout_for(model), model.model.layers[2]
        inputs = capture_block_inputs(model, ids, batch_size=2, device="cpu")
        with torch.no_grad():
            targets = block_outputs(block, inputs, "cpu")
        names = [n for n, _ in layout.block_linears(block)]
        scores = {n: torch.linspace(0, 1, lin.in_features) for n, lin in layout.block_linears(block)}
        rt = types.SimpleNamespace(device=torch.device("cpu"), is_global_zero=False, logger=None, world_size=1,
                                   trainer=None, run=types.SimpleNamespace(root=tmp_path))
        opts = hiq.ReconstructionOptions.preset("signround", iterations=6, batch_size=2, lr_schedule="linear")
        held.clear()
        layers, _ = fit_block(block, layout, 2, scores, dict.fromkeys(names, 0.1), inputs, targets,
                              hiq.QuantOptions(bits=2, bits_high=3), opts, rt, "b")
        results[inside] = (layers, list(held))
    (inside, held_inside), (after, held_after) = results[True], results[False]
    assert held_inside == [0] * 6 and all(h > 0 for h in held_after)  # no gradient left for the optimizer's step
    for name, record in inside.items():
        for part in ("high", "normal"):
            a, b = record.part(part), after[name].part(part)
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


@pytest.mark.parametrize("group_size", [None, 64])
def test_weighted_clip_search_picks_the_least_weighted_error_factor(layer, group_size):
    """Per row and group the chosen factor's round-to-nearest error (weighted by the column importances) is the least
    of every factor tried: at most min-max's, and below it where a clipped grid fits better."""
    from hiq.quant.grid import (
        CLIP_FACTORS,
        expand_groups,
        fake_quant_part,
        group_range,
        group_sums,
        scale_zero,
        weighted_clip_search,
    )

    w = layer.weight.detach().float()[:, :300]
    widths = group_widths(300, group_size)
    lo, hi = group_range(w, widths)
    imp = torch.rand(300, generator=torch.Generator().manual_seed(0))
    best = weighted_clip_search(w, widths, lo, hi, 3, imp)

    def err(factor):
        scale, zero = scale_zero(lo * factor, hi * factor, 3)
        s, z = expand_groups(scale, widths), expand_groups(zero, widths)
        q = ((w / s).round() + z).clamp(0, 3).sub(z).mul(s)
        return group_sums((q - w).square() * imp, widths)

    chosen = err(best)
    for factor in CLIP_FACTORS:
        assert (chosen <= err(torch.full_like(best, factor)) + 1e-6).all()
    tried = torch.tensor(CLIP_FACTORS, dtype=torch.float32)
    assert torch.isin(best, tried).all() and (best < 1).any()  # W2 clips somewhere
    torch.testing.assert_close(group_sums((fake_quant_part(w, 2, group_size) - w).square() * imp, widths),
                               err(torch.ones_like(best)))  # factor 1 is min-max: what SignRound starts from


def test_clip_search_follows_the_importance_of_an_outlier_column():
    """An outlying weight whose column sees no input costs nothing: the grid is clipped to fit the other columns
    (0.6 of the range); the more that column's input weighs, the more of the range is kept (0.925 at 1e4)."""
    from hiq.quant.grid import group_range, weighted_clip_search

    w = torch.linspace(-1, 1, 64).repeat(3, 1)
    w[:, 0] = 1.6
    lo, hi = group_range(w, [64])
    chosen = []
    for weight in (0.0, 1.0, 1e4):
        imp = torch.ones(64)
        imp[0] = weight
        chosen.append(float(weighted_clip_search(w, [64], lo, hi, 3, imp)[0]))
    assert chosen == pytest.approx([0.6, 0.675, 0.925])


def test_signround_init_clip_starts_from_the_searched_grid(layer):
    from hiq.quant.grid import group_range, weighted_clip_search
    from hiq.quant.learned import SignRoundQuantizer

    w = layer.weight.detach().float()
    imp = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(0))
    sr = SignRoundQuantizer(w, 2, None)
    sr.init_clip(imp)
    best = weighted_clip_search(w, [w.shape[1]], *group_range(w, [w.shape[1]]), 3, imp)
    assert torch.equal(sr.min_scale, best) and torch.equal(sr.max_scale, best)
    rec = sr.finish()  # offsets 0: round-to-nearest on the clipped grid, still exactly its forward
    from hiq.quant.grid import dequantize_part

    torch.testing.assert_close(dequantize_part(rec["codes"], rec["scale"], rec["zero"], None), sr(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="383 column importances for a part with 384 columns"):
        sr.init_clip(imp[:383])


def test_hybrid_init_clip_permutes_the_importances_and_refuses_other_quantizers(layer):
    from hiq.quant.grid import group_range, weighted_clip_search

    scores = torch.rand(384, generator=torch.Generator().manual_seed(3))
    imp = torch.rand(384, generator=torch.Generator().manual_seed(4))
    h = HybridLinear(layer, scores, 0.2, 3, 2, None, "signround", normal_quantizer="signround")
    h.init_clip(imp)
    normal_w, normal_imp = h.normal.weight, imp[h.perm][h.n_high:]
    expected = weighted_clip_search(normal_w, h.normal.widths, *group_range(normal_w, h.normal.widths), 3, normal_imp)
    assert torch.equal(h.normal.min_scale, expected)
    paper = HybridLinear(layer, scores, 0.2, 3, 2, None, "adaround", normal_quantizer="lwc")
    with pytest.raises(ValueError, match="clip_init=search needs SignRound parts"):
        paper.init_clip(imp)


def test_input_moments_are_each_linears_mean_squared_input(tiny):
    """The block's q_proj sees the normalised hidden states: its moments are their mean square per channel."""
    import copy

    from hiq.blockfit import input_moments
    from hiq.layouts import layout_for
    from hiq.model import capture_block_inputs

    model = copy.deepcopy(tiny[0])
    layout, block = layout_for(model), model.model.layers[2]
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, ids, batch_size=2, device="cpu")
    moments = input_moments(block, layout, inputs, "cpu")
    assert set(moments) == {n for n, _ in layout.block_linears(block)}
    with torch.no_grad():
        normed = torch.cat([block.input_layernorm(h) for h in inputs.hidden]).reshape(-1, 128).float()
    torch.testing.assert_close(moments["self_attn.q_proj"], normed.square().mean(0))
    assert moments["mlp.down_proj"].shape == (384,) and (moments["mlp.down_proj"] > 0).all()


def test_clip_init_is_checked_and_keeps_the_old_keys_at_minmax():
    import hiq

    with pytest.raises(ValueError, match=r"clip_init='mse'; choose one of minmax, search"):
        hiq.ReconstructionOptions(clip_init="mse")
    with pytest.raises(ValueError, match="use clip_init='minmax'"):
        hiq.ReconstructionOptions.preset("paper", clip_init="search")
    assert "clip_init" not in hiq.ReconstructionOptions().fingerprint()  # runs made before the option resume
    assert hiq.ReconstructionOptions(clip_init="search").fingerprint()["clip_init"] == "search"


def test_trimmed_loss_leaves_out_the_largest_errors_and_is_the_plain_loss_at_zero():
    from hiq.blockfit import trimmed_squared_error

    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(2, 50, 10, generator=g), torch.randn(2, 50, 10, generator=g)
    assert torch.equal(trimmed_squared_error(out, target), (out - target).pow(2).sum(-1).mean())
    err = (out - target).square().reshape(-1)
    kept = err.sort().values[: 1000 - 10]  # 1 % of 1,000 errors left out: the ten largest
    torch.testing.assert_close(trimmed_squared_error(out, target, 0.01), kept.sum() / 100)
    out[0, 0, 0] += 1e6  # one exploding activation moves the plain loss, not the trimmed one
    assert trimmed_squared_error(out, target, 0.01) < 10 < trimmed_squared_error(out, target)
    import hiq

    with pytest.raises(ValueError, match=r"loss_trim=0.5 must be in \[0, 0.5\)"):
        hiq.ReconstructionOptions(loss_trim=0.5)
    assert "loss_trim" not in hiq.ReconstructionOptions().fingerprint()

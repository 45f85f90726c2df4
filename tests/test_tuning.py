"""End-to-end scale tuning (hiq.tuning): the trainable layer starts as its record, the teacher is the
full-precision model, and the stage's options are checked before any model loads."""

import copy

import pytest
import torch

import hiq
from hiq.model import capture_block_inputs
from hiq.quant.hybrid import HybridLinear
from hiq.quant.record import LayerRecord
from hiq.tuning import (
    ScaledCodesLinear,
    ScaleTuning,
    WindowPairs,
    from_final_hidden,
    replaced_output,
    token_kl,
)


def _record(tiny, ratio: float, group_size=None) -> LayerRecord:
    model, _ = tiny
    lin = model.model.layers[2].mlp.down_proj
    scores = torch.linspace(0, 1, lin.in_features)
    hybrid = HybridLinear(lin, scores, ratio, 3, 2, group_size, "signround", normal_quantizer="signround")
    return LayerRecord.from_dict(hybrid.finish())


def _last_block_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The model's last block outputs, one (1, seq, hidden) tensor per window, block by block."""
    inputs = capture_block_inputs(model, ids, batch_size=1, device="cpu")
    out = []
    for i, h in enumerate(inputs.hidden):
        for block in model.model.layers:
            h = block(h, **inputs.kwargs_for(i))
            h = h[0] if isinstance(h, tuple) else h
        out.append(h)
    return out


@pytest.mark.parametrize("ratio,group_size", [(0.2, None), (0.0, None), (1.0, None), (0.1, 128)])
def test_scaled_layer_starts_at_its_record(tiny, ratio, group_size):
    record = _record(tiny, ratio, group_size)
    layer = ScaledCodesLinear(record)
    assert torch.equal(layer.weight().detach(), record.dequantize())
    x = torch.randn(3, record.in_features)
    assert torch.allclose(layer(x), x @ record.dequantize().T, atol=1e-5)
    scales = layer.tuned_scales()
    for part in ("high", "normal"):
        assert torch.equal(scales[part], record.part(part).scale)  # already float16 values


def test_tuned_scales_move_only_the_scales(tiny):
    record = _record(tiny, 0.2)
    layer = ScaledCodesLinear(record)
    with torch.no_grad():
        layer.log_scale["normal"].fill_(0.1)
    tuned = record.with_scales(layer.tuned_scales())
    for part in ("high", "normal"):  # codes, zeros and permutation are the block fit's
        assert torch.equal(tuned.part(part).codes, record.part(part).codes)
        assert torch.equal(tuned.part(part).zero, record.part(part).zero)
        assert torch.equal(tuned.part(part).scale, tuned.part(part).scale.half().float())  # what packed/ stores
    assert torch.equal(tuned.perm, record.perm)
    assert torch.allclose(tuned.normal.scale, record.normal.scale * torch.exp(torch.tensor(0.1)), rtol=1e-3)
    assert torch.allclose(tuned.dequantize(), layer.weight().detach(), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="tuned high scales have shape"):
        record.with_scales({"high": torch.ones(3, 3), "normal": record.normal.scale})


def _saved_numels(layer, x) -> tuple[torch.Tensor, list[int]]:
    """The layer's output and the sizes of every tensor autograd saved for its backward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    return out, sizes


def test_wide_layers_recompute_their_weight_in_backward_same_bits(tiny):
    """The tuning layer holds the record's integer codes, not a float weight, and (from ``recompute_from`` weights
    up) saves no weight-sized tensor for the backward; outputs and gradients are bit-identical either way."""
    record = _record(tiny, 0.2)
    x = torch.randn(2, 16, record.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    results = []
    for recompute_from in (0, 1 << 62):
        layer = ScaledCodesLinear(record, torch.bfloat16)
        assert layer.high_codes.data_ptr() == record.high.codes.data_ptr()  # shared, 1 byte per weight
        assert not any(b.is_floating_point() and b.numel() >= record.params for b in layer.buffers())
        layer.recompute_from = recompute_from
        with torch.no_grad():
            layer.log_scale["normal"].fill_(0.05)
        out, saved = _saved_numels(layer, x)
        assert (max(saved) < record.params) == (recompute_from == 0), saved
        out.float().pow(2).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in layer.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert out_a.dtype == torch.bfloat16 and torch.equal(out_a, out_b)
    assert len(grads_a) == 2 and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert all(g.abs().sum() > 0 for g in grads_a)


def test_swapped_last_block_output_gives_the_full_precision_logits(tiny):
    """The teacher: any model whose last block's output is replaced by the full-precision one scores exactly as the
    full-precision model (the final norm and head are not quantized)."""
    model, _ = tiny
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp_logits = model(input_ids=ids).logits
        hidden = torch.cat(_last_block_outputs(model, ids))
        damaged = copy.deepcopy(model)
        for p in damaged.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert not torch.allclose(damaged(input_ids=ids).logits, fp_logits, atol=1e-2)
        with replaced_output(damaged.model.layers[-1], hidden):
            swapped = damaged(input_ids=ids).logits
        assert torch.allclose(swapped, fp_logits, atol=1e-4)
        # the hook is gone afterwards
        assert not torch.allclose(damaged(input_ids=ids).logits, fp_logits, atol=1e-2)
    logp = torch.log_softmax(fp_logits, -1)
    assert token_kl(fp_logits, logp).item() == pytest.approx(0.0, abs=1e-6)
    # one block instead of all: the block list is cut to the last block while active, then restored
    blocks = damaged.model.layers
    calls = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    with torch.no_grad(), from_final_hidden(damaged, "model.layers", hidden):
        assert len(damaged.model.layers) == 1
        short = damaged(input_ids=ids, use_cache=False).logits
    for h in handles:
        h.remove()
    assert calls == [len(blocks) - 1]
    assert damaged.model.layers is blocks
    assert torch.allclose(short, fp_logits, atol=1e-4)
    assert token_kl(swapped + torch.randn_like(swapped), logp).item() > 0.01


def test_kl_from_the_quantized_paths_outputs_equals_the_full_forward(tiny):
    """The KL before tuning takes the student's logits from its last block's outputs (no block forward): the same
    value as the student's full forward."""
    model, _ = tiny
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.model.layers.parameters():
            p.add_(0.02 * torch.randn_like(p))
    with torch.no_grad():
        fp_hidden, q_hidden = _last_block_outputs(model, ids), _last_block_outputs(student, ids)
    tuning = ScaleTuning(student, "model.layers", [], lr=1e-3, steps=1, cache_teacher=True)
    data = WindowPairs(ids, fp_hidden)
    fast = tuning.kl_sum(data, 2, student_hidden=q_hidden)
    full = tuning.kl_sum(data, 2)
    assert fast[1] == full[1] == ids.numel()
    assert fast[0] > 0 and fast[0] == pytest.approx(full[0], rel=1e-4)


@pytest.mark.parametrize("options,message", [
    ({"tune_steps": -1}, "reconstruction.tune_steps=-1 must be 0"),
    ({"tune_lr": 0.0}, "reconstruction.tune_lr"),
    ({"tune_batch_size": 0}, "reconstruction.tune_batch_size=0 must be at least 1"),
])
def test_bad_tuning_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        hiq.ReconstructionOptions(**options)


def test_tuning_batch_larger_than_the_windows_fails_before_any_stage(tmp_path):
    recipe = hiq.Recipe(ratios={"mode": "fixed", "fixed_ratio": 0.0}, sensitivity={"enabled": False},
                        reconstruction={"batch_size": 2, "tune_batch_size": 8})
    with pytest.raises(ValueError, match=r"tune_batch_size=8 is larger than the 4 calibration windows.*"
                                         r"tune_steps=0"):
        hiq.quantize("tiny-llama", recipe=recipe, calibration=hiq.CalibrationOptions(nsamples=4, seqlen=64),
                     run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "fisher.safetensors").exists()


def test_presets_and_fingerprints():
    paper, default = hiq.ReconstructionOptions.preset("paper"), hiq.ReconstructionOptions()
    assert paper.tune_steps == 0 and default.tune_steps > 0  # the paper has no end-to-end step
    # the tuning options are not part of a block's key: changing them keeps every block
    assert hiq.ReconstructionOptions(tune_steps=3, tune_lr=1e-2).fingerprint() == default.fingerprint()
    assert hiq.ReconstructionOptions(tune_steps=3).tuning_fingerprint() != default.tuning_fingerprint()
    assert "tune_steps" not in default.fingerprint() and "iterations" not in default.tuning_fingerprint()


def _tuning_case(tiny):
    """A copy of the tiny model whose last block's v_proj/down_proj hold quantized records, its windows, and the
    full-precision and quantized last-block outputs (what the reconstruction hands the tuning)."""
    import types

    from hiq.artifacts import RunDir

    model = copy.deepcopy(tiny[0])
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        final = _last_block_outputs(model, ids)
    block, records = model.model.layers[-1], {}
    for child in ("self_attn.v_proj", "mlp.down_proj"):
        lin = block.get_submodule(child)
        hybrid = HybridLinear(lin, torch.linspace(0, 1, lin.in_features), 0.2, 3, 2, None, "signround",
                              normal_quantizer="signround")
        records[f"model.layers.{len(model.model.layers) - 1}.{child}"] = LayerRecord.from_dict(hybrid.finish())
    with torch.no_grad():  # what the block fit installs: the records' dequantised weights
        for name, record in records.items():
            model.get_submodule(name).weight.copy_(record.dequantize())
    with torch.no_grad():
        q_final = _last_block_outputs(model, ids)
    rt = types.SimpleNamespace(device=torch.device("cpu"), is_global_zero=False, logger=None, world_size=1,
                               trainer=None, run=RunDir("unused"), log=lambda metrics: None,
                               reduce_sum=lambda t: t, offload=False)
    return model, records, ids, final, q_final, rt


@pytest.mark.parametrize(("lr", "offload"), [(0.01, False), (1e4, False), (0.01, True)])
def test_tune_scales_leaves_the_model_with_the_weights_it_returns(tiny, lr, offload):
    """While tuning, the swapped-out weights are released (the codes stand in); afterwards every tuned layer holds
    its record under the returned scales, and after a failure the block fits' weights again. With ``offload`` (the
    codes in host memory, copied per use) the result is the same."""
    from hiq.tuning import tune_scales

    model, records, ids, final, q_final, rt = _tuning_case(tiny)
    rt.offload = offload
    opts = hiq.ReconstructionOptions(tune_steps=3, tune_batch_size=2, tune_lr=lr)
    if lr > 1:  # exp(±1e4) scales: the KL goes non-finite after the first step
        with pytest.raises(FloatingPointError, match="end-to-end tuning"):
            tune_scales(model, "model.layers", records, ids, final, q_final, opts, rt, "k")
        expected = {name: r.dequantize() for name, r in records.items()}
    else:
        saved = tune_scales(model, "model.layers", records, ids, final, q_final, opts, rt, "k")
        assert saved["kept"] and saved["kl_after"] < saved["kl_before"]
        expected = {name: r.with_scales(saved["scales"][name]).dequantize() for name, r in records.items()}
        assert not all(torch.equal(expected[n], r.dequantize()) for n, r in records.items())
        if offload:  # the same fit as with the codes held by the layers
            plain_model, *_, plain_rt = _tuning_case(tiny)
            plain = tune_scales(plain_model, "model.layers", records, ids, final, q_final, opts, plain_rt, "k")
            assert plain["kl_after"] == saved["kl_after"]
            assert all(torch.equal(plain["scales"][n][p], saved["scales"][n][p])
                       for n in records for p in plain["scales"][n])
    for name, weight in expected.items():
        lin = model.get_submodule(name)
        assert isinstance(lin, torch.nn.Linear) and torch.equal(lin.weight, weight.to(lin.weight.dtype))
        assert lin.weight.requires_grad

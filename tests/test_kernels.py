"""The int4 kernel path of packed layers (hiq.kernels): the learnt layout decodes back, every mode computes the
layer's product, bf16 runs as close to the dequantised model as a dense bf16 model does, fallbacks say so, and a
packed checkpoint never loads silently wrong without ``import hiq``."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import hiq  # noqa: F401  (registers quant_method "hiq")
from hiq import kernels
from hiq.packed import GUARD_KEY, PackedLinear, save_packed
from hiq.quant.grid import group_widths
from tests.test_packed import TOKENS, quantized_records

needs_kernel = pytest.mark.skipif(kernels.cpu_layout() is None, reason="this torch build has no CPU int4 kernel")


@needs_kernel
@pytest.mark.parametrize("rows,cols", [(64, 32), (96, 64), (16, 96), (4160, 256)])
def test_learnt_layout_decodes_the_kernel_weight(rows, cols):
    codes = torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(rows), dtype=torch.int32)
    pad = -rows % kernels.ROW_ALIGN
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.nn.functional.pad(codes, (0, 0, 0, pad)), 2)
    got = kernels.decode_codes(packed, kernels.cpu_layout(), 0, rows + pad)[:rows]
    assert torch.equal(got.int(), codes)


def _random_part(out, width, bits, group_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    widths = group_widths(width, group_size)
    codes = torch.randint(0, 1 << bits, (out, width), generator=gen)
    zero = torch.randint(0, 1 << bits, (out, len(widths)), generator=gen)
    scale = (torch.rand(out, len(widths), generator=gen) * 0.02 + 0.001).half()
    reps = torch.tensor(widths)
    weight = (codes.float() - zero.float().repeat_interleave(reps, 1)) * scale.float().repeat_interleave(reps, 1)
    return codes, scale, zero, widths, weight


@needs_kernel
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 32, 128])
def test_every_mode_computes_the_layer(bits, group_size):
    out, in_features, n_high = 80, 384, 70   # rows not a multiple of the kernel's blocks, a part of partial groups
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(3))
    parts, weight = [], torch.zeros(out, in_features)
    for i, (cols, b) in enumerate(((perm[:n_high], min(bits + 1, 4)), (perm[n_high:], bits))):
        codes, scale, zero, widths, w = _random_part(out, cols.numel(), b, group_size, seed=i)
        group = kernels.kernel_group_size(cols.numel(), group_size)
        parts.append(kernels.prepare_part(codes, scale, zero, b, cols, widths, group))
        weight[:, cols] = w
    layout = kernels.cpu_layout()
    assert torch.equal(kernels.dequantized_weight(parts, layout, in_features, out), weight)
    x = torch.randn(3, 5, in_features, generator=torch.Generator().manual_seed(4))
    ref = x @ weight.T
    exact = kernels.int4_linear(x, parts, layout, in_features, out, None, "exact")
    assert torch.equal(exact, torch.nn.functional.linear(x, weight))
    dense_bf16 = (x.bfloat16() @ weight.bfloat16().T).float()
    bound = 2 * (dense_bf16 - ref).abs().max() + 1e-3
    for mode in ("kernel", "dequant-gemm"):
        got = kernels.int4_linear(x.bfloat16(), parts, layout, in_features, out, None, mode).float()
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= bound, mode


@needs_kernel
def test_packed_model_runs_on_the_kernel(tiny, tmp_path):
    model = copy.deepcopy(tiny[0])
    records = quantized_records(model, 32)
    out = save_packed(model, records, tmp_path / "packed", tokenizer=tiny[1])
    fp32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    layers = [m for m in fp32.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.kernel_ready for m in layers)
    # the bit-packed codes are gone; what stays is 4 bits per code (parts padded to whole kernel groups: on these
    # 128-wide layers a 12-column part takes 32) plus scales and the column index
    for m in layers:
        assert not hasattr(m, "normal_codes")
        assert m.resident_bytes() < m.in_features * m.out_features * 2 * 0.5   # < half of fp16
    with torch.no_grad():
        ref = model(TOKENS).logits
        assert torch.equal(fp32(TOKENS).logits, ref)   # float32: the exact path
        bf16 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        dense = copy.deepcopy(model).bfloat16()
        for n in (4, TOKENS.shape[1]):                 # decode-sized (kernel) and prefill-sized (dequant-gemm)
            err = (bf16(TOKENS[:, :n]).logits.float() - ref[:, :n]).abs().max()
            dense_err = (dense(TOKENS[:, :n]).logits.float() - ref[:, :n]).abs().max()
            assert err <= 2 * dense_err, n


def test_unsupported_layers_keep_the_dequantising_path(tiny, tmp_path):
    model = copy.deepcopy(tiny[0])
    records = quantized_records(model, 48)   # g48: no kernel group of that size
    out = save_packed(model, records, tmp_path / "packed", tokenizer=tiny[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    messages = [str(w.message) for w in caught if "dequantising path" in str(w.message)]
    assert len(messages) == 1 and "group size 48" in messages[0] and "q_proj" in messages[0]
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, PackedLinear)}
    assert not any(m.kernel_ready for m in layers.values())
    for name, record in records.items():
        assert torch.equal(layers[name].dequantized_weight(), record.dequantize())
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)


def test_loading_without_hiq_fails_and_names_the_fix(tiny, tmp_path):
    model = copy.deepcopy(tiny[0])
    out = save_packed(model, quantized_records(model, None), tmp_path / "packed", tokenizer=tiny[1])
    code = f"from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained({str(out)!r})\n" \
           "print('LOADED')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "LOADED" not in res.stdout
    assert GUARD_KEY in res.stderr and "import_hiq" in GUARD_KEY

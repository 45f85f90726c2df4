"""The CUDA path: the whole ``hiq fit`` pipeline on one GPU agrees with the CPU run.

Skipped where no GPU is visible (CI has none). On a GPU machine: ``pytest -m cuda``.
"""

import json

import pytest
import torch

from hiq.artifacts import load_tensors
from hiq.cli import main
from tests.test_fit_pipeline import _config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]


def _fit(cfg, run, *extra):
    assert main(["fit", "--config", cfg, f"--trainer.default_root_dir={run}", *extra]) == 0
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda")
    cfg = _config(tmp)
    cpu = _fit(cfg, tmp / "cpu", "--trainer.accelerator=cpu")
    gpu = _fit(cfg, tmp / "gpu", "--trainer.accelerator=gpu", "--trainer.devices=1")
    return tmp, cpu, gpu


def test_pipeline_runs_on_the_gpu(both):
    tmp, cpu, gpu = both
    assert cpu["device"] == "cpu"
    assert gpu["device"].startswith("cuda:0 (")
    # the reconstruction's tensors came back to the host: block files load on a machine without a GPU
    block = load_tensors(tmp / "gpu" / "blocks" / "block_00.safetensors")
    for rec in block["layers"].values():
        assert rec["perm"].device.type == "cpu"


def test_gpu_agrees_with_cpu(both):
    tmp, cpu, gpu = both
    f_cpu = load_tensors(tmp / "cpu" / "fisher.safetensors")["scores"]
    f_gpu = load_tensors(tmp / "gpu" / "fisher.safetensors")["scores"]
    for name, s in f_cpu.items():
        torch.testing.assert_close(f_gpu[name], s, rtol=1e-3, atol=1e-12)
    r_cpu, r_gpu = (json.loads((tmp / d / "ratios.json").read_text()) for d in ("cpu", "gpu"))
    assert [x["ratio"] for x in r_gpu["layers"]] == [x["ratio"] for x in r_cpu["layers"]]
    assert gpu["avg_bits"] == cpu["avg_bits"]
    # float arithmetic differs between devices, so the learned roundings may differ a little, not the result
    assert gpu["wikitext2_ppl"] == pytest.approx(cpu["wikitext2_ppl"], rel=0.03)
    for b_cpu, b_gpu in zip(cpu["blocks"], gpu["blocks"], strict=True):
        assert b_gpu["loss_final"] == pytest.approx(b_cpu["loss_final"], rel=0.05)


def test_offload_keeps_the_block_weights_off_the_device(tiny):
    """``model.offload``: Fisher with the block linears' weights in host memory peaks on the device below the
    block weights' bytes (one layer at a time crosses), and gives the scores of the model held on the device."""
    import copy

    from hiq.impact import FisherAccumulator
    from hiq.layouts import layout_for
    from hiq.offload import on_device

    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    linears = layout_for(model).linears_of(model)
    weights = sum(lin.weight.numel() * lin.weight.element_size() for _, lin in linears)
    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    scores, peaks = {}, {}
    for host in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        acc = FisherAccumulator(model, linears)
        with on_device(model, "cuda", [lin for _, lin in linears] if host else ()):
            acc.accumulate(list(ids), "cuda", batch_size=2)
        peaks[host], scores[host] = torch.cuda.max_memory_allocated() - base, acc.scores()
    assert all(torch.allclose(scores[True][k], scores[False][k], rtol=1e-5, atol=0) for k in scores[True])
    biggest = max(lin.weight.numel() * lin.weight.element_size() for _, lin in linears)
    assert peaks[False] - peaks[True] >= weights - 2 * biggest, (peaks, weights)

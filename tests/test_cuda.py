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

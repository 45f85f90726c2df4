"""hiq.offload: the whole-model stages with the block weights in host memory, copied to the device per use. On the
CPU this is the same code path with nothing to copy: results must be bit-identical, the weights back in place."""

import copy

import pytest
import torch

from hiq.impact import FisherAccumulator
from hiq.layouts import layout_for
from hiq.model import float32_cpu_linears
from hiq.offload import on_device, should_offload


def _fisher(model, ids, host: bool):
    linears = layout_for(model).linears_of(model)
    acc = FisherAccumulator(model, linears)
    with on_device(model, "cpu", [lin for _, lin in linears] if host else ()), float32_cpu_linears(model):
        acc.accumulate(list(ids), "cpu", batch_size=2)
    return acc.scores()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fisher_with_host_weights_is_the_same(tiny, dtype):
    model = copy.deepcopy(tiny[0]).to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain, hosted = _fisher(model, ids, False), _fisher(model, ids, True)
    assert plain.keys() == hosted.keys() and all(torch.equal(plain[k], hosted[k]) for k in plain)
    assert any(v.abs().sum() > 0 for v in hosted.values())
    # every weight back in place, no patched forward left
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any("forward" in m.__dict__ or "_hiq_host_weight" in m.__dict__ for m in model.modules())


def test_host_weights_are_not_on_the_module_while_active(tiny):
    """While active the linears' parameters are empty (a ``model.to(device)`` moves none of their bytes) and the
    logits are those of the model with its weights."""
    model = copy.deepcopy(tiny[0])
    lin = model.model.layers[0].mlp.down_proj
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with on_device(model, "cpu", [lin]):
            assert lin.weight.numel() == 0 and lin.weight.dtype == torch.float32
            got = model(input_ids=ids).logits
    assert torch.equal(got, expected) and lin.weight.shape == (lin.out_features, lin.in_features)


def test_a_failure_inside_puts_the_weights_back(tiny):
    model = copy.deepcopy(tiny[0])
    lin = model.model.layers[1].self_attn.q_proj
    weight = lin.weight.detach().clone()
    with pytest.raises(RuntimeError, match="stage failed"), on_device(model, "cpu", [lin]):
        raise RuntimeError("stage failed")
    assert torch.equal(lin.weight, weight) and "forward" not in lin.__dict__


def test_offload_choice(tiny):
    model = tiny[0]
    assert should_offload(None, model, "cpu") is False  # auto: never on the CPU (host and device are one memory)
    assert should_offload(True, model, "cpu") is True
    assert should_offload(False, model, "cpu") is False


def test_fit_with_offload_gives_the_same_run(tmp_path):
    """``hiq fit --model.offload=true`` (Fisher, tuning and evaluation with the block weights in host memory) writes
    the same Fisher scores, block records, tuned scales and perplexity as the same fit without it."""
    import json

    import yaml

    from hiq.artifacts import load_tensors
    from hiq.cli import main
    from tests.test_fit_ratios import SMALL

    cfg = json.loads(json.dumps(SMALL))
    cfg["reconstruction"] = {"enabled": True, "iterations": 2, "batch_size": 2, "tune_steps": 2,
                             "tune_batch_size": 2}
    cfg["evaluation"] = {"enabled": True, "datasets": ["wikitext2"], "max_windows": 4, "seqlen": 64}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runs = {}
    for offload in ("false", "true"):
        run = tmp_path / offload
        assert main(["fit", "--config", str(path), f"--trainer.default_root_dir={run}",
                     f"--model.offload={offload}", "--plots.enabled=false"]) == 0
        runs[offload] = run
    plain, hosted = runs["false"], runs["true"]
    for name in ("fisher.safetensors", "tuning.safetensors", "blocks/block_07.safetensors"):
        a, b = load_tensors(plain / name), load_tensors(hosted / name)
        flat_a, flat_b = _flatten(a), _flatten(b)
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) if isinstance(flat_a[k], torch.Tensor)
                   else flat_a[k] == flat_b[k] or "seconds" in k for k in flat_a), name
    m_plain = json.loads((plain / "metrics.json").read_text())
    m_hosted = json.loads((hosted / "metrics.json").read_text())
    assert m_plain["wikitext2_ppl"] == m_hosted["wikitext2_ppl"]


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix: tree}


def test_an_offloaded_model_is_not_moved_by_the_trainer(tiny):
    """With offload the model is held outside the module tree: the outer Trainer's move of its module to the
    device (at fit start) leaves the weights in host memory; the stages place them."""
    from hiq.modules import HiQPipeline

    model, tokenizer = tiny
    hosted = HiQPipeline.from_model(model, tokenizer, offload=True)
    assert hosted.model is model and hosted.model_on_host and not list(hosted.parameters())
    plain = HiQPipeline.from_model(model, tokenizer)
    assert not plain.model_on_host and plain.model is model and list(plain.parameters())


def test_offload_with_several_processes_is_refused_before_any_stage(tmp_path):
    import hiq

    with pytest.raises(ValueError, match="model.offload .* runs on one process; this run has 2"):
        hiq.quantize(hiq.ModelOptions("tiny-llama", offload=True), run_dir=tmp_path / "run",
                     trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
    assert not (tmp_path / "run").exists()

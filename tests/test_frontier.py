"""benchmarks/frontier.py: one Fisher pass and one M serve every budget; a table and a PNG come out."""

import json
from pathlib import Path

import torch

from hiq.artifacts import load_tensors
from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_frontier_reuses_fisher_and_m_across_budgets(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    frontier = load_benchmark("frontier")
    out = tmp_path / "frontier"
    extra = ["--data.nsamples=4", "--data.seqlen=64", "--sensitivity.nsamples=1", "--ratios.candidates=[0.05,0.2]",
             "--reconstruction.iterations=2", "--reconstruction.batch_size=2", "--evaluation.datasets=[wikitext2]",
             "--evaluation.seqlen=64", "--evaluation.max_windows=2", "--trainer.accelerator=cpu"]
    assert frontier.main(["--budgets", "2.05", "2.2", "--out", str(out), "--extra", *extra]) == 0
    table = capsys.readouterr().out
    rows = json.loads((out / "frontier.json").read_text())
    assert [r["budget"] for r in rows] == [2.05, 2.2]
    assert rows[0]["avg_bits"] <= 2.05 + 1e-9 < rows[1]["avg_bits"] <= 2.2 + 1e-9
    assert (out / "frontier.png").stat().st_size > 0 and "| 2.200 | W2/3 per-channel |" in table
    # the second budget's Fisher scores and M are the first one's, reused (not recomputed)
    a, b = (load_tensors(out / d / "fisher.safetensors") for d in ("2.050", "2.200"))
    assert a["key"] == b["key"] and all(torch.equal(a["scores"][k], b["scores"][k]) for k in a["scores"])
    assert torch.equal(load_tensors(out / "2.050" / "sensitivity" / "block_03.safetensors")["matrix"],
                       load_tensors(out / "2.200" / "sensitivity" / "block_03.safetensors")["matrix"])
    assert "--ratios.target_avg_bits=2.2" in table

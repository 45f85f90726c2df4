"""benchmarks/frontier.py: one Fisher pass and one M serve every budget; a table and a PNG come out."""

import json
from pathlib import Path

import pytest
import torch

from hiq.artifacts import load_tensors
from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_frontier_reuses_fisher_and_m_across_budgets(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    frontier = load_benchmark("frontier")
    out = tmp_path / "frontier"
    extra = ["--data.nsamples=4", "--data.seqlen=64", "--sensitivity.nsamples=1", "--ratios.candidates=[0.05,0.2]",
             "--reconstruction.iterations=2", "--reconstruction.batch_size=2",
             "--reconstruction.tune_steps=2", "--evaluation.datasets=[wikitext2]",
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


def test_frontier_draws_other_frontiers_and_autoround_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    frontier = load_benchmark("frontier")
    out = tmp_path / "frontier"
    out.mkdir()
    row = {"budget": 2.1, "avg_bits": 2.1, "avg_bits_storage": 2.3, "wikitext2_ppl": 60.0, "c4_ppl": 250.0,
           "setting": "W2/3 per-channel", "seconds": 1.0, "run": str(out / "2.100"), "command": "hiq fit ..."}
    (out / "2.100").mkdir()
    (out / "2.100" / "metrics.json").write_text(json.dumps({**row, "stage_seconds": {"ratios": 1.0}}))
    other = tmp_path / "other"  # another frontier's output, e.g. the paper's candidate ratios
    other.mkdir()
    (other / "frontier.json").write_text(json.dumps([{**row, "wikitext2_ppl": 61.0}]))
    bench = tmp_path / "bench"  # what benchmarks/peer_table.py leaves per row: grid check and hiq eval's scores
    for name, bits, ppl in (("autoround-scheme-2.10", 2.096, 63.1), ("autoround-scheme-2.10-seed0", 2.096, 70.0),
                            ("autoround-scheme-ext-2.10", 2.096, 62.9), ("autoround-fp32", 2.0, 64.6),
                            ("gptq", 2.0, 90.0)):
        (bench / name).mkdir(parents=True)
        mixed = name.startswith("autoround-scheme")  # uniform rows' grid check holds no avg bits: peer.json's bits
        (bench / name / "grid.json").write_text(json.dumps({"avg_bits": bits} if mixed else {"max_levels": 4}))
        (bench / name / "peer.json").write_text(json.dumps({"bits": 2}))
        (bench / name / "eval.json").write_text(json.dumps({"wikitext2_ppl": ppl, "c4_ppl": 4 * ppl}))
    curves = frontier.peer_points(bench)
    # no seed repeats, no other tools; AutoScheme with sym + alg_ext is its own curve
    assert set(curves) == {"AutoRound AutoScheme", "AutoRound AutoScheme sym + alg_ext", "AutoRound fp32"}
    assert curves["AutoRound AutoScheme"] == [{"avg_bits": 2.096, "wikitext2_ppl": 63.1, "c4_ppl": 252.4}]
    assert curves["AutoRound AutoScheme sym + alg_ext"][0]["wikitext2_ppl"] == 62.9
    assert frontier.main(["--budgets", "2.1", "--out", str(out), "--compare", f"paper={other}", "--peers",
                          str(bench)]) == 0  # the row is read back, nothing recomputed
    assert (out / "frontier.png").stat().st_size > 0 and "| 2.100 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="expected LABEL=DIR"):
        frontier.main(["--budgets", "2.1", "--out", str(out), "--compare", str(tmp_path)])


def test_benchmark_tables_are_one_markdown_printer(capsys):
    """benchmarks/tables.py: the header's width holds for every row, commands follow the table."""
    tables = load_benchmark("tables")
    tables.print_table(["budget", "ppl"], [["2.100", 61.5]], ["hiq fit --x", "hiq: `hiq fit --y`"], title="T")
    assert capsys.readouterr().out == ("\nT\n\n| budget | ppl |\n|---|---|\n| 2.100 | 61.5 |\n\n"
                                       "- `hiq fit --x`\n- hiq: `hiq fit --y`\n")
    with pytest.raises(ValueError, match="table row 0 has 1 cells, the header 2"):
        tables.markdown_table(["a", "b"], [["only"]])

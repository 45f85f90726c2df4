"""benchmarks/peer_table.py: the b-bit grid check, the shared calibration file, and the table plumbing (RTN row).

No peer venv needed: the peer tools themselves run only in benchmarks/peer_tools/quantize.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hiq.model import resolve_model_path
from hiq.quant.grid import QuantSpec, fake_quant_rtn
from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


peers = load_benchmark("peer_table")
MODEL = resolve_model_path("tiny-llama")


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)


@pytest.mark.parametrize("bits,group", [(2, None), (3, None), (2, 64), (3, 128)])
def test_grid_levels_rtn_weight_passes_float_fails(tiny, bits, group):
    for name in ("model.layers.0.mlp.down_proj", "model.layers.3.self_attn.q_proj"):
        w = tiny.get_submodule(name).weight.detach()
        q = fake_quant_rtn(w, QuantSpec(bits, group))
        assert peers.grid_levels(q, group) <= 2**bits
        assert peers.grid_levels(q, group) >= 2  # a real weight uses more than one level
        assert peers.grid_levels(w, group) > 2**bits  # the float weight is not on any b-bit grid


def test_grid_levels_groups_matter(tiny):
    """A g64 weight has up to 2^b levels per group but more per whole row: per-channel counting fails it."""
    w = tiny.get_submodule("model.layers.0.mlp.down_proj").weight.detach()  # [128, 384]: 6 groups of 64
    q = fake_quant_rtn(w, QuantSpec(2, 64))
    assert peers.grid_levels(q, 64) <= 4
    assert peers.grid_levels(q, None) > 4


def test_grid_levels_where_counts_exactly():
    w = torch.zeros(3, 8)
    w[1, 4:] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # row 1, group 1 (g=4): 4 distinct values
    w[2, :4] = torch.tensor([1.0, 1.0, 2.0, 2.0])
    assert peers.grid_levels_where(w, 4) == (4, 1, 1)
    assert peers.grid_levels(w, None) == 5  # row 1 as a whole: 0, 1, 2, 3, 4
    assert peers.grid_levels(w, 3) == 3  # ragged groups [0:3], [3:6], [6:8]: row 1 has {0, 1, 2} in [3:6]


def test_check_grid_on_checkpoints(tiny, tmp_path):
    import copy

    from hiq.quant.rtn import quantize_model_rtn

    q = copy.deepcopy(tiny)
    quantize_model_rtn(q, QuantSpec(3, 64))
    q.save_pretrained(tmp_path / "rtn")
    grid = peers.check_grid(tmp_path / "rtn", 3, 64)
    assert grid["layers"] == 56 and grid["max_levels"] == 8 and grid["allowed"] == 8
    with pytest.raises(peers.GridError, match=r"model\.layers\.\d+\..*_proj\.weight .*row \d+, group \d+ .* "
                                              r"has \d+ distinct values > 2\^2 = 4"):
        peers.check_grid(tmp_path / "rtn", 2, 64)
    tiny.save_pretrained(tmp_path / "fp")
    msg = r"model\.layers\.0\.mlp\.down_proj\.weight is not on a 3-bit grid: row 0, group 0 \(group_size 64\) has 64"
    with pytest.raises(peers.GridError, match=msg):
        peers.check_grid(tmp_path / "fp", 3, 64)


def test_calibration_file_equals_calibration_data(tmp_path):
    """calibration.pt is exactly hiq fit's CalibrationData windows (a small local text keeps the test fast)."""
    from transformers import AutoConfig, AutoTokenizer

    from hiq.data import load_text
    from hiq.modules import CalibrationData

    text = tmp_path / "calib.txt"
    text.write_text(load_text("wikitext2", "test").text[:120_000])
    cfg = {"data": {"dataset": str(text), "split": "train", "nsamples": 16, "seqlen": None, "seed": 0}}
    path, info = peers.write_calibration(tmp_path / "bench", cfg, MODEL)
    got = torch.load(path)
    tok = AutoTokenizer.from_pretrained(MODEL)
    max_ctx = AutoConfig.from_pretrained(MODEL).max_position_embeddings
    want = CalibrationData(dataset=str(text), split="train", nsamples=16, seqlen=None, seed=0,
                           tokenizer_path=MODEL).windows(tok, max_ctx)
    assert got.dtype == torch.int64 and tuple(got.shape) == (16, 512) == (info["count"], info["length"])
    assert torch.equal(got, want)
    other = CalibrationData(dataset=str(text), split="train", nsamples=16, seed=1, tokenizer_path=MODEL)
    assert not torch.equal(got, other.windows(tok, max_ctx))  # the seed is really passed through
    # idempotent: a second call reads the file back
    assert peers.write_calibration(tmp_path / "bench", cfg, MODEL)[1] == info


def test_storage_bits_matches_hiq_metrics():
    # hiq fit's avg_bits_storage for an all-2-bit per-channel run (runs/ablation/w2/lwc) is 2.11899...
    assert peers.storage_bits(MODEL, 2, None) == pytest.approx(2.1189903846, abs=1e-9)
    assert peers.storage_bits(MODEL, 2, 128) == pytest.approx(2 + 18 / 128)  # every in_features is a multiple of 128
    assert peers.storage_bits(MODEL, 3, 64) == pytest.approx(3 + 19 / 64)


def test_rtn_row_table_plumbing(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--settings", "w2-g64", "--methods", "rtn", "--out", str(out), "--eval-max-windows", "2"]
    assert peers.main(argv) == 0
    table = capsys.readouterr().out
    row = [line for line in table.splitlines() if line.startswith("| RTN")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1] == "w2-g64: W2 g64" and cells[2] == "2.000" and cells[3] == f"{2 + 18 / 64:.3f}"
    res = json.loads((out / "w2-g64" / "rtn" / "eval.json").read_text())
    assert res["method"] == "rtn" and res["bits"] == 2 and res["group_size"] == 64
    assert res["eval"]["wikitext2"]["windows"] == 2
    assert cells[4] == f"{res['wikitext2_ppl']:.2f}" and cells[5] == f"{res['c4_ppl']:.2f}"
    assert float(cells[7]) > 0
    assert "`hiq eval --config configs/tiny/rtn-w2.yaml --quant.bits=2 --quant.group_size=64" in table
    assert "QUICK RUN" in table
    # a finished row is read back, not recomputed
    mtime = (out / "w2-g64" / "rtn" / "eval.json").stat().st_mtime
    assert peers.main(argv) == 0
    assert (out / "w2-g64" / "rtn" / "eval.json").stat().st_mtime == mtime
    assert capsys.readouterr().out == table


def test_autoscheme_text_windows_must_tokenise_back(tmp_path):
    """AutoScheme takes text: every window must re-tokenise to itself; a window that does not is refused (by default
    any difference, and a change of length whatever --max-token-mismatch allows)."""
    from transformers import AutoTokenizer

    from hiq.data import load_text

    quantize = load_benchmark("peer_tools/quantize")
    tok = AutoTokenizer.from_pretrained(MODEL)
    tok.add_bos_token = False
    ids = tok(load_text("wikitext2", "test").text[:20_000], add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: 4 * 128]).reshape(4, 128)
    path = tmp_path / "calib.jsonl"
    assert quantize._calibration_jsonl(tok, windows, path) == 0
    lines = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(lines) == 4 and all(tok(t)["input_ids"] == w.tolist() for t, w in zip(lines, windows, strict=True))
    split = windows.clone()
    for j, t in enumerate(tok.convert_ids_to_tokens(windows[1].tolist())):  # a token spelled out in smaller tokens
        pieces = [tok.convert_tokens_to_ids(c) for c in t]
        if len(t) > 2 and tok.unk_token_id not in pieces and j + len(pieces) < windows.shape[1]:
            split[1, j:j + len(pieces)] = torch.tensor(pieces)
            break
    assert not torch.equal(split, windows)
    with pytest.raises(RuntimeError, match="calibration window 1 does not survive decode -> tokenize"):
        quantize._calibration_jsonl(tok, split, path)  # by default no token may differ
    with pytest.raises(RuntimeError, match="tokens back") as err:  # a change of length: refused whatever the allowance
        quantize._calibration_jsonl(tok, split, path, max_mismatch=10_000)
    assert "128 tokens back" not in str(err.value)

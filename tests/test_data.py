import gzip
import hashlib

import pytest
import torch

from hiq.data import DataError, calibration_windows, eval_windows, load_text, tokenize_text


def test_wikitext2_test_matches_the_hf_rows_and_protocol_string():
    ts = load_text("wikitext2", "test")
    assert len(ts.rows) == 4358
    assert sum(1 for r in ts.rows if r) == 2891
    text = ts.text
    assert len(text) == 1_294_336
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    assert hashlib.sha256(text.encode("utf-8")).hexdigest().startswith("696cca6b")


def test_splits_and_labels():
    assert load_text("wikitext2", "valid").split == "validation"
    train = load_text("wikitext2", "train")
    assert "<unk>" in train.note and "<unk>" in train.text[:100_000]
    c4_val, c4_train = load_text("c4", "validation"), load_text("c4", "train")
    assert len(c4_val.rows) == 1100 and len(c4_train.rows) == 900
    assert c4_val.joiner == " " and "not the standard shard" in c4_val.note
    assert not set(c4_val.rows) & set(c4_train.rows)


def test_unknown_split_names_the_choices():
    with pytest.raises(DataError, match=r"no split 'tset'.*'test'"):
        load_text("wikitext2", "tset")


def test_user_files_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nline two\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"text": "hello"}\n{"text": "world"}\n')
    assert load_text(str(tmp_path / "a.txt")).rows == ("first document\nline two\n",)
    assert load_text(str(tmp_path / "b.jsonl.gz")).rows == ("hello", "world")


def test_empty_dataset_fails_fast(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DataError, match="holds no text"):
        load_text(str(empty))


def test_bad_files_fail_fast(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown type"):
        load_text(str(tmp_path / "x.csv"))
    (tmp_path / "y.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match="no 'text' field"):
        load_text(str(tmp_path / "y.jsonl"))


def test_calibration_windows_are_deterministic_by_seed():
    ids = torch.arange(10_000)
    a = calibration_windows(ids, nsamples=8, seqlen=64, seed=0)
    b = calibration_windows(ids, nsamples=8, seqlen=64, seed=0)
    c = calibration_windows(ids, nsamples=8, seqlen=64, seed=1)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    # every window is a contiguous slice of the stream
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=a.dtype))


def test_calibration_on_real_text(tiny):
    ids = tokenize_text(tiny[1], load_text("wikitext2", "train"))
    w = calibration_windows(ids, nsamples=4, seqlen=128, seed=2)
    assert w.shape == (4, 128) and w.dtype == torch.int64
    with pytest.raises(DataError, match="nsamples=0"):
        calibration_windows(ids, nsamples=0, seqlen=128, seed=0)


def test_eval_windows_drop_the_tail_and_reject_short_text():
    w = eval_windows(torch.arange(1000), seqlen=300)
    assert w.shape == (3, 300) and w[2, -1] == 899
    assert eval_windows(torch.arange(1000), seqlen=300, max_windows=2).shape == (2, 300)
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(torch.arange(100), seqlen=300)


def test_one_bos_at_the_start_only(tiny, wikitext_test_ids):
    tok = tiny[1]
    assert wikitext_test_ids[0].item() == tok.bos_token_id
    assert (wikitext_test_ids == tok.bos_token_id).sum().item() == 1


def test_calibration_from_a_windows_file(tmp_path):
    """data.dataset=<file>.pt: the first nsamples rows of ready-made windows (what the peers were given); every bad
    file is refused with a message naming the value and the fix."""
    from hiq.modules import CalibrationData

    windows = torch.randint(0, 500, (6, 32), dtype=torch.long)
    path = tmp_path / "calibration.pt"
    torch.save(windows, path)

    def load(**kw):
        opts = {"dataset": str(path), "nsamples": 4, **kw}
        return CalibrationData(**opts, tokenizer_path="tiny-llama").windows(tokenizer=list(range(1000)),
                                                                             max_context=512)

    assert torch.equal(load(), windows[:4]) and torch.equal(load(seqlen=32, nsamples=6), windows)
    with pytest.raises(ValueError, match="holds 6 windows, fewer than data.nsamples=7; lower data.nsamples"):
        load(nsamples=7)
    with pytest.raises(ValueError, match="data.seqlen=16 but the windows .* are 32 tokens long; set data.seqlen"):
        load(seqlen=16)
    torch.save(torch.full((6, 32), 1000, dtype=torch.long), path)
    with pytest.raises(ValueError, match=r"token ids in \[1000, 1000\], outside the tokenizer's vocabulary of 1000"):
        load()
    torch.save(windows.float(), path)
    with pytest.raises(ValueError, match=r"holds a \(6, 32\) torch.float32 tensor; expected an int64"):
        load()
    path.write_bytes(b"not a tensor")
    with pytest.raises(ValueError, match="could not be read as a tensor of token windows"):
        load()
    path.unlink()
    with pytest.raises(FileNotFoundError, match="no such windows file"):
        load()

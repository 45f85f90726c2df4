"""Zero-shot accuracy through lm-eval on the bundled task files: task definitions, scoring, CLI, errors."""

import json

import lm_eval  # the hiq[eval] extra; make install has it, so a missing one fails here
import pytest
import torch

from hiq.cli import main
from hiq.zeroshot import REPORTED, TASK_DIR, TASKS, check_limit, evaluate_zeroshot, parse_tasks


@pytest.fixture(scope="module")
def task_dict():
    from lm_eval.tasks import TaskManager, get_task_dict

    return get_task_dict(list(TASKS), TaskManager(include_path=str(TASK_DIR), include_defaults=False))


def _docs(task):
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


def test_tasks_read_the_full_local_sets_with_standard_prompts(task_dict):
    sizes = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267}
    docs = {name: _docs(task_dict[name]) for name in TASKS}
    assert {n: len(d) for n, d in docs.items()} == sizes
    piqa, arc, hs, wg = (task_dict[n] for n in ("piqa", "arc_challenge", "hellaswag", "winogrande"))
    d = docs["piqa"][0]
    assert piqa.doc_to_text(d) == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.doc_to_choice(d) == [d["sol1"], d["sol2"]] and piqa.doc_to_target(d) in (0, 1)
    labels = [int(x) for x in (TASK_DIR.parent.parent / "data/zeroshot/piqa/valid-labels.lst").read_text().split()]
    assert [piqa.doc_to_target(x) for x in docs["piqa"]] == labels
    # ARC: gold = position of answerKey among the labels, including the numeric-label questions
    for x in docs["arc_challenge"]:
        gold = arc.doc_to_target(x)
        assert x["choices"]["label"][gold] == x["answerKey"]
    assert any(x["answerKey"] in "1234" for x in docs["arc_challenge"] + docs["arc_easy"])
    assert arc.doc_to_text(docs["arc_challenge"][0]).startswith("Question: ")
    # HellaSwag task 0 (PREPROCESSING.md): the local query lacks lm-eval's ctx_b capitalisation
    h = docs["hellaswag"][0]
    assert hs.doc_to_text(h) == "Roof shingle removal: A man is sitting on a roof. he"
    assert hs.doc_to_choice(h)[0] == "is using wrap to wrap a pair of skis." and hs.doc_to_target(h) == 3
    assert not any("[" in c for x in docs["hellaswag"][:500] for c in [hs.doc_to_text(x), *hs.doc_to_choice(x)])
    # WinoGrande partial scoring: each option fills the blank; the continuation after the blank is shared
    w = docs["winogrande"][0]
    assert w["sentence"] == "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert wg.doc_to_choice(w) == ["Sarah was a much better surgeon than Maria so Sarah",
                                   "Sarah was a much better surgeon than Maria so Maria"]
    assert wg.doc_to_target(w) == " always got the easier cases." and wg.doc_to_text(w) == 1


def _loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context): the whole string encoded once (with the tokenizer's own
    special tokens, here BOS), split at the context's length."""
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return float(logp[torch.arange(n_ctx - 1, len(whole) - 1), targets[n_ctx - 1 :]].sum())


def test_lm_eval_scores_the_in_memory_model(tiny_copy, task_dict):
    """PIQA acc from lm-eval equals our own log-likelihood argmax on the same documents, for the FP model and
    for a damaged copy (so lm-eval really scored the object it was given)."""
    model, tokenizer = tiny_copy
    docs = _docs(task_dict["piqa"])[:24]

    def own_acc():
        hits = 0
        for d in docs:
            ctx = f"Question: {d['goal']}\nAnswer:"
            scores = [_loglik(model, tokenizer, ctx, " " + d[s]) for s in ("sol1", "sol2")]
            hits += int(max(range(2), key=scores.__getitem__) == d["label"])
        return hits / len(docs)

    res = evaluate_zeroshot(model, tokenizer, ["piqa"], limit=24, batch_size=8)
    assert res["tasks"]["piqa"]["n"] == 24
    assert res["tasks"]["piqa"]["acc"] == pytest.approx(own_acc())
    assert res["average"] == res["tasks"]["piqa"]["acc"]
    assert res["lm_eval_version"] == lm_eval.__version__
    with torch.no_grad():
        for p in model.model.layers[0].parameters():
            p.mul_(-3.0)
    damaged = evaluate_zeroshot(model, tokenizer, ["piqa"], limit=24, batch_size=8)
    assert damaged["tasks"]["piqa"]["acc"] == pytest.approx(own_acc())


def test_all_five_tasks_and_the_average(tiny, tmp_path, monkeypatch, capfd):
    model, tokenizer = tiny
    monkeypatch.chdir(tmp_path)  # outside any git repository: lm-eval's `git describe` printed "fatal: ..." here
    res = evaluate_zeroshot(model, tokenizer, ["all"], limit=6, batch_size=16)
    assert "not a git repository" not in capfd.readouterr().err
    assert list(res["tasks"]) == list(TASKS)
    for name, row in res["tasks"].items():
        assert row["n"] == 6 and row["reported"] == REPORTED[name]
        assert 0.0 <= row["acc"] <= 1.0 and row["acc_stderr"] is not None
        assert ("acc_norm" in row) == (name != "winogrande")
    assert res["average"] == pytest.approx(sum(r[r["reported"]] for r in res["tasks"].values()) / 5)
    assert res["limit"] == 6 and "0-shot" in res["protocol"]


def test_task_and_limit_validation():
    assert parse_tasks("piqa, winogrande,piqa") == ["piqa", "winogrande"]
    assert parse_tasks(["arc_easy,arc_challenge"]) == ["arc_easy", "arc_challenge"]
    assert parse_tasks(None) == [] and parse_tasks("all") == list(TASKS)
    with pytest.raises(ValueError, match=r"unknown zero-shot task\(s\) \['boolq'\]; choose from piqa"):
        parse_tasks("piqa,boolq")
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match=f"limit={bad!r}"):
            check_limit(bad)
    assert check_limit(0.25) == 0.25 and check_limit(None) is None


def test_hiq_eval_tasks_cli(tmp_path, capsys):
    out = tmp_path / "zs.json"
    assert main(["eval", "--config", "configs/tiny/rtn-w2.yaml", "--evaluation.datasets=[wikitext2]",
                 "--evaluation.max_windows=2", "--evaluation.tasks=arc_easy,winogrande", "--evaluation.limit=5",
                 f"--output={out}"]) == 0
    res = json.loads(out.read_text())
    assert set(res["zeroshot"]["tasks"]) == {"arc_easy", "winogrande"}
    assert res["zeroshot"]["tasks"]["winogrande"]["n"] == 5 and res["zeroshot"]["limit"] == 5
    assert res["zeroshot_avg"] == res["zeroshot"]["average"] and res["zeroshot"]["lm_eval_version"]
    assert res["config"]["evaluation"]["tasks"] == ["arc_easy", "winogrande"] and "wikitext2_ppl" in res
    bad = tmp_path / "bad.json"
    assert main(["eval", "--config", "configs/tiny/fp.yaml", "--evaluation.tasks=piqa,mmlu", f"--output={bad}"]) == 2
    assert "unknown zero-shot task(s) ['mmlu']" in capsys.readouterr().err
    assert main(["eval", "--config", "configs/tiny/fp.yaml", "--evaluation.limit=5", f"--output={bad}"]) == 2
    assert "evaluation.limit=5 applies to zero-shot tasks" in capsys.readouterr().err
    assert not bad.exists()  # nothing half-written


def test_hellaswag_converter(tmp_path):
    """scripts/hellaswag_to_jsonl.py: llama.cpp's 6-line records -> the bundled jsonl rows; bad input is refused."""
    import bz2
    import gzip
    import subprocess
    import sys

    bundled = [json.loads(x) for x in gzip.open("data/zeroshot/hellaswag/hellaswag_val.jsonl.gz", "rt")][:2]
    text = "".join(f"{r['activity_label']}: {r['ctx']}\n{r['label']}\n" + "".join(e + "\n" for e in r["endings"])
                   for r in bundled)
    src = tmp_path / "val.txt.bz2"
    src.write_bytes(bz2.compress(text.encode()))
    out = tmp_path / "out.jsonl.gz"
    proc = subprocess.run([sys.executable, "scripts/hellaswag_to_jsonl.py", str(src), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x) for x in gzip.open(out, "rt")] == bundled
    assert "2 tasks" in proc.stdout and "warning: 2 tasks" in proc.stderr  # not the 10,042 of the real set
    bad = tmp_path / "bad.txt"
    lines = text.split("\n")
    lines[1] = "7"  # task 0's gold label out of 0..3
    bad.write_text("\n".join(lines))
    proc = subprocess.run([sys.executable, "scripts/hellaswag_to_jsonl.py", str(bad), str(tmp_path / "b.jsonl")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "label '7' is not 0..3" in proc.stderr and not (tmp_path / "b.jsonl").exists()

"""lm-eval task helpers for the five zero-shot tasks, reading the bundled files under ``data/zeroshot/``.

The YAML files beside this module are lm-eval task definitions (``custom_dataset`` + the standard prompts);
these functions load the local files into the fields the standard lm-eval tasks read, so prompts and
``acc`` / ``acc_norm`` rules are lm-eval's own (protocol: :mod:`hiq.zeroshot`):

- PIQA (validation, 1,838): ``"Question: {goal}\\nAnswer:"`` -> ``[sol1, sol2]``.
- ARC-Easy / ARC-Challenge (test, 2,376 / 1,172): ``"Question: {stem}\\nAnswer:"`` -> the choices in file
  order; gold = position of ``answerKey`` among the choice labels.
- HellaSwag (validation, 10,042): ``preprocess(activity_label + ": " + ctx)`` -> preprocessed endings. The
  local copy is llama.cpp's text format, where ctx_b is not capitalised; lm-eval capitalises it, so this is
  an approximation of lm-eval's query (scores close, not identical).
- WinoGrande (dev = validation xl, 1,267): partial scoring; each option fills the blank to form a context,
  the shared continuation is the text after the blank; only ``acc``.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from hiq.data import DATA_DIR

ZEROSHOT_DIR = "zeroshot"


def _path(rel: str) -> Path:
    path = Path(DATA_DIR) / ZEROSHOT_DIR / rel
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled zero-shot file {path} is missing; set HIQ_DATA_DIR to the folder holding zeroshot/ "
            f"(the repository's data/)"
        )
    return path


def _jsonl(rel: str) -> list[dict]:
    with gzip.open(_path(rel), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _dataset(split: str, rows: list[dict]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def piqa(**_):
    docs = _jsonl("piqa/valid.jsonl.gz")
    labels = _path("piqa/valid-labels.lst").read_text().split()
    if len(labels) != len(docs):
        raise ValueError(f"PIQA: {len(docs)} questions but {len(labels)} labels")
    return _dataset("validation", [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)}
                                   for d, y in zip(docs, labels, strict=True)])


def _arc(name: str):
    rows = []
    for d in _jsonl(f"arc/{name}-Test.jsonl.gz"):
        choices = d["question"]["choices"]
        rows.append({"id": d["id"], "question": d["question"]["stem"], "answerKey": d["answerKey"],
                     "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}})
    return _dataset("test", rows)


def arc_easy(**_):
    return _arc("ARC-Easy")


def arc_challenge(**_):
    return _arc("ARC-Challenge")


def hellaswag(**_):
    """Rows with lm-eval's processed fields (query, choices, gold), built once here rather than in a map."""
    rows = [{"ind": d["ind"], "query": hellaswag_preprocess(d["activity_label"] + ": " + d["ctx"]),
             "choices": [hellaswag_preprocess(e) for e in d["endings"]], "gold": int(d["label"])}
            for d in _jsonl("hellaswag/hellaswag_val.jsonl.gz")]
    return _dataset("validation", rows)


def winogrande(**_):
    return _dataset("validation", _jsonl("winogrande/dev.jsonl.gz"))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text clean-up: strip, ``" [title]"`` -> ``". "``, drop ``[...]``, one pass of
    double spaces -> single."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _blank(sentence: str) -> int:
    idx = sentence.find("_")
    if idx < 0:
        raise ValueError(f"WinoGrande sentence without a blank: {sentence!r}")
    return idx


def winogrande_text(doc: dict) -> int:
    """Partial scoring: the 'text' is the gold index into the contexts of ``winogrande_choices``."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc: dict) -> str:
    idx = _blank(doc["sentence"])
    return " " + doc["sentence"][idx + 1 :].strip()


def winogrande_choices(doc: dict) -> list[str]:
    idx = _blank(doc["sentence"])
    return [doc["sentence"][:idx] + doc[opt] for opt in ("option1", "option2")]

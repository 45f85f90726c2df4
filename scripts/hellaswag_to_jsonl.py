#!/usr/bin/env python
"""Convert the bundled HellaSwag validation set from llama.cpp's text format to the jsonl hiq's task reads.

The only HellaSwag validation copy we could obtain is llama.cpp's ``hellaswag_val_full.txt`` (all 10,042
tasks, original order; see data/zeroshot/hellaswag/LICENSE-NOTE.txt). Each task is 6 lines:

    line 1  activity_label + ": " + ctx          (ctx = ctx_a + " " + ctx_b, ctx_b NOT capitalised)
    line 2  gold label, 0..3
    3-6     the four endings

One jsonl row per task: ``{"ind", "activity_label", "ctx", "endings", "label"}``. ``ctx`` is everything after
the first ": " of line 1. The original split into ctx_a / ctx_b is lost, so lm-eval's ``ctx_b.capitalize()``
cannot be reproduced: hiq's task scores ``preprocess(activity_label + ": " + ctx)``, a documented
approximation of lm-eval's query (``hiq/tasks/local.py``). The row count and every label are checked.

    python scripts/hellaswag_to_jsonl.py ../shared/data/hellaswag/hellaswag_val_full.txt \\
        data/zeroshot/hellaswag/hellaswag_val.jsonl.gz
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import sys
from pathlib import Path

EXPECTED_TASKS = 10_042  # the HF validation split


def read_tasks(path: Path) -> list[dict]:
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise SystemExit(f"{path}: {len(lines)} lines is not a multiple of 6 (one task = 6 lines)")
    rows = []
    for i in range(0, len(lines), 6):
        head, label, *endings = lines[i : i + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep:
            raise SystemExit(f"{path}:{i + 1}: no ': ' between activity label and context in {head!r}")
        if label not in ("0", "1", "2", "3"):
            raise SystemExit(f"{path}:{i + 2}: label {label!r} is not 0..3")
        rows.append({"ind": i // 6, "activity_label": activity, "ctx": ctx, "endings": endings, "label": int(label)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="hellaswag_val_full.txt (or .txt.bz2)")
    p.add_argument("output", type=Path, help="jsonl to write (.gz compresses)")
    args = p.parse_args(argv)
    rows = read_tasks(args.source)
    if len(rows) != EXPECTED_TASKS:
        print(f"warning: {len(rows)} tasks, the HF validation split has {EXPECTED_TASKS}", file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    opener = gzip.open if args.output.suffix == ".gz" else open
    with opener(tmp, "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(args.output)
    print(f"{len(rows)} tasks -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""The README's RTN table on the bundled model: FP and RTN W4/W3/W2 x per-channel/g128/g64.

Each row is one :func:`hiq.evaluate` call, printed in the table as the equivalent ``hiq eval`` command; its JSON
is cached under ``--out`` so a rerun only computes missing rows (``--force`` recomputes all).

    python benchmarks/rtn_table.py            # or: make rtn-table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import hiq

CONFIG = "configs/tiny/rtn-w2.yaml"
ROWS: list[tuple[str, list[str], hiq.RTNOptions]] = [("fp", ["--config", "configs/tiny/fp.yaml"],
                                                      hiq.RTNOptions(method="none"))]
for bits in (4, 3, 2):
    for group in (None, 128, 64):
        name = f"rtn-w{bits}-{'pc' if group is None else f'g{group}'}"
        ROWS.append((name, ["--config", CONFIG, f"--quant.bits={bits}", f"--quant.group_size={group or 'null'}"],
                     hiq.RTNOptions(bits=bits, group_size=group)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/rtn_table")
    p.add_argument("--force", action="store_true")
    p.add_argument("--model", default=None, help="override model.path for every row")
    args = p.parse_args(argv)
    out = Path(args.out)
    results = []
    for name, cli, quant in ROWS:
        path = out / f"{name}.json"
        extra = [f"--model.path={args.model}"] if args.model else []
        cmd = ["eval", *cli, *extra, f"--output={path}"]
        if args.force or not path.is_file():
            print(f"== {name}: hiq {' '.join(cmd)}", file=sys.stderr, flush=True)
            # the configs' evaluation section: WikiText-2 and C4, windows of the model's context, batches of 4
            hiq.evaluate(args.model or "tiny-llama", evaluation=hiq.EvaluationOptions(batch_size=4), quant=quant,
                         output=path)
        results.append((cli + extra, json.loads(path.read_text())))
    fp = results[0][1]
    print("| setting | avg bits (storage) | avg bits (paper) | WikiText-2 ppl | C4-sample ppl | wall s | command |")
    print("|---|---|---|---|---|---|---|")
    for cli, r in results:
        paper = f"{r['avg_bits_paper']:.2f}" if r.get("avg_bits_paper") else "16"
        wt, c4 = r["wikitext2_ppl"], r["c4_ppl"]
        print(f"| {r['setting']} | {r['avg_bits']:.2f} | {paper} | {wt:.2f} ({wt / fp['wikitext2_ppl']:.2f}x) | "
              f"{c4:.2f} ({c4 / fp['c4_ppl']:.2f}x) | {r['wall_time_s']:.0f} | `hiq eval {' '.join(cli)}` |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

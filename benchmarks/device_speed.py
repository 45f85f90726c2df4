#!/usr/bin/env python
"""The same ``hiq fit`` on the CPU and on one CUDA GPU, side by side: stage times, their ratio, the results.

Each row is one ``hiq fit`` (printed under the table) in its own process and run directory under ``--out`` (a
subprocess on purpose: each device's timings and peak memory are those of a fresh process); a finished
row is read back rather than rerun (delete its directory to time it again). Both rows run in one invocation
on one machine, so the ratio column compares like with like. Without a visible GPU only the CPU row runs.

    python benchmarks/device_speed.py [--config configs/tiny/w2.yaml] [--out runs/device_speed] [--extra ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import print_table  # noqa: E402  (benchmarks/ is not a package)

HIQ = [sys.executable, "-m", "hiq"]
STAGES = ["fisher", "sensitivity", "ratios", "reconstruction", "export", "evaluation"]


def run_row(config: str, run: Path, accelerator: str, extra: list[str]) -> dict:
    cmd = [*HIQ, "fit", "--config", config, f"--trainer.default_root_dir={run}",
           f"--trainer.accelerator={accelerator}", "--trainer.devices=1", *extra]
    if not (run / "metrics.json").is_file():
        print(f"== {' '.join(cmd)}", file=sys.stderr, flush=True)
        run.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(run.with_suffix(".log"), "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"{accelerator} row failed ({proc.returncode}); see {run.with_suffix('.log')}")
        print(f"   {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    m = json.loads((run / "metrics.json").read_text())
    m["command"] = " ".join(["hiq", *cmd[len(HIQ):]])
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny/w2.yaml")
    p.add_argument("--out", default="runs/device_speed")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="options passed to both hiq fit runs")
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = {}
    if torch.cuda.is_available():  # the short row first, so a time-limited session gets it
        rows["gpu"] = run_row(args.config, out / "gpu", "gpu", args.extra)
    rows = {"cpu": run_row(args.config, out / "cpu", "cpu", args.extra), **rows}
    names = list(rows)
    devices = ", ".join(f"{n} = {rows[n]['device']}" for n in names)
    ratio = "gpu" in rows
    table = []
    for stage in [*STAGES, "total"]:
        vals = [sum(rows[n]["stage_seconds"].values()) if stage == "total" else rows[n]["stage_seconds"].get(stage)
                for n in names]
        if all(v is None for v in vals):
            continue
        cells = [f"{v:.1f}" if v is not None else "-" for v in vals]
        if ratio:
            cells.append(f"{vals[0] / vals[1]:.1f}x" if vals[0] and vals[1] else "-")
        table.append([stage, *cells])
    print_table(["stage", *names, *(["cpu / gpu"] if ratio else [])], table,
                title=f"{args.config}: stage seconds ({devices}; {os.cpu_count()} CPU cores)")
    print()
    print_table(["device", "avg bits", "WikiText-2 ppl", "C4-sample ppl"],
                [[rows[n]["device"], f"{rows[n]['avg_bits']:.3f}", f"{rows[n]['wikitext2_ppl']:.2f}",
                  f"{rows[n]['c4_ppl']:.2f}"] for n in names],
                [f"{n}: `{rows[n]['command']}`" for n in names])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

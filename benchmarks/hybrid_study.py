#!/usr/bin/env python
"""Why does (or doesn't) AdaRound on the high-impact columns help? LWC vs AdaRound over steps and lambda.

Every row quantizes ``--config`` with the same Fisher scores and M (computed once, by a first run that stops
after the ratios, and copied into each row's run directory), so rows differ only in the options listed:
the ratio mode (the MILP's or uniform), the high-impact quantizer (``lwc`` or ``adaround``), the steps per
block and AdaRound's regulariser weight lambda. Rows run ``--jobs`` at a time (useful on a GPU, where one
tiny-model fit leaves the device mostly idle), each in its own process (``hiq fit`` as a subprocess: parallel
rows need separate processes); a finished row is read back, not rerun.

    python benchmarks/hybrid_study.py [--config configs/tiny/w2.yaml] [--out runs/hybrid_study] \\
        [--iterations 400 1200] [--round-weights 0.01 0.1] [--jobs 1] [--extra ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import print_table  # noqa: E402  (benchmarks/ is not a package)

HIQ = [sys.executable, "-m", "hiq"]


def _hiq(args: list[str], log: Path, env: dict) -> None:
    print(f"== {' '.join(['hiq', *args])}", file=sys.stderr, flush=True)
    with open(log, "w") as fh:
        proc = subprocess.run([*HIQ, *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}); see {log}")


def rows_for(iterations: list[int], round_weights: list[float]) -> list[dict]:
    """LWC rows need no lambda; AdaRound rows take every lambda. Both ratio modes, every step count."""
    rows = []
    for mode, steps in itertools.product(("optimal", "uniform"), iterations):
        rows.append({"mode": mode, "quantizer": "lwc", "iterations": steps, "round_weight": None})
        for lam in round_weights:
            rows.append({"mode": mode, "quantizer": "adaround", "iterations": steps, "round_weight": lam})
    return rows


def row_name(r: dict) -> str:
    lam = "" if r["round_weight"] is None else f"-lam{r['round_weight']:g}"
    return f"{r['mode']}-{r['quantizer']}-{r['iterations']}{lam}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny/w2.yaml")
    p.add_argument("--out", default="runs/hybrid_study")
    p.add_argument("--iterations", type=int, nargs="+", default=[400, 1200])
    p.add_argument("--round-weights", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--modes", nargs="+", default=["optimal", "uniform"], choices=["optimal", "uniform"])
    p.add_argument("--jobs", type=int, default=1, help="rows run at a time")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="options passed to every hiq fit")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.jobs)))
    base = out / "scores"
    if not (base / "ratios.json").is_file():  # Fisher, M and the MILP once; every row copies them
        _hiq(["fit", "--config", args.config, f"--trainer.default_root_dir={base}", "--reconstruction.enabled=false",
              "--export.enabled=false", "--evaluation.enabled=false", *args.extra], out / "scores.log", env)
    rows = [r for r in rows_for(args.iterations, args.round_weights) if r["mode"] in args.modes]

    def run(r: dict) -> dict:
        run_dir = out / row_name(r)
        opts = [f"--ratios.mode={r['mode']}", f"--reconstruction.high_quantizer={r['quantizer']}",
                f"--reconstruction.iterations={r['iterations']}"]
        if r["round_weight"] is not None:
            opts.append(f"--reconstruction.round_weight={r['round_weight']}")
        cmd = ["fit", "--config", args.config, f"--trainer.default_root_dir={run_dir}", *opts,
               "--export.enabled=false", *args.extra]
        if not (run_dir / "metrics.json").is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(base / "fisher.safetensors", run_dir / "fisher.safetensors")
            shutil.copytree(base / "sensitivity", run_dir / "sensitivity", dirs_exist_ok=True)
            _hiq(cmd, out / f"{row_name(r)}.log", env)
        m = json.loads((run_dir / "metrics.json").read_text())
        loss = sum(b["loss_final"] for b in m["blocks"]) / len(m["blocks"])
        return {**r, "avg_bits": m["avg_bits"], "wikitext2_ppl": m["wikitext2_ppl"], "c4_ppl": m["c4_ppl"],
                "mean_block_loss": loss, "recon_s": m["stage_seconds"]["reconstruction"], "device": m["device"],
                "command": " ".join(["hiq", *cmd])}

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, rows))
    (out / "table.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(["ratios", "high-impact quantizer", "steps/block", "lambda", "avg bits", "WikiText-2", "C4-sample",
                 "mean final block loss", "recon s"],
                [[r["mode"], r["quantizer"], r["iterations"],
                  "-" if r["round_weight"] is None else f"{r['round_weight']:g}", f"{r['avg_bits']:.3f}",
                  f"{r['wikitext2_ppl']:.2f}", f"{r['c4_ppl']:.2f}", f"{r['mean_block_loss']:.4g}",
                  f"{r['recon_s']:.0f}"] for r in results],
                [r["command"] for r in results],
                title=f"{args.config} on {results[0]['device']} (Fisher and M shared by all rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

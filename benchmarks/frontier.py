#!/usr/bin/env python
"""The bits-to-perplexity frontier of one config: one Fisher pass and one M, then one ratio solve and one
reconstruction per budget, each its own model; a table and a PNG of avg bits vs WikiText-2 / C4 perplexity.

The first budget's run computes Fisher scores and M; every other budget's run directory gets copies of them,
so its run reuses them (the artifacts' keys match: same model, calibration windows and M settings). Every row
is one :meth:`hiq.api.FitConfig.run` (printed under the table as the equivalent ``hiq fit`` command) cached in
``<out>/<budget>/``; a finished row is read back, not rerun.

    python benchmarks/frontier.py [--config configs/tiny/w2.yaml] [--budgets 2.02 2.05 2.1 2.15 2.2] \\
        [--out runs/frontier/w2] [--extra --reconstruction.iterations=200 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from hiq.api import FitConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import as_command, parse_options  # noqa: E402  (benchmarks/ is not a package)


def run_budget(config: str, budget: float, out: Path, first: Path | None, options: dict) -> dict:
    run = out / f"{budget:.3f}"
    if first is not None and first != run and not (run / "fisher.safetensors").exists():
        run.mkdir(parents=True, exist_ok=True)
        shutil.copy(first / "fisher.safetensors", run / "fisher.safetensors")
        if (first / "sensitivity").is_dir():
            shutil.copytree(first / "sensitivity", run / "sensitivity", dirs_exist_ok=True)
    row = {"ratios.target_avg_bits": budget, "export.enabled": False, "plots.enabled": False, **options}
    cmd = as_command("fit", "--config", config, f"--trainer.default_root_dir={run}", options=row)
    if not (run / "metrics.json").is_file():
        print(f"== {cmd}", file=sys.stderr, flush=True)
        FitConfig.load(config, **row).run(run)
    m = json.loads((run / "metrics.json").read_text())
    return {"budget": budget, "avg_bits": m["avg_bits"], "avg_bits_storage": m["avg_bits_storage"],
            "wikitext2_ppl": m.get("wikitext2_ppl"), "c4_ppl": m.get("c4_ppl"), "setting": m["setting"],
            "seconds": sum(v for k, v in m["stage_seconds"].items() if k in ("reconstruction", "ratios")),
            "run": str(run), "command": cmd}


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in ((axes[0], "wikitext2_ppl", "WikiText-2"), (axes[1], "c4_ppl", "C4-sample")):
        pts = [(r["avg_bits"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="hiq")
        ax.set_xlabel("average code bits (block linears)")
        ax.set_ylabel(f"{name} perplexity")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny/w2.yaml")
    p.add_argument("--budgets", type=float, nargs="+", default=[2.02, 2.05, 2.10, 2.15, 2.20])
    p.add_argument("--out", default=None, help="default runs/frontier/<config name>")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="options for every run (--section.key=v)")
    args = p.parse_args(argv)
    out = Path(args.out or f"runs/frontier/{Path(args.config).stem}")
    options = parse_options(args.extra)
    rows, first = [], None
    for budget in args.budgets:
        rows.append(run_budget(args.config, budget, out, first, options))
        first = first or Path(rows[0]["run"])  # the first budget's run holds the Fisher scores and M
    rows.sort(key=lambda r: r["budget"])
    (out / "frontier.json").write_text(json.dumps(rows, indent=2) + "\n")
    png = plot(rows, out / "frontier.png", f"{args.config}: bits vs perplexity (one Fisher pass, one M)")
    print(f"\n{args.config}, one Fisher pass and one M for every budget ({png})\n")
    print("| budget | setting | avg bits (codes) | storage | WikiText-2 ppl | C4-sample ppl | ratios + recon s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        wt = f"{r['wikitext2_ppl']:.2f}" if r["wikitext2_ppl"] is not None else "-"
        c4 = f"{r['c4_ppl']:.2f}" if r["c4_ppl"] is not None else "-"
        print(f"| {r['budget']:.3f} | {r['setting']} | {r['avg_bits']:.3f} | {r['avg_bits_storage']:.3f} | {wt} | "
              f"{c4} | {r['seconds']:.0f} |")
    print()
    for r in rows:
        print(f"- {r['budget']:.3f}: `{r['command']}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""The bits-to-perplexity frontier of one config: one Fisher pass and one M, then one ratio solve and one
reconstruction per budget, each its own model; a table and a PNG of avg bits vs WikiText-2 / C4 perplexity.

The first budget's run computes Fisher scores and M; every other budget's run directory gets copies of them,
so its run reuses them (the artifacts' keys match: same model, calibration windows and M settings). Every row
is one :meth:`hiq.api.FitConfig.run` (printed under the table as the equivalent ``hiq fit`` command) cached in
``<out>/<budget>/``; a finished row is read back, not rerun.

    python benchmarks/frontier.py [--config configs/tiny/w2.yaml] [--budgets 2.02 2.05 2.1 2.15 2.2] \\
        [--out runs/frontier/w2] [--compare "paper candidates=runs/frontier/w2"] [--peers runs/bench/w2] \\
        [--extra --reconstruction.iterations=200 ...]

``--compare LABEL=DIR`` draws another frontier (its ``frontier.json``) on the same axes; ``--peers DIR`` draws
benchmarks/peer_table.py's AutoScheme rows of one setting (``DIR/autoround-scheme-<B>/``: bits from the grid check,
perplexities from ``hiq eval``) and the uniform AutoRound rows there (``autoround``, ``autoround-fp32``).
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
from tables import print_table  # noqa: E402


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


#: peer_table.py's uniform AutoRound rows drawn by --peers (AutoScheme rows: autoround-scheme-<B>)
UNIFORM_PEERS = {"autoround": "AutoRound (CPU default)", "autoround-fp32": "AutoRound fp32",
                 "autoround-ext": "AutoRound fp32 sym + alg_ext"}
#: AutoScheme rows with AutoRound's W2A16 advice (sym + enable_alg_ext), each its own curve
SCHEME_VARIANTS = {"autoround-scheme-ext-": "AutoRound AutoScheme sym + alg_ext",
                   "autoround-scheme-best-ext-": "AutoRound AutoScheme best + sym + alg_ext"}


def peer_points(bench: Path) -> dict[str, list[dict]]:
    """AutoRound rows of one setting of benchmarks/peer_table.py's output: ``{label: [{avg_bits, ppl...}]}``."""
    curves: dict[str, list[dict]] = {}
    for d in sorted(bench.iterdir()):
        scheme = d.name.startswith("autoround-scheme-") and "seed" not in d.name  # seed repeats left out
        variant = next((v for p, v in SCHEME_VARIANTS.items() if d.name.startswith(p)), "AutoRound AutoScheme")
        label = variant if scheme else UNIFORM_PEERS.get(d.name)
        if label is None or not ((d / "eval.json").is_file() and (d / "grid.json").is_file()):
            continue
        ev = json.loads((d / "eval.json").read_text())
        grid = json.loads((d / "grid.json").read_text())  # mixed rows: bits per layer, weighted; uniform: peer.json
        bits = grid["avg_bits"] if "avg_bits" in grid else json.loads((d / "peer.json").read_text())["bits"]
        curves.setdefault(label, []).append({"avg_bits": bits, "wikitext2_ppl": ev.get("wikitext2_ppl"),
                                             "c4_ppl": ev.get("c4_ppl")})
    return {k: sorted(v, key=lambda r: r["avg_bits"]) for k, v in curves.items()}


def plot(rows: list[dict], path: Path, title: str, others: dict[str, list[dict]] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in ((axes[0], "wikitext2_ppl", "WikiText-2"), (axes[1], "c4_ppl", "C4-sample")):
        for label, curve in [("hiq", rows), *(others or {}).items()]:
            pts = [(r["avg_bits"], r[key]) for r in curve if r.get(key) is not None]
            style = "o-" if len(pts) > 1 else "s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_xlabel("average code bits (block linears; scale/zero excluded)")
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
    p.add_argument("--compare", nargs="+", default=[], metavar="LABEL=DIR",
                   help="other frontiers (benchmarks/frontier.py --out DIR) drawn on the same axes")
    p.add_argument("--peers", type=Path, default=None,
                   help="peer_table.py's folder of this setting (e.g. runs/bench/w2): its AutoRound rows drawn too")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="options for every run (--section.key=v)")
    args = p.parse_args(argv)
    others: dict[str, list[dict]] = {}
    for item in args.compare:
        label, sep, where = item.partition("=")
        if not sep or not (Path(where) / "frontier.json").is_file():
            raise SystemExit(f"--compare {item!r}: expected LABEL=DIR with DIR/frontier.json")
        others[f"hiq, {label}"] = json.loads((Path(where) / "frontier.json").read_text())
    if args.peers is not None:
        if not args.peers.is_dir():
            raise SystemExit(f"--peers {args.peers}: not a directory (benchmarks/peer_table.py --out DIR/<setting>)")
        others.update(peer_points(args.peers))
    out = Path(args.out or f"runs/frontier/{Path(args.config).stem}")
    options = parse_options(args.extra)
    rows, first = [], None
    for budget in args.budgets:
        rows.append(run_budget(args.config, budget, out, first, options))
        first = first or Path(rows[0]["run"])  # the first budget's run holds the Fisher scores and M
    rows.sort(key=lambda r: r["budget"])
    (out / "frontier.json").write_text(json.dumps(rows, indent=2) + "\n")
    png = plot(rows, out / "frontier.png", f"{args.config}: bits vs perplexity (one Fisher pass, one M)", others)
    def ppl(value):
        return "-" if value is None else f"{value:.2f}"

    print_table(["budget", "setting", "avg bits (codes)", "storage", "WikiText-2 ppl", "C4-sample ppl",
                 "ratios + recon s"],
                [[f"{r['budget']:.3f}", r["setting"], f"{r['avg_bits']:.3f}", f"{r['avg_bits_storage']:.3f}",
                  ppl(r["wikitext2_ppl"]), ppl(r["c4_ppl"]), f"{r['seconds']:.0f}"] for r in rows],
                [f"{r['budget']:.3f}: `{r['command']}`" for r in rows],
                title=f"{args.config}, one Fisher pass and one M for every budget ({png})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

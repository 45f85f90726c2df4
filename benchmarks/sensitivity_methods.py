#!/usr/bin/env python
"""M by its two methods side by side: ``gram`` (single perturbations, cross terms from their output changes) against
``pairs`` (one block evaluation per pair, the paper's definition), on one config, one Fisher pass.

For each method: one ``hiq fit`` run up to the ratios (``sensitivity.method=<m>``, no reconstruction, export or
evaluation; the second run gets a copy of the first's Fisher scores), with ``fidelity_assignments`` random
whole-block assignments per block measured against δᵀMδ/2. Then, at every budget, the MILP's ratios under each M,
how many layers differ, and each solution's objective under the *pairs* M (the reference). Prints a table; run
it with nothing else on the machine for the seconds column to mean anything.

    python benchmarks/sensitivity_methods.py [--config configs/tiny/w2.yaml] [--out runs/mmethods/w2] \\
        [--fidelity 50] [--budgets 2.02 2.05 2.1 2.15 2.2] [--candidates 0.02 0.05 0.1 0.15 0.2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from hiq.api import FitConfig
from hiq.artifacts import load_tensors
from hiq.recipe import SENSITIVITY_METHODS as METHODS
from hiq.sensitivity import assignment_vector
from hiq.solver import LayerInfo, solve_ratios

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import as_command  # noqa: E402  (benchmarks/ is not a package)
from tables import print_table  # noqa: E402


def run_method(config: str, method: str, run: Path, fisher_from: Path | None, fidelity: int,
               candidates: list[float] | None = None) -> dict:
    if fisher_from is not None and not (run / "fisher.safetensors").exists():
        run.mkdir(parents=True, exist_ok=True)
        shutil.copy(fisher_from / "fisher.safetensors", run / "fisher.safetensors")
    row = {"sensitivity.method": method, "sensitivity.fidelity_assignments": fidelity,
           "reconstruction.enabled": False, "export.enabled": False, "evaluation.enabled": False,
           "plots.enabled": False, **({"ratios.candidates": candidates} if candidates else {})}
    cmd = as_command("fit", "--config", config, f"--trainer.default_root_dir={run}", options=row)
    print(f"== {cmd}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    FitConfig.load(config, **row).run(run)
    wall = time.perf_counter() - t0
    blocks = [load_tensors(p) for p in sorted((run / "sensitivity").glob("block_*.safetensors"))]
    ratios = json.loads((run / "ratios.json").read_text())
    return {"method": method, "run": run, "command": cmd, "blocks": blocks, "ratios": ratios, "wall": wall}


def quad(matrices: list[np.ndarray], choice: list[int], per_block: list[int], k: int) -> float:
    total, at = 0.0, 0
    for m, n in zip(matrices, per_block, strict=True):
        delta = assignment_vector(choice[at : at + n], k).numpy()
        total += float(delta @ m @ delta)
        at += n
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny/w2.yaml")
    p.add_argument("--out", default=None, help="default runs/mmethods/<config name>")
    p.add_argument("--fidelity", type=int, default=50, help="random whole-block assignments per block")
    p.add_argument("--budgets", type=float, nargs="+", default=[2.02, 2.05, 2.10, 2.15, 2.20])
    p.add_argument("--candidates", type=float, nargs="+", default=None,
                   help="candidate ratios (default: the config's; the README's table: 0.02 0.05 0.1 0.15 0.2)")
    args = p.parse_args(argv)
    out = Path(args.out or f"runs/mmethods/{Path(args.config).stem}")
    res, first = {}, None
    for method in METHODS:
        res[method] = run_method(args.config, method, out / method, first, args.fidelity, args.candidates)
        first = first or out / method

    layers = res["pairs"]["ratios"]["layers"]
    candidates = res["pairs"]["ratios"]["candidates"]
    k = len(candidates)
    infos = [LayerInfo(r["name"], r["block"], r["n_params"]) for r in layers]
    per_block = [len(b["layers"]) for b in res["pairs"]["blocks"]]
    bits_low, bits_high = res["pairs"]["ratios"]["bits_low"], res["pairs"]["ratios"]["bits_high"]
    mats = {m: [b["matrix"].numpy() for b in res[m]["blocks"]] for m in METHODS}

    print(f"\n{args.config}: M by method (one Fisher pass; {args.fidelity} random whole-block assignments per block "
          f"for the fidelity columns)\n")
    rows = []
    for m in METHODS:
        blocks = res[m]["blocks"]
        sp = [b["fidelity"]["spearman"] for b in blocks]
        pe = [b["fidelity"]["pearson"] for b in blocks]
        rows.append([m, sum(int(b["evaluations"]) for b in blocks), f"{sum(b['seconds'] for b in blocks):.1f}",
                     f"{statistics.mean(sp):.3f} / {min(sp):.3f}", f"{statistics.mean(pe):.3f}"])
    print_table(["method", "block evaluations", "M seconds", "fidelity Spearman (mean / min over blocks)",
                 "Pearson (mean)"], rows)

    cross = []
    for g, q in zip(mats["gram"], mats["pairs"], strict=True):
        off = ~np.eye(g.shape[0], dtype=bool) & (q != 0)
        cross.append((g[off], q[off]))
    gx = np.concatenate([c[0] for c in cross])
    qx = np.concatenate([c[1] for c in cross])
    diag_rel = max(float(np.max(np.abs(np.diag(g) - np.diag(q)) / np.abs(np.diag(q))))
                   for g, q in zip(mats["gram"], mats["pairs"], strict=True))
    print(f"\nCross-layer entries: {gx.size}; Pearson(gram, pairs) {np.corrcoef(gx, qx)[0, 1]:.4f}; "
          f"median |gram − pairs| / median |pairs| {np.median(np.abs(gx - qx)) / np.median(np.abs(qx)):.3f}; "
          f"diagonals agree to {diag_rel:.1e} relative\n")

    rows = []
    for budget in args.budgets:
        sols = {m: solve_ratios(mats[m], infos, candidates, bits_low, bits_high, budget) for m in METHODS}
        choice = {m: [r["candidate_index"] for r in sols[m].layers] for m in METHODS}
        differ = sum(a != b for a, b in zip(choice["gram"], choice["pairs"], strict=True))
        obj = {m: quad(mats["pairs"], choice[m], per_block, k) for m in METHODS}
        rows.append([f"{budget:.2f}", differ, f"{obj['gram']:.4g} / {obj['pairs']:.4g} "
                     f"(+{100 * (obj['gram'] / obj['pairs'] - 1):.2f} %)"])
    print_table(["budget", f"layers with another ratio (of {len(infos)})",
                 "objective under pairs-M: gram's choice / pairs' choice"], rows)
    print()
    for m in METHODS:
        print(f"- {m}: `{res[m]['command']}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

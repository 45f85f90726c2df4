#!/usr/bin/env python
"""Summarise a ratio-optimization run directory (written by ``hiq fit``): cost of M, fidelity of the quadratic
model, solver figures, and the chosen ratios by layer type.

    python benchmarks/ratios_report.py runs/tiny-w2 [runs/tiny-w3 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from hiq.artifacts import load_tensors


def summarise(run: Path) -> str:
    ratios = json.loads((run / "ratios.json").read_text())
    blocks = [load_tensors(p) for p in sorted((run / "sensitivity").glob("block_*.safetensors"))]
    fisher = load_tensors(run / "fisher.safetensors")
    evals = sum(b["evaluations"] for b in blocks)
    seconds = sum(b["seconds"] for b in blocks)
    rho = [b["fidelity"]["spearman"] for b in blocks if "fidelity" in b]
    by_type: dict[str, list[float]] = defaultdict(list)
    for layer in ratios["layers"]:
        by_type[layer["name"].rsplit(".", 1)[-1]].append(layer["ratio"])
    lines = [
        f"## {run}",
        "",
        f"- setting: b_N={ratios['bits_low']}, b_H={ratios['bits_high']}, candidates {ratios['candidates']}, "
        f"target {ratios['target_avg_bits']} avg bits -> achieved {ratios['achieved_avg_bits']:.4f}",
        f"- Fisher: {fisher['samples']} samples x {fisher['calibration']['seqlen']} tokens in {fisher['seconds']:.1f}s",
        f"- M: {len(blocks)} blocks, {evals} block evaluations ({evals // max(1, len(blocks))} per block) on "
        f"{blocks[0]['samples']} samples, {seconds:.1f}s ({seconds / max(1, len(blocks)):.1f}s per block)",
    ]
    if rho:
        lines.append(f"- quadratic model vs measured block loss ({blocks[0]['fidelity']['n_assignments']} random "
                     f"assignments per block): Spearman median {statistics.median(rho):.3f}, "
                     f"min {min(rho):.3f}, max {max(rho):.3f}")
    lines += [
        f"- solver ({ratios['mode']}): status {ratios['status']}, gap {ratios['mip_gap']}, "
        f"{ratios['solve_time_s']:.2f}s, objective {ratios['objective']}",
        "",
        "| layer type | mean ratio | per block |",
        "|---|---|---|",
    ]
    for kind, values in by_type.items():
        lines.append(f"| {kind} | {statistics.mean(values):.3f} | {' '.join(f'{v:.2f}' for v in values)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args(argv)
    print("\n\n".join(summarise(r) for r in args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

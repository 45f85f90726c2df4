"""The per-stage table of benchmarks/results/shaped_7b_cpu.md from runs of benchmarks/shaped_memory.sh.

    python benchmarks/shaped_report.py runs/shaped/profile-2blk-base-k3.json runs/shaped/profile-2blk-after-k3.json

Each argument is a profile written by benchmarks/memory_profile.py; the run folder's metrics.json (the
``--trainer.default_root_dir`` of its command) gives each stage's own seconds where the pipeline records them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import print_table  # noqa: E402  (benchmarks/ is not a package)

#: profile stage -> the metrics.json stage_seconds keys it covers
SECONDS = {"fisher": ("fisher",), "sensitivity": ("sensitivity",), "ratios+plots": ("ratios",),
           "tuning": ("tuning",), "export": ("export_packed", "export_dequantized"), "evaluation": ("evaluation",)}


def run_dir(profile: dict) -> Path:
    arg = next(a for a in profile["command"] if a.startswith("--trainer.default_root_dir="))
    return Path(arg.split("=", 1)[1])


def rows(profile: dict) -> dict[str, tuple[float, str]]:
    metrics = json.loads((run_dir(profile) / "metrics.json").read_text())
    seconds = metrics["stage_seconds"]
    blocks = {b["block"]: b["seconds"] for b in metrics.get("blocks", [])}
    out = {}
    for stage, s in profile["stages"].items():
        if stage.startswith("reconstruction block "):
            sec = blocks.get(int(stage.rsplit(" ", 1)[1]) - 1)
        elif stage in SECONDS:
            sec = sum(seconds.get(k, 0.0) for k in SECONDS[stage])
        else:
            sec = None
        out[stage] = (s["peak_rss_gib"], s.get("peak_anon_gib"),
                      f"{sec:.0f}" if sec is not None else f"({s['seconds']:.0f} sampled)")
    out["whole run"] = (profile["peak_rss_gib"], profile.get("peak_anon_gib"), f"{profile['wall_s']:.0f} wall")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", type=Path)
    args = parser.parse_args(argv)
    tables = [rows(json.loads(p.read_text())) for p in args.profiles]
    names = [p.stem.removeprefix("profile-") for p in args.profiles]
    stages = list(dict.fromkeys(s for t in tables for s in t))
    def cells(t: dict, stage: str) -> list[str]:
        if stage not in t:
            return ["-", "-", "-"]
        rss, anon, sec = t[stage]
        return [f"{rss:.2f}", "-" if anon is None else f"{anon:.2f}", sec]

    print_table(["stage", *(f"{n}: {c}" for n in names for c in ("peak RSS GiB", "not file-backed GiB", "s"))],
                [[stage, *(c for t in tables for c in cells(t, stage))] for stage in stages])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

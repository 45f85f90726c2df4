#!/usr/bin/env python
"""The paper's ablation (Table 4) on the bundled model: each step of the method added in turn.

Rows per setting (W2 per-channel, W3 per-channel, W2 g64 by default):

  RTN                         hiq eval, all columns at b_N, no calibration
  LWC only                    OmniQuant-style: every column at b_N through LWC (ratios fixed at 0)
  + uniform ratio             the largest candidate ratio within the budget for every layer, both parts LWC
  + optimal ratio             the MILP's ratios (Eq. 9), both parts LWC
  + uniform + hybrid          uniform ratios, high-impact columns through AdaRound
  + optimal + hybrid (ours)   the method

Every row is one ``hiq`` command (printed in the table) run as a subprocess; its run directory under
``--out`` is its cache, so a rerun only computes what is missing (``hiq fit`` resumes by itself). Fisher scores
and M are computed once per setting by the "ours" row and copied into the other rows' run directories, so
those rows reuse them; the time column adds the stage times a row depends on (Fisher, and M only where
the ratios come from the MILP), measured where they were computed, plus reconstruction and evaluation.

    python benchmarks/ablation.py [--settings w2 w3 w2-g64] [--out runs/ablation]     # or: make ablation
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HIQ = [sys.executable, "-m", "hiq"]  # this interpreter's hiq, console script installed or not

FIT_ROWS = [  # name, label, extra options
    ("ours", "+ optimal + hybrid (ours)", ["--ratios.mode=optimal", "--reconstruction.high_quantizer=adaround"]),
    ("lwc", "LWC only", ["--ratios.mode=fixed", "--ratios.fixed_ratio=0.0", "--sensitivity.enabled=false",
                         "--reconstruction.high_quantizer=lwc"]),
    ("uniform", "+ uniform ratio", ["--ratios.mode=uniform", "--sensitivity.enabled=false",
                                    "--reconstruction.high_quantizer=lwc"]),
    ("optimal", "+ optimal ratio", ["--ratios.mode=optimal", "--reconstruction.high_quantizer=lwc"]),
    ("uniform-hybrid", "+ uniform + hybrid", ["--ratios.mode=uniform", "--sensitivity.enabled=false",
                                              "--reconstruction.high_quantizer=adaround"]),
]
ORDER = ["rtn", "lwc", "uniform", "optimal", "uniform-hybrid", "ours"]


def _run(cmd: list[str], log: Path) -> float:
    print(f"== {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}); see {log}")
    return time.time() - t0


def run_setting(setting: str, out: Path, extra: list[str]) -> dict[str, dict]:
    config = f"configs/tiny/{setting}.yaml"
    cfg = yaml.safe_load(Path(config).read_text())
    bits, group = cfg["model"]["bits_low"], cfg["model"]["group_size"]
    base = out / setting
    rows: dict[str, dict] = {}
    rtn_json = base / "rtn.json"
    rtn_cmd = [*HIQ, "eval", "--config", "configs/tiny/rtn-w2.yaml", f"--quant.bits={bits}",
               f"--quant.group_size={group or 'null'}", "--quant.avg_bits_convention=weights_only",
               f"--output={rtn_json}"]
    if not rtn_json.is_file():
        _run(rtn_cmd, base / "rtn.log")
    r = json.loads(rtn_json.read_text())
    rows["rtn"] = {"label": "RTN", "avg_bits": r["avg_bits"], "wikitext2_ppl": r["wikitext2_ppl"],
                   "c4_ppl": r["c4_ppl"], "seconds": r["wall_time_s"],
                   "command": " ".join(["hiq", *rtn_cmd[len(HIQ):]])}
    for name, label, options in FIT_ROWS:
        run = base / name
        if name != "ours" and not (run / "fisher.pt").exists():  # share Fisher and M of the "ours" row
            run.mkdir(parents=True, exist_ok=True)
            shutil.copy(base / "ours" / "fisher.pt", run / "fisher.pt")
            if "--sensitivity.enabled=false" not in options:
                shutil.copytree(base / "ours" / "sensitivity", run / "sensitivity", dirs_exist_ok=True)
        cmd = [*HIQ, "fit", "--config", config, f"--trainer.default_root_dir={run}", *options,
               "--export.enabled=false", *extra]
        if not (run / "metrics.json").is_file():
            _run(cmd, base / f"{name}.log")
        m = json.loads((run / "metrics.json").read_text())
        st = m["stage_seconds"]
        seconds = sum(v for k, v in st.items() if k != "export")
        rows[name] = {"label": label, "avg_bits": m["avg_bits"], "wikitext2_ppl": m["wikitext2_ppl"],
                      "c4_ppl": m["c4_ppl"], "seconds": seconds, "stage_seconds": st,
                      "blocks": m.get("blocks"), "command": " ".join(["hiq", *cmd[len(HIQ):]])}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["w2", "w3", "w2-g64"],
                   help="configs/tiny/<setting>.yaml to ablate")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="options passed to every hiq fit (e.g. --reconstruction.iterations=100)")
    args = p.parse_args(argv)
    out = Path(args.out)
    tables = {}
    for setting in args.settings:
        tables[setting] = run_setting(setting, out, args.extra)
        (out / setting / "table.json").write_text(json.dumps(tables[setting], indent=2) + "\n")
    for setting, rows in tables.items():
        print(f"\n**{setting}** (configs/tiny/{setting}.yaml)\n")
        print("| method | avg bits | WikiText-2 ppl | C4-sample ppl | time s |")
        print("|---|---|---|---|---|")
        for name in ORDER:
            r = rows[name]
            print(f"| {r['label']} | {r['avg_bits']:.3f} | {r['wikitext2_ppl']:.2f} | {r['c4_ppl']:.2f} | "
                  f"{r['seconds']:.0f} |")
        print()
        for name in ORDER:
            print(f"- {rows[name]['label']}: `{rows[name]['command']}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

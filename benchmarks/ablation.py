#!/usr/bin/env python
"""The paper's ablation (Table 4) on the bundled model: each step of the method added in turn.

Rows per setting (W2 per-channel, W3 per-channel, W2 g64 by default):

  RTN                         hiq eval, all columns at b_N, no calibration
  LWC only                    OmniQuant-style: every column at b_N through LWC (ratios fixed at 0)
  + uniform ratio             the largest candidate ratio within the budget for every layer, both parts LWC
  + optimal ratio             the MILP's ratios (Eq. 9), both parts LWC
  + uniform + hybrid          uniform ratios, high-impact columns through AdaRound
  + optimal + hybrid (ours)   the method

Every row is one call of the Python API (``hiq.api.FitConfig.run`` / ``hiq.evaluate``), printed under the table as
the equivalent ``hiq`` command; its run directory under ``--out`` is its cache, so a rerun only computes what is
missing (a run resumes by itself). Fisher scores and M are computed once per setting by the "ours" row (or, with
``--rows``, the first chosen row that measures M) and copied into the other rows' run directories, so those rows
reuse them; the time column adds the stage times a row depends on (Fisher, and M only where
the ratios come from the MILP), measured where they were computed, plus reconstruction and evaluation.

    python benchmarks/ablation.py [--settings w2 w3 w2-g64] [--out runs/ablation]     # or: make ablation
    python benchmarks/ablation.py --settings w3 --rows rtn sr sr-uniform sr-optimal   # the signround rows only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

import hiq
from hiq.api import FitConfig
from hiq.recipe import PAPER_CANDIDATES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import print_table  # noqa: E402  (benchmarks/ is not a package)

# the paper's quantizers and candidate ratios as the README's paper-preset table ran them (400 Adam steps of 4
# windows per block)
PAPER = {"ratios.candidates": list(PAPER_CANDIDATES), "reconstruction.normal_quantizer": "lwc",
         "reconstruction.lr_schedule": "constant", "reconstruction.keep_best": False,
         "reconstruction.iterations": 400, "reconstruction.batch_size": 4}
# the signround preset (learned rounding of every weight; AutoRound's 200 steps of 8 windows per block)
SIGNROUND = {"reconstruction.high_quantizer": "signround", "reconstruction.normal_quantizer": "signround",
             "reconstruction.lr_schedule": "linear", "reconstruction.keep_best": True,
             "reconstruction.iterations": 200, "reconstruction.batch_size": 8}
FIT_ROWS = [  # name, label, options (hiq fit's --section.key=value)
    ("ours", "+ optimal + hybrid (paper method)", {"ratios.mode": "optimal",
                                                   "reconstruction.high_quantizer": "adaround", **PAPER}),
    ("lwc", "LWC only", {"ratios.mode": "fixed", "ratios.fixed_ratio": 0.0, "sensitivity.enabled": False,
                         "reconstruction.high_quantizer": "lwc", **PAPER}),
    ("uniform", "+ uniform ratio", {"ratios.mode": "uniform", "sensitivity.enabled": False,
                                    "reconstruction.high_quantizer": "lwc", **PAPER}),
    ("optimal", "+ optimal ratio", {"ratios.mode": "optimal", "reconstruction.high_quantizer": "lwc", **PAPER}),
    ("uniform-hybrid", "+ uniform + hybrid", {"ratios.mode": "uniform", "sensitivity.enabled": False,
                                              "reconstruction.high_quantizer": "adaround", **PAPER}),
    ("sr", "SignRound only (ratio 0)", {"ratios.mode": "fixed", "ratios.fixed_ratio": 0.0,
                                        "sensitivity.enabled": False, **SIGNROUND}),
    ("sr-uniform", "SignRound + uniform ratio", {"ratios.mode": "uniform", "sensitivity.enabled": False,
                                                 **SIGNROUND}),
    ("sr-optimal", "SignRound + optimal ratio (default)", {"ratios.mode": "optimal", **SIGNROUND}),
]
ORDER = ["rtn", "lwc", "uniform", "optimal", "uniform-hybrid", "ours", "sr", "sr-uniform", "sr-optimal"]


def parse_options(items: list[str]) -> dict:
    """``["--reconstruction.iterations=100", ...]`` -> ``{"reconstruction.iterations": 100}`` (YAML values)."""
    out = {}
    for item in items:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise SystemExit(f"option {item!r}: expected --section.key=value")
        out[key] = yaml.safe_load(value)
    return out


def as_command(*head: str, options: dict) -> str:
    """The ``hiq`` command line equivalent to an API call with these options."""
    def fmt(v):
        if isinstance(v, (list, tuple)):  # one shell word: [0,0.02,0.05]
            return "[" + ",".join(fmt(x) for x in v) + "]"
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(["hiq", *head, *(f"--{k}={fmt(v)}" for k, v in options.items())])


def _measures_m(options: dict) -> bool:
    return options.get("sensitivity.enabled", True)


def run_setting(setting: str, out: Path, extra: dict, chosen: list[str] | None = None) -> dict[str, dict]:
    """Every row of one setting (or the ``chosen`` ones), computed where its run directory has no result."""
    config = f"configs/tiny/{setting}.yaml"
    cfg = yaml.safe_load(Path(config).read_text())
    bits, group = cfg["quant"]["bits"], cfg["quant"]["group_size"]
    base = out / setting
    rows: dict[str, dict] = {}
    if chosen is None or "rtn" in chosen:
        rows["rtn"] = _rtn_row(setting, base / "rtn.json", bits, group)
    fit_rows = [row for row in FIT_ROWS if chosen is None or row[0] in chosen]
    fit_rows.sort(key=lambda row: not _measures_m(row[2]))  # Fisher and M from the first row that measures M
    source = base / fit_rows[0][0] if fit_rows else None
    for name, label, options in fit_rows:
        run = base / name
        if run != source and not (run / "fisher.safetensors").exists():  # share Fisher and M of the source row
            run.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / "fisher.safetensors", run / "fisher.safetensors")
            if _measures_m(options) and (source / "sensitivity").is_dir():
                shutil.copytree(source / "sensitivity", run / "sensitivity", dirs_exist_ok=True)
        row = {**options, "export.enabled": False, **extra}
        cmd = as_command("fit", "--config", config, f"--trainer.default_root_dir={run}", options=row)
        if not (run / "metrics.json").is_file():
            print(f"== {cmd}", file=sys.stderr, flush=True)
            FitConfig.load(config, **row).run(run)
        m = json.loads((run / "metrics.json").read_text())
        st = m["stage_seconds"]
        seconds = sum(v for k, v in st.items() if k != "export")
        rows[name] = {"label": label, "avg_bits": m["avg_bits"], "wikitext2_ppl": m["wikitext2_ppl"],
                      "c4_ppl": m["c4_ppl"], "seconds": seconds, "stage_seconds": st,
                      "blocks": m.get("blocks"), "command": cmd}
    return rows


def _rtn_row(setting: str, rtn_json: Path, bits: int, group: int | None) -> dict:
    rtn = hiq.RTNOptions(bits=bits, group_size=group, avg_bits_convention="weights_only")
    if not rtn_json.is_file():
        print(f"== {setting}: RTN", file=sys.stderr, flush=True)
        hiq.evaluate("tiny-llama", evaluation=hiq.EvaluationOptions(batch_size=4), quant=rtn, output=rtn_json)
    r = json.loads(rtn_json.read_text())
    return {"label": "RTN", "avg_bits": r["avg_bits"], "wikitext2_ppl": r["wikitext2_ppl"],
            "c4_ppl": r["c4_ppl"], "seconds": r["wall_time_s"],
            "command": as_command("eval", "--config", "configs/tiny/rtn-w2.yaml", options={
                "quant.bits": bits, "quant.group_size": group, "quant.avg_bits_convention": "weights_only",
                "output": rtn_json})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["w2", "w3", "w2-g64"],
                   help="configs/tiny/<setting>.yaml to ablate")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--rows", nargs="+", default=None, choices=ORDER, help="only these rows (default: all)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="options passed to every hiq fit (e.g. --reconstruction.iterations=100)")
    args = p.parse_args(argv)
    out = Path(args.out)
    tables = {}
    for setting in args.settings:
        tables[setting] = run_setting(setting, out, parse_options(args.extra), args.rows)
        (out / setting / "table.json").write_text(json.dumps(tables[setting], indent=2) + "\n")
    for setting, rows in tables.items():
        order = [rows[name] for name in ORDER if name in rows]
        print_table(["method", "avg bits", "WikiText-2 ppl", "C4-sample ppl", "time s"],
                    [[r["label"], f"{r['avg_bits']:.3f}", f"{r['wikitext2_ppl']:.2f}", f"{r['c4_ppl']:.2f}",
                      f"{r['seconds']:.0f}"] for r in order],
                    [f"{r['label']}: `{r['command']}`" for r in order],
                    title=f"**{setting}** (configs/tiny/{setting}.yaml)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

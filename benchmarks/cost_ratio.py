"""Cost of hiq's whole pipeline against AutoRound's at the same steps per block, timed one after the other.

    python benchmarks/cost_ratio.py --iters 200 --out benchmarks/results/cost_ratio.md

Both quantize the bundled model at W2 per-channel on the same 128 x 512 calibration windows
(``configs/tiny/w2.yaml``'s data section, written once to ``calibration.pt`` by ``benchmarks/peer_table.py``'s
``write_calibration``); both read that file, so neither side tokenises the calibration text in the timed run
(``--hiq-tokenizes``: hiq draws the same windows from the text itself, about 18 s more on this machine):

- hiq: ``hiq fit --config configs/tiny/w2.yaml --data.dataset=calibration.pt --reconstruction.iterations=N`` with
  export, evaluation and plots off: Fisher, M, HiGHS ratios, N steps per block (the config's 8 windows per step) and
  the end-to-end scale tuning (the config's ``reconstruction.tune_steps``; the table also gives the ratio without
  that stage's own seconds);
- AutoRound (its venv, ``benchmarks/peer_tools/quantize.py --method autoround --amp off --iters N``): fp32,
  its default 8 windows per step; ``--autoround-recipes plain scheme-ext`` also times its W2 advice as the quality
  tables run it (AutoScheme at 2.10 bits over W2/W3, ``sym=True``, ``enable_alg_ext=True``, seed 42).

Each side is one fresh process; the wall time counts everything from the start of the process to its exit (imports,
model load, quantization, writing the result). Run it with nothing else on the machine: the ratio is only
meaningful then. The script refuses to start while another torch process runs (``--force`` to override).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_injection import emit  # noqa: E402
from peer_table import QUANTIZE, write_calibration  # noqa: E402


def busy() -> list[str]:
    """Other python processes using CPU right now (a timing beside them would be wrong)."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    me = os.getpid()
    return [line.strip()[:100] for line in out if "python" in line and int(line.split()[0]) != me
            and float(line.split()[1]) > 20]


def timed(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}; see {log}")
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=200, help="steps per block on both sides")
    ap.add_argument("--peers-python", default=str(ROOT / ".venv-peers-autoround" / "bin" / "python"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--force", action="store_true", help="time even while other python processes run")
    ap.add_argument("--autoround-recipes", nargs="+", choices=sorted(AUTOROUND_RECIPES), default=["plain"],
                    help="AutoRound runs to time after hiq's, one after the other")
    ap.add_argument("--hiq-tokenizes", action="store_true",
                    help="hiq tokenises the calibration text and draws the windows itself (the same windows)")
    args = ap.parse_args()
    others = busy()
    if others and not args.force:
        sys.exit("other python processes are running (timings would be wrong):\n  " + "\n  ".join(others))
    work = Path(tempfile.mkdtemp(prefix="hiq-cost-"))
    config = ROOT / "configs" / "tiny" / "w2.yaml"
    cfg = yaml.safe_load(config.read_text())
    from hiq.model import resolve_model_path

    model_path = resolve_model_path(cfg["model"]["path"])
    calibration, info = write_calibration(work, cfg, model_path)
    hiq_cmd = [sys.executable, "-m", "hiq", "fit", "--config", str(config),
               f"--trainer.default_root_dir={work / 'hiq'}", f"--reconstruction.iterations={args.iters}",
               *([] if args.hiq_tokenizes else [f"--data.dataset={calibration}"]),
               "--export.enabled=false", "--evaluation.enabled=false", "--plots.enabled=false"]
    hiq_s = timed(hiq_cmd, work / "hiq.log")
    peers = {}
    for recipe in args.autoround_recipes:
        out = work / f"autoround-{recipe}"
        cmd = [args.peers_python, str(QUANTIZE), "--bits", "2", "--group-size", "none", "--calibration",
               str(calibration), "--model", model_path, "--out", str(out), "--amp", "off", "--iters", str(args.iters),
               *AUTOROUND_RECIPES[recipe][1]]
        seconds = timed(cmd, work / f"autoround-{recipe}.log")
        peers[recipe] = (seconds, json.loads((out / "peer.json").read_text()))
    ratios = work / "hiq" / "ratios.json"
    stages = json.loads(ratios.read_text()) if ratios.is_file() else {}
    parts = stage_seconds(work / "hiq")
    startup = hiq_s - sum(parts.values())
    batch = cfg["reconstruction"].get("batch_size")
    recipes = " ".join(args.autoround_recipes)
    lines = [f"Cost at equal steps per block: `python benchmarks/cost_ratio.py --iters {args.iters}"
             + ("" if args.autoround_recipes == ["plain"] else f" --autoround-recipes {recipes}")
             + f"` (bundled model, W2 per-channel, {info['count']} x {info['length']} windows, one process each, "
             "one after the other, nothing else running)", "",
             "| side | steps per block | windows per step | wall s (process start to exit) | hiq / this |",
             "|---|---|---|---|---|",
             f"| hiq fit (Fisher + M + ratios + reconstruction + tuning) | {args.iters} | {batch} | {hiq_s:.1f} | |"]
    for recipe, (seconds, peer) in peers.items():
        lines.append(f"| AutoRound {peer.get('version', '')} {AUTOROUND_RECIPES[recipe][0]} | {args.iters} | 8 | "
                     f"{seconds:.1f} | **{hiq_s / seconds:.2f}x** |")
    lines += ["", "hiq / AutoRound per row above (target <= 1.0x)"
              + (f"; without the end-to-end tuning's {parts['tuning']:.1f} s: "
                 + ", ".join(f"{(hiq_s - parts['tuning']) / s:.2f}x" for s, _ in peers.values())
                 if "tuning" in parts else "")
              + "; AutoRound's own quantize time (load to dequantised weights): "
              + ", ".join(f"{p['seconds']:.1f} s" for _, p in peers.values())
              + f"; hiq's ratios: avg {stages.get('achieved_avg_bits', float('nan')):.4f} bits.", "",
              "hiq's stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
              + f"; the rest (imports, model load, {'tokenising, ' if args.hiq_tokenizes else ''}block inputs, "
              f"writing) {startup:.1f}."]
    emit(lines, args.out)


#: the AutoRound runs this script can time: name -> (label, quantize.py options)
AUTOROUND_RECIPES = {
    "plain": ("fp32 (load + tune + save)", ["--method", "autoround"]),
    "scheme-ext": ("AutoScheme 2.10 + sym + enable_alg_ext, fp32, seed 42 (its W2 advice; load + scheme + tune + save)",
                   ["--method", "autoround-scheme", "--sym", "--alg-ext", "--seed", "42", "--avg-bits", "2.1",
                    "--scheme-bits", "2", "3"]),
}


def stage_seconds(run: Path) -> dict[str, float]:
    """Seconds of hiq's stages as its artifacts record them (Fisher, M, ratio solve, block fits)."""
    from hiq.artifacts import load_tensors

    def total(folder: str) -> float:
        return sum(float(load_tensors(p)["seconds"]) for p in sorted((run / folder).glob("block_*.safetensors")))

    out = {"Fisher": float(load_tensors(run / "fisher.safetensors")["seconds"]), "M": total("sensitivity")}
    out["ratios"] = float(json.loads((run / "ratios.json").read_text())["solve_time_s"])
    out["reconstruction"] = total("blocks")
    if (run / "tuning.safetensors").is_file():
        out["tuning"] = float(load_tensors(run / "tuning.safetensors")["seconds"])
    return out


if __name__ == "__main__":
    main()

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
  its default 8 windows per step.

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
    ar_cmd = [args.peers_python, str(QUANTIZE), "--method", "autoround", "--bits", "2", "--group-size", "none",
              "--calibration", str(calibration), "--model", model_path, "--out", str(work / "autoround"),
              "--amp", "off", "--iters", str(args.iters)]
    hiq_s = timed(hiq_cmd, work / "hiq.log")
    ar_s = timed(ar_cmd, work / "autoround.log")
    ratios = work / "hiq" / "ratios.json"
    stages = json.loads(ratios.read_text()) if ratios.is_file() else {}
    parts = stage_seconds(work / "hiq")
    startup = hiq_s - sum(parts.values())
    peer = json.loads((work / "autoround" / "peer.json").read_text())
    batch = cfg["reconstruction"].get("batch_size")
    lines = [f"Cost at equal steps per block: `python benchmarks/cost_ratio.py --iters {args.iters}` "
             f"(bundled model, W2 per-channel, {info['count']} x {info['length']} windows, one process each, "
             "one after the other, nothing else running)", "",
             "| side | steps per block | windows per step | wall s (process start to exit) |", "|---|---|---|---|",
             f"| hiq fit (Fisher + M + ratios + reconstruction + tuning) | {args.iters} | {batch} | {hiq_s:.1f} |",
             f"| AutoRound {peer.get('version', '')} fp32 (load + tune + save) | {args.iters} | 8 | {ar_s:.1f} |",
             "", f"hiq / AutoRound = **{hiq_s / ar_s:.2f}x** (target <= 1.5x)"
             + (f"; without the end-to-end tuning's {parts['tuning']:.1f} s: "
                f"**{(hiq_s - parts['tuning']) / ar_s:.2f}x**" if "tuning" in parts else "")
             + "; AutoRound's own quantize time "
             f"(load to dequantised weights) {peer['seconds']:.1f} s; hiq's ratios: avg "
             f"{stages.get('achieved_avg_bits', float('nan')):.4f} bits.", "",
             "hiq's stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
             + f"; the rest (imports, model load, {'tokenising, ' if args.hiq_tokenizes else ''}block inputs, "
             f"writing) {startup:.1f}."]
    emit(lines, args.out)


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

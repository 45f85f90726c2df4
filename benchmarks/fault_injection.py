"""Kill ``hiq fit`` with SIGKILL at N points spread over a run, rerun it in the same folder, and check that the
result is the uninterrupted run's: the quality fields of ``metrics.json`` and every byte of ``model/`` and
``packed/``.

    python benchmarks/fault_injection.py --n 10 --out benchmarks/results/fault_injection.md

The run is the bundled tiny model with a reduced recipe (fewer iterations and windows) so one run takes under a
minute; every stage runs (Fisher, M, HiGHS ratios, reconstruction, export of both formats, evaluation). Kill
times are stratified over the reference run's stages (from its "[hiq] run directory" line, printed once the input
checks have passed, to its end: one uniformly random point in each of N equal slices, seeded), so every stage gets
hit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CONFIG = {
    "model": {"path": "tiny-llama"},
    "quant": {"bits": 2, "bits_high": 3},
    "data": {"dataset": "wikitext2", "split": "train", "nsamples": 8, "seqlen": 64, "seed": 0},
    "trainer": {"accelerator": "cpu"},
    "sensitivity": {"nsamples": 2, "fidelity_assignments": 0},
    "ratios": {"candidates": [0.05, 0.2], "target_avg_bits": 2.1, "mode": "optimal"},
    "reconstruction": {"iterations": 40, "batch_size": 4},
    "export": {"enabled": True, "formats": ["packed", "dequantized"]},
    "evaluation": {"datasets": ["wikitext2"], "seqlen": 64, "max_windows": 16, "tasks": None},
    "plots": {"enabled": False},
}
#: Lines printed when a stage ends: a kill right after one lands at the start of the next stage.
MARKERS = ("[hiq] Fisher:", "[hiq] M:", "[hiq] ratios", "[hiq] reconstruction:", "exported packed",
           "exported dequantized")
QUALITY = ("setting", "avg_bits", "avg_bits_storage", "wikitext2_ppl", "weights_key", "model_fingerprint")


def fit(config: Path, run: Path, log: Path, *extra: str) -> subprocess.Popen:
    """``hiq fit`` in its own process group (so a kill reaches every process it started), output to ``log``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "hiq", "fit", "--config", str(config),
                             f"--trainer.default_root_dir={run}", *extra], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def digest_dir(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(path.rglob("*")) if p.is_file()}


def stage_at_kill(log: Path) -> str:
    """The last stage the log shows started (progress bars and [hiq] lines)."""
    text = log.read_text(errors="replace")
    marks = [("Fisher", "fisher"), ("Sensitivity (M)", "M"), ("[hiq] M:", "ratios"), ("ratios (", "ratios"),
             ("Block ", "reconstruction"), ("exported packed", "export"), ("export", "export"),
             ("wikitext2 ppl", "evaluation"), ("metrics.json", "done")]
    best, where = -1, "startup"
    for mark, stage in marks:
        i = text.rfind(mark)
        if i > best:
            best, where = i, stage
    if where == "reconstruction":
        i = text.rfind("Block ")
        where = "block " + text[i + 6 : i + 9].split("/")[0].strip()
    return where


def summary(run: Path) -> tuple[dict, dict]:
    metrics = json.loads((run / "metrics.json").read_text())
    files = {f"model/{k}": v for k, v in digest_dir(run / "model").items()}
    files.update({f"packed/{k}": v for k, v in digest_dir(run / "packed").items()})
    return {k: metrics.get(k) for k in QUALITY}, files


def emit(lines: list[str], out: Path | None) -> None:
    """Print the markdown table and write it to ``out`` (when given)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="kill points")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markers", nargs="*", default=list(MARKERS),
                    help="also kill as soon as each of these lines shows in the log (one kill per marker)")
    ap.add_argument("--out", type=Path, default=None, help="markdown table to write")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hiq-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))

    t0 = time.time()
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    proc = fit(config, ref, work / "reference.log")
    start = None  # when the checks have passed and the stages begin (the log's "[hiq] run directory" line)
    while proc.poll() is None:
        if start is None and "[hiq] run directory" in (work / "reference.log").read_text(errors="replace"):
            start = time.time() - t0
        time.sleep(0.1)
    if proc.returncode != 0:
        sys.exit(f"reference run failed; see {work / 'reference.log'}")
    total = time.time() - t0
    start = start or 0.0
    ref_quality, ref_files = summary(ref)
    print(f"reference run: {total:.1f}s (stages from {start:.1f}s), wikitext2 ppl "
          f"{ref_quality['wikitext2_ppl']:.4f}, {len(ref_files)} files", flush=True)

    rng = random.Random(args.seed)
    rows, same = [], 0
    points = [("time", start + (i + rng.random()) / args.n * (total - start) * 0.98) for i in range(args.n)]
    points += [("marker", m) for m in args.markers]
    for i, (kind, point) in enumerate(points):
        run, log = work / f"kill_{i:02d}", work / f"kill_{i:02d}.log"
        shutil.rmtree(run, ignore_errors=True)
        t_start = time.time()
        proc = fit(config, run, log)
        killed = False
        while proc.poll() is None:  # kill at the time, or as soon as the marker line is in the log
            if (time.time() - t_start >= point) if kind == "time" else (point in log.read_text(errors="replace")):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
                break
            time.sleep(0.05)
        when = time.time() - t_start
        stage = (stage_at_kill(log) if kind == "time" else f"right after `{point}`") if killed else "finished first"
        t1 = time.time()
        rerun = fit(config, run, work / f"kill_{i:02d}.rerun.log")
        rc = rerun.wait()
        if rc != 0:
            rows.append((i, when, stage, f"rerun failed (rc {rc})", "-", "-", "no"))
            continue
        quality, files = summary(run)
        q_ok, f_ok = quality == ref_quality, files == ref_files
        same += q_ok and f_ok
        rerun_log = (work / f"kill_{i:02d}.rerun.log").read_text(errors="replace")
        reused = rerun_log.count("reused")
        rows.append((i, when, stage, f"{time.time() - t1:.0f}s, {reused} reuse lines",
                     "identical" if q_ok else "DIFFERENT", "identical" if f_ok else "DIFFERENT",
                     "yes" if q_ok and f_ok else "no"))
        print(f"kill {i}: at {when:.1f}s during {stage}: metrics {rows[-1][4]}, files {rows[-1][5]}", flush=True)

    lines = [f"Fault injection: `python benchmarks/fault_injection.py --n {args.n} --seed {args.seed}` "
             f"(+ {len(args.markers)} kills right after stage lines) "
             f"(reference run {total:.0f}s, stages from {start:.0f}s; SIGKILL to the whole process group, then a rerun "
             "in the same folder)",
             "",
             "| # | kill at (s) | stage at kill | rerun | metrics.json quality | model/ + packed/ bytes | same |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.1f} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} |" for r in rows]
    lines += ["", f"**{same} of {len(points)}** reruns gave the uninterrupted run's metrics and bytes."]
    emit(lines, args.out)


if __name__ == "__main__":
    main()

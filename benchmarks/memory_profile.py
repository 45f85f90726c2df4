"""Run a command, sample its resident memory (the process and its children) every ``--every`` seconds, and report the
peak and the time per stage of a ``hiq fit`` from the markers it prints on stderr.

    python benchmarks/memory_profile.py --out runs/mem/2blk.json -- \
        .venv/bin/hiq fit --config configs/tiny/w2.yaml --model.path=runs/shaped/llama-2-7b-2blk ...

Stages are recognised by what the run prints as it goes (tqdm bars and ``[hiq]`` lines; see ``MARKERS``): a
sample belongs to the stage whose marker came last. ``load`` is everything before the first marker (imports,
loading the model, the calibration windows, the fingerprint). The command's stderr is copied to ``<out>.log``;
the JSON holds every sample ``(seconds, rss_bytes, stage)`` and, per stage, its peak RSS, first and last sample
time. Memory is read from ``/proc/<pid>/status`` (VmRSS) of the command and every descendant, summed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

#: (pattern in the run's stderr, stage it starts); a ``{}`` in the stage takes the pattern's first group
MARKERS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^Fisher"), "fisher"),
    (re.compile(r"^Sensitivity \(M\)"), "sensitivity"),
    (re.compile(r"^\[hiq\] M: "), "ratios+plots"),
    (re.compile(r"^Block (\d+)/\d+"), "reconstruction block {}"),
    (re.compile(r"^\[hiq\] block (\d+): reused"), "reconstruction block {}"),
    (re.compile(r"^\[hiq\] reconstruction: "), "tuning"),
    (re.compile(r"^\[hiq\] tuning: \d+ steps|^\[hiq\] tuning: reused"), "export"),
    (re.compile(r"^(?:wikitext2|c4) ppl"), "evaluation"),
    (re.compile(r"^\[hiq\] export reused"), "export"),
]


def rss_bytes(root: int, field: str = "VmRSS") -> int:
    """``field`` of ``/proc/<pid>/status`` (``VmRSS``: all resident memory; ``RssAnon``: the part not backed by a
    file, i.e. without the pages of memory-mapped safetensors shards, which the kernel can drop and re-read) of
    ``root`` and all its descendants (Linux ``/proc``), in bytes; 0 once it is gone."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def stage_of(line: str, current: str) -> str:
    line = line.strip()
    for pattern, stage in MARKERS:
        m = pattern.search(line)
        if m:
            return stage.format(*m.groups()) if "{}" in stage else stage
    return current


def profile(command: list[str], out: Path, every: float = 1.0) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    t0 = time.time()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    state = {"stage": "load"}
    samples: list[tuple[float, int, str, int]] = []  # (seconds, VmRSS, stage, RssAnon)

    def read(stream, sink) -> None:
        buf = b""
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                break
            sink.write(chunk)
            sink.flush()
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for raw in [*lines, buf]:  # and the unfinished tail: a tqdm bar waits for its next update to end
                state["stage"] = stage_of(raw.decode(errors="replace"), state["stage"])

    with open(log_path, "wb") as log, open(out.with_suffix(".stdout"), "wb") as stdout_log:
        readers = [threading.Thread(target=read, args=(proc.stderr, log), daemon=True),
                   threading.Thread(target=read, args=(proc.stdout, stdout_log), daemon=True)]
        for r in readers:
            r.start()
        while proc.poll() is None:
            samples.append((round(time.time() - t0, 2), rss_bytes(proc.pid), state["stage"],
                            rss_bytes(proc.pid, "RssAnon")))
            time.sleep(every)
        for r in readers:
            r.join()
    stages: dict[str, dict] = {}
    for t, rss, stage, anon in samples:
        s = stages.setdefault(stage, {"peak_rss_gib": 0.0, "peak_anon_gib": 0.0, "start_s": t, "end_s": t})
        s["peak_rss_gib"] = max(s["peak_rss_gib"], round(rss / 2**30, 3))
        s["peak_anon_gib"] = max(s["peak_anon_gib"], round(anon / 2**30, 3))
        s["end_s"] = t
    for s in stages.values():
        s["seconds"] = round(s["end_s"] - s["start_s"], 1)
    result = {"command": command, "returncode": proc.returncode, "wall_s": round(time.time() - t0, 1),
              "every_s": every, "peak_rss_gib": max((s["peak_rss_gib"] for s in stages.values()), default=0.0),
              "peak_anon_gib": max((s["peak_anon_gib"] for s in stages.values()), default=0.0),
              "stages": stages, "samples": samples, "log": str(log_path)}
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_table(result: dict) -> str:
    rows = ["| stage | peak RSS (GiB) | of it not file-backed | seconds (sampled) |", "|---|---:|---:|---:|"]
    for name, s in result["stages"].items():
        rows.append(f"| {name} | {s['peak_rss_gib']:.2f} | {s['peak_anon_gib']:.2f} | {s['seconds']:.0f} |")
    rows.append(f"| **whole run** | **{result['peak_rss_gib']:.2f}** | {result['peak_anon_gib']:.2f} | "
                f"{result['wall_s']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON of samples and per-stage peaks")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to profile after --")
    result = profile(command, args.out, args.every)
    print(format_table(result))
    print(f"exit {result['returncode']}; samples in {args.out}, the run's stderr in {result['log']}", file=sys.stderr)
    return result["returncode"]


if __name__ == "__main__":
    raise SystemExit(main())

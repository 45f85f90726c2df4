"""Where a `hiq fit`'s host memory is, per stage (issue 26): runs the fit in this process and samples every 0.5 s
``/proc/self/status`` (RSS, anon, file-backed) and glibc's ``mallinfo2`` (heap in use, freed heap glibc keeps,
mmapped buffers), every 2 s the live CPU tensor storages reachable from Python (``PROBE_NOSCAN=1``: not). Prints
the peak sample and each stage's peak; the samples go to ``PROBE_OUT`` (default /tmp/probe.json). Linux/glibc only.

    PY=.venv/bin/python; source benchmarks/shaped_args.sh
    CANDIDATES="[0,0.05,0.2]" shaped_fit_command runs/shaped/llama-2-7b-2blk runs/shaped/probe-2blk
    .venv/bin/python benchmarks/fit_heap_probe.py "${FIT[@]:4}"      # the options after `-m hiq`
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import threading
import time

import torch

GIB = 1 << 30
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


def status() -> dict[str, float]:
    out = {}
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024 / GIB
    return out


def live_tensors() -> float:
    """GiB of CPU tensor storages that Python objects reach (each storage once; mapped file pages left out)."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in seen and storage.resizable():
                    seen.add(ptr)
                    total += storage.nbytes()
        except Exception:  # noqa: BLE001 - a tensor subclass or a freed object mid-scan: skip it
            continue
    return total / GIB


def main() -> int:
    import hiq.pipeline as P
    from hiq.cli import main as hiq_main

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    samples, stage, stop = [], ["start"], threading.Event()
    scan = not os.environ.get("PROBE_NOSCAN")

    def sampler() -> None:
        t0, k = time.time(), 0
        while not stop.is_set():
            m = libc.mallinfo2()
            rec = {"t": round(time.time() - t0, 1), "stage": stage[0], **status(), "heap_used": m.uordblks / GIB,
                   "heap_free": m.fordblks / GIB, "mmapped": m.hblkhd / GIB}
            if scan and k % 4 == 0:
                rec["tensors"] = live_tensors()
            samples.append(rec)
            k += 1
            time.sleep(0.5)

    for name, spec in P.STAGE_TABLE.items():
        def wrapped(job, options, _run=spec.run, _name=name):
            stage[0] = _name
            try:
                return _run(job, options)
            finally:
                stage[0] = _name + "-done"

        object.__setattr__(spec, "run", wrapped)  # Stage is a frozen dataclass
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    rc = hiq_main(sys.argv[1:])
    stop.set()
    thread.join()
    with open(os.environ.get("PROBE_OUT", "/tmp/probe.json"), "w") as f:
        json.dump(samples, f)
    print("peak sample", json.dumps(max(samples, key=lambda r: r["RssAnon"])))
    for name in sorted({r["stage"] for r in samples}, key=lambda n: min(r["t"] for r in samples if r["stage"] == n)):
        rows = [r for r in samples if r["stage"] == name]
        p = max(rows, key=lambda r: r["RssAnon"])
        tensors = max(r.get("tensors", 0) for r in rows)
        print(f"{name:22s} peak anon {p['RssAnon']:.2f} rss {p['VmRSS']:.2f} heap_used {p['heap_used']:.2f} "
              f"heap_free {p['heap_free']:.2f} mmapped {p['mmapped']:.2f} tensors {tensors:.2f} GiB")
    return rc


if __name__ == "__main__":
    sys.exit(main())

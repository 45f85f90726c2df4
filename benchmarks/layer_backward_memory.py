"""Peak host memory and time of one hybrid layer's forward + backward at 7B width, the fake-quantized weight
recomputed in the backward as one piece and in chunks of rows (``HybridLinear.recompute_rows_of``), side by side in
one run (issue 26). Random weights: memory and time only.

    python benchmarks/layer_backward_memory.py                 # 11008 x 4096 (LLaMA-2-7B gate/up), 512 tokens
    python benchmarks/layer_backward_memory.py --shape 4096 11008 --tokens 2048

Each measurement runs in its own process. Memory: with ``MALLOC_MMAP_THRESHOLD_=65536`` (large buffers come from and go
back to the kernel, so the high-water mark is what was live), ``VmHWM`` after resetting it just before the step.
Time: a second process with the allocator as a run has it (the forced mmaps above make every buffer page-fault anew,
which slows the many chunk-sized buffers most), the median of three steps after the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
from torch import nn
from hiq.quant.hybrid import HybridLinear
out_f, in_f, tokens, rows_of = (int(a) for a in sys.argv[1:5])
quantizers = sys.argv[5]
torch.manual_seed(0)
lin = nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
high, normal = quantizers.split("+")
h = HybridLinear(lin, torch.rand(in_f), 0.05, 3, 2, None, high, 4.0, normal)
del lin
h.recompute_rows_of = rows_of
x = torch.randn(tokens, in_f, dtype=torch.bfloat16, requires_grad=True)
def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
(h(x).float().pow(2).sum()).backward()  # warm-up (allocator, kernels)
for p in h.parameters():
    p.grad = None
x.grad = None
open("/proc/self/clear_refs", "w").write("5")
base = hwm()
(h(x).float().pow(2).sum()).backward()
peak = hwm() - base
times = []
for _ in range(3):  # the time: the median of three more steps
    for p in h.parameters():
        p.grad = None
    t0 = time.perf_counter()
    (h(x).float().pow(2).sum()).backward()
    times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": sorted(times)[1], "peak_over_base": peak}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=(11008, 4096), metavar=("OUT", "IN"))
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--quantizers", default="signround+signround", help="high+normal (default: the W2 configs')")
    p.add_argument("--chunks", type=int, nargs="*", default=[], help="more chunk sizes (weights) to compare")
    args = p.parse_args()
    out_f, in_f = args.shape
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    time_env = {**os.environ, "PYTHONPATH": root}
    memory_env = {**time_env, "MALLOC_MMAP_THRESHOLD_": "65536"}
    from hiq.quant.hybrid import HybridLinear

    rows = [("whole weight", 1 << 62), (f"chunks of {HybridLinear.recompute_rows_of} weights (default)",
                                        HybridLinear.recompute_rows_of)]
    rows += [(f"chunks of {n} weights", n) for n in args.chunks]
    print(f"one {out_f} x {in_f} hybrid layer ({out_f * in_f / 1e6:.1f} M weights, bf16, ratio 0.05, "
          f"{args.quantizers}), {args.tokens} tokens, forward + backward, {time.strftime('%Y-%m-%d')}\n")
    print("| recomputed in the backward | peak over base MiB | bytes per weight | seconds |")
    print("|---|---:|---:|---:|")
    for label, rows_of in rows:
        r = {}
        for key, child_env in (("peak_over_base", memory_env), ("seconds", time_env)):
            out = subprocess.run([sys.executable, "-c", CHILD, str(out_f), str(in_f), str(args.tokens), str(rows_of),
                                  args.quantizers], capture_output=True, text=True, env=child_env, check=True)
            r[key] = json.loads(out.stdout.strip().splitlines()[-1])[key]
        print(f"| {label} | {r['peak_over_base'] / 2**20:.0f} | {r['peak_over_base'] / (out_f * in_f):.1f} | "
              f"{r['seconds']:.2f} |")


if __name__ == "__main__":
    main()

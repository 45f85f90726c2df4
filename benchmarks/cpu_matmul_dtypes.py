"""GFLOP/s of the three matrix products of a linear layer's forward and backward, float32 vs bf16, on this CPU.

    OMP_NUM_THREADS=1 python benchmarks/cpu_matmul_dtypes.py [--tokens 128] [--width 4096] [--threads 1]

Why (issue 26): PyTorch's CPU bf16 products fall back to plain loops on CPUs without AVX-512; the backward's
``grad @ W`` is the worst case. ``hiq.model.linear`` computes bf16/fp16 linears on the CPU in float32 for this reason.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def rate(fn, flops: float, repeat: int = 2) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return flops * repeat / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, d = args.tokens, args.width
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(n, d, generator=g), torch.randn(d, d, generator=g), torch.randn(n, d, generator=g))
    flops = 2.0 * n * d * d
    print(f"| product ({n} x {d}) x ({d} x {d}), {args.threads} thread(s) | float32 GFLOP/s | bf16 GFLOP/s |")
    print("|---|---:|---:|")
    cases = {"forward `F.linear(x, W)`": lambda a, b, c: F.linear(a, b),
             "backward input `grad @ W`": lambda a, b, c: c @ b,
             "backward weight `grad.T @ x`": lambda a, b, c: c.t() @ a}
    typed = {t: tuple(v.to(t) for v in (x, w, dy)) for t in (torch.float32, torch.bfloat16)}
    for name, op in cases.items():
        row = [rate(lambda t=t, op=op: op(*typed[t]), flops, repeat=1 if t == torch.bfloat16 else 2) for t in typed]
        print(f"| {name} | {row[0]:.1f} | {row[1]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

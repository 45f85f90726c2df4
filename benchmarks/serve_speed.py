#!/usr/bin/env python
"""How fast a packed hiq model runs: the int4 kernel path against the dequantising path and dense bf16 / fp32.

All rows come from one process, one after the other; run it with nothing else on the machine.

(a) ``block``: one LLaMA-2-7B-shaped decoder block's linears (q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down
    4096 x 11008), random weights quantized W2/3 with 10 % high-impact columns per layer (SignRound's initial state
    = round to nearest; speed and memory only), per-channel and g128. Time of the seven matmuls at 1 and 256
    tokens: ``hiq`` (the path PackedLinear picks: int4 kernel for <= KERNEL_MAX_TOKENS tokens, float32
    dequant-GEMM above), ``kernel`` (the int4 kernel at any size), ``dequantising`` (the path before the kernel:
    the float weight rebuilt from the bit-packed codes at every call), dense bf16 and dense fp32. Resident bytes of
    the packed layers in memory vs their fp16 bytes.
(b) ``decode``: greedy decoding tokens/s (KV cache, 32 new tokens after a 16-token prompt) and the resident bytes
    of the block linears, whole models: a random-weight LLaMA of width 2048 (speed only) and the bundled model,
    each packed W2/3 per-channel (10 % high-impact columns) and loaded as users load it (``from_pretrained``), in
    bf16 (the kernel path) and fp32 (the exact path), against the same model dense in bf16 and fp32.

    python benchmarks/serve_speed.py [--out benchmarks/results/serve_speed.md] [--tokens 1 256]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

BLOCK_SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def _time(fn, min_seconds: float = 1.0, min_repeats: int = 3) -> float:
    """Median seconds per call (one warm-up call first)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def packed_layer(linear: nn.Linear, ratio: float, group_size: int | None, seed: int):
    """A PackedLinear (as loaded, bit-packed buffers) of ``linear`` quantized W2/3 without calibration."""
    from hiq.packed import PackedLinear, layer_geometry, pack_layer
    from hiq.quant.hybrid import HybridLinear

    scores = torch.rand(linear.in_features, generator=torch.Generator().manual_seed(seed))
    record = HybridLinear(linear, scores, ratio, 3, 2, group_size, high_quantizer="signround",
                          normal_quantizer="signround").finish()
    layer = PackedLinear(layer_geometry(record, False))
    for key, value in pack_layer(record).items():
        getattr(layer, key).copy_(value)
    return layer


def block_rows(token_counts: list[int], group_size: int | None) -> list[dict]:
    from hiq import kernels

    torch.manual_seed(0)
    dense32, packed, slow = {}, {}, {}
    for i, (name, (out, inp)) in enumerate(BLOCK_SHAPES.items()):
        lin = nn.Linear(inp, out, bias=False)
        nn.init.normal_(lin.weight, std=0.02)
        dense32[name] = lin.weight.detach().clone()
        with torch.no_grad():
            slow[name] = packed_layer(lin, 0.1, group_size, i)
        packed[name] = copy.deepcopy(slow[name])
        assert packed[name].prepare_kernel() is None
        del lin
    dense16 = {n: w.bfloat16() for n, w in dense32.items()}
    fp16_bytes = sum(w.numel() * 2 for w in dense32.values())
    resident = sum(m.resident_bytes() for m in packed.values())
    file_bytes = sum(m.resident_bytes() for m in slow.values())
    rows = []
    for tokens in token_counts:
        x32 = {n: torch.randn(tokens, w.shape[1]) for n, w in dense32.items()}
        x16 = {n: x.bfloat16() for n, x in x32.items()}
        with torch.no_grad():
            paths = {
                "hiq (bf16 activations)": lambda x16=x16: [packed[n](x16[n]) for n in packed],
                "int4 kernel only": lambda x16=x16: [packed[n](x16[n], mode="kernel") for n in packed],
                "dequantising (before)": lambda x16=x16: [slow[n](x16[n]) for n in slow],
                "dense bf16": lambda x16=x16: [x16[n] @ w.T for n, w in dense16.items()],
                "dense fp32": lambda x32=x32: [x32[n] @ w.T for n, w in dense32.items()],
            }
            times = {}
            for label, fn in paths.items():
                slow_path = "dequantising" in label   # seconds per call: two calls are enough
                times[label] = _time(fn, min_seconds=0.0 if slow_path else 1.0, min_repeats=2 if slow_path else 3)
                print(f"  block {group_size or 'per-channel'} {tokens} tok {label}: {times[label] * 1e3:.1f} ms",
                      file=sys.stderr, flush=True)
        best_dense = min(times["dense bf16"], times["dense fp32"])
        rows.append({"group": "g" + str(group_size) if group_size else "per-channel", "tokens": tokens,
                     **{k: v * 1e3 for k, v in times.items()},
                     "hiq_vs_best_dense": best_dense / times["hiq (bf16 activations)"]})
    return rows, {"fp16_bytes": fp16_bytes, "resident": resident, "file_layout": file_bytes,
                  "kernel_max_tokens": kernels.KERNEL_MAX_TOKENS}


def _greedy_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    def run():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
    return new_tokens / _time(run, min_seconds=2.0, min_repeats=2)


def decode_rows(workdir: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hiq.layouts import layout_for
    from hiq.model import load_model_and_tokenizer
    from hiq.packed import PackedLinear, save_packed
    from hiq.quant.hybrid import HybridLinear

    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(hidden_size=2048, intermediate_size=5504, num_attention_heads=16,
                                        num_key_value_heads=16, num_hidden_layers=4, vocab_size=2048,
                                        max_position_embeddings=512, dtype="float16")).eval()
    bundled, _ = load_model_and_tokenizer("tiny-llama", "float32")
    rows = []
    for label, model in (("random LLaMA 2048 wide, 4 blocks (speed only)", wide), ("bundled tiny LLaMA", bundled)):
        model = model.float()
        src = workdir / f"src-{len(rows)}"
        model.to(torch.float16).save_pretrained(src)
        model = model.float()
        model.name_or_path = str(src)
        records = {}
        with torch.no_grad():
            for i, (name, lin) in enumerate(layout_for(model).linears_of(model)):
                scores = torch.rand(lin.in_features, generator=torch.Generator().manual_seed(i))
                records[name] = HybridLinear(lin, scores, 0.1, 3, 2, None, high_quantizer="signround",
                                             normal_quantizer="signround").finish()
        out = save_packed(model, records, workdir / f"packed-{len(rows)}")
        prompt = torch.randint(2, 2000, (1, 16), generator=torch.Generator().manual_seed(0))
        linear_fp16 = sum(m.weight.numel() * 2 for _, m in layout_for(model).linears_of(model))
        del model
        gc.collect()
        for dtype in (torch.bfloat16, torch.float32):
            dense = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
            packed = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
            resident = sum(m.resident_bytes() for m in packed.modules() if isinstance(m, PackedLinear))
            # float32 packed runs the exact path (the float weight rebuilt per call): 8 tokens are enough to time
            new_tokens = 32 if dtype == torch.bfloat16 else 8
            with torch.no_grad():
                tps_dense = _greedy_tokens_per_s(dense, prompt, new_tokens)
                tps_packed = _greedy_tokens_per_s(packed, prompt, new_tokens)
            name = str(dtype).removeprefix("torch.")
            print(f"  decode {label} {name}: dense {tps_dense:.1f} tok/s, packed {tps_packed:.1f} tok/s",
                  file=sys.stderr, flush=True)
            rows.append({"model": label, "dtype": name, "dense_tps": tps_dense, "packed_tps": tps_packed,
                         "linear_fp16_bytes": linear_fp16, "linear_resident": resident})
            del dense, packed
            gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/serve_speed.md")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)
    lines = ["# Serving speed of packed hiq models (`python benchmarks/serve_speed.py`)", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}; all rows in one process, nothing else "
             f"running. Times in ms (median), lower is better.", ""]
    lines += ["## (a) One LLaMA-2-7B-shaped block's seven linears, W2/3 with 10 % high-impact columns "
              "(random weights: speed and memory only)", "",
              "| grouping | tokens | hiq | int4 kernel only | dequantising (before) | dense bf16 | dense fp32 | "
              "hiq speed-up over the faster dense |", "|---|---|---|---|---|---|---|---|"]
    memory = []
    for group_size in (None, 128):
        rows, mem = block_rows(args.tokens, group_size)
        memory.append((group_size, mem))
        for r in rows:
            lines.append(f"| {r['group']} | {r['tokens']} | {r['hiq (bf16 activations)']:.1f} | "
                         f"{r['int4 kernel only']:.1f} | {r['dequantising (before)']:.1f} | {r['dense bf16']:.1f} | "
                         f"{r['dense fp32']:.1f} | {r['hiq_vs_best_dense']:.2f}x |")
        gc.collect()
    lines += ["", f"`hiq` = the path PackedLinear picks for bf16 activations: the int4 kernel for at most "
              f"{memory[0][1]['kernel_max_tokens']} tokens, float32 dequant-GEMM above.", "",
              "| grouping | fp16 bytes of the 7 linears | packed, in memory (kernel layout) | packed, bit-packed "
              "file layout | in memory / fp16 |", "|---|---|---|---|---|"]
    for group_size, mem in memory:
        lines.append(f"| {'g' + str(group_size) if group_size else 'per-channel'} | {mem['fp16_bytes'] / 2**20:.1f} "
                     f"MiB | {mem['resident'] / 2**20:.1f} MiB | {mem['file_layout'] / 2**20:.1f} MiB | "
                     f"{mem['resident'] / mem['fp16_bytes']:.3f}x |")
    if not args.skip_decode:
        with tempfile.TemporaryDirectory() as tmp:
            decode = decode_rows(Path(tmp))
        lines += ["", "## (b) Greedy decoding, whole models (32 new tokens after 16 in bf16, 8 in fp32; KV cache), "
                  "loaded with `from_pretrained`", "",
                  "| model | dtype | dense tokens/s | packed tokens/s | packed / dense | block linears in memory, "
                  "packed / fp16 |", "|---|---|---|---|---|---|"]
        for r in decode:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['dense_tps']:.1f} | {r['packed_tps']:.1f} | "
                         f"{r['packed_tps'] / r['dense_tps']:.2f}x | "
                         f"{r['linear_resident'] / r['linear_fp16_bytes']:.3f}x |")
        lines += ["", "bf16: the kernel path (decode) and dequant-GEMM (the prompt). float32: the exact path (the "
                  "float weight rebuilt per call, bit for bit the dequantised model)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

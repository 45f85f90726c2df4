#!/usr/bin/env python
"""The packed checkpoint against the fp16 original: size, equality, memory and speed, on two shapes.

Shapes:
  bundled  a finished ``hiq fit`` run on the bundled model (``--run``; its ``packed/`` and ``model/``, written by
           the export stage or ``hiq export``), against the bundled fp16 checkpoint
  7b-block a synthetic LLaMA-7B-shaped model with one block (hidden 4096, MLP 11008, 32 heads, vocab 256) and random
           weights, quantized here without calibration (SignRound's initial state = round-to-nearest, a fixed
           share of high-impact columns per layer at W2/3 per-channel); random weights are fine for size, memory
           and speed, not for accuracy

Rows:
  size      bytes of the packed block linears vs (storage avg bits / 16) x their fp16 bytes (+2 % allowed), and
            the whole checkpoint next to the fp16 one
  equality  bundled only: max |logits(packed) - logits(dequantised model/)| (both in float32) and WikiText-2
            perplexity of the packed model vs ``metrics.json``
  memory    resident memory (VmRSS) of a fresh process that loads the checkpoint and runs one forward (512
            tokens), fp16 vs packed, counted from its RSS after importing torch + transformers + hiq; and the
            process's peak RSS (which the imports' transient peak can dominate)
  speed     tokens/s of a 512-token prefill and of greedy decoding (32 tokens after a 32-token prompt, KV cache),
            fp16 vs packed, in one process one after the other (``--compute-dtype``, default float32: CPU matmuls
            in fp16 are slow on most CPUs; both models compute in that dtype), and where a packed forward's time
            goes (one layer)

Timings are only meaningful with nothing else running on the machine.

    python benchmarks/packed_report.py --run runs/demo [--shapes bundled 7b-block] [--out runs/packed_report]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = ("bundled", "7b-block")


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def build_7b_block(out: Path, ratio: float = 0.1) -> tuple[Path, Path]:
    """fp16 checkpoint and packed checkpoint of a one-block LLaMA-7B-shaped model (random weights)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hiq.layouts import layout_for
    from hiq.model import BUNDLED_MODELS
    from hiq.packed import save_packed
    from hiq.quant.hybrid import HybridLinear

    fp16_dir, packed_dir = out / "fp16", out / "packed"
    if (fp16_dir / "config.json").is_file() and (packed_dir / "config.json").is_file():
        return fp16_dir, packed_dir
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=1, vocab_size=256, max_position_embeddings=1024, dtype="float16")
    model = LlamaForCausalLM(config).eval()
    model.half().save_pretrained(fp16_dir)
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODELS["tiny-llama"])
    model = model.float()
    model.name_or_path = str(fp16_dir)
    records = {}
    for name, lin in layout_for(model).linears_of(model):
        scores = torch.rand(lin.in_features)
        records[name] = HybridLinear(lin, scores, ratio, 3, 2, None, high_quantizer="signround",
                                     normal_quantizer="signround").finish()
    save_packed(model, records, packed_dir, tokenizer=tokenizer, info={"setting": f"W2/3 per-channel, {ratio}"})
    tokenizer.save_pretrained(fp16_dir)
    return fp16_dir, packed_dir


def size_rows(fp16_dir: Path, packed_dir: Path) -> dict:
    from safetensors import safe_open

    config = json.loads((packed_dir / "config.json").read_text())["quantization_config"]
    layers = config["layers"]
    packed_bytes = storage_bits = fp16_bytes = 0
    with safe_open(str(packed_dir / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.rpartition(".")[0] in layers and not key.endswith(".bias"):
                t = f.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                packed_bytes += n * {"U8": 1, "I16": 2, "I32": 4, "F16": 2}[t.get_dtype()]
    for g in layers.values():
        out, inp, nh = g["out_features"], g["in_features"], g["n_high"]
        fp16_bytes += out * inp * 2
        for width, bits in ((nh, g["bits_high"]), (inp - nh, g["bits_low"])):
            if width:
                groups = 1 if g["group_size"] is None else -(-width // g["group_size"])
                storage_bits += out * width * bits + out * groups * (16 + bits)
    avg_storage = storage_bits / (fp16_bytes / 2)
    bound = avg_storage / 16 * fp16_bytes * 1.02
    total = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    return {"block_linears_packed_bytes": packed_bytes, "block_linears_fp16_bytes": fp16_bytes,
            "storage_avg_bits": avg_storage, "bound_bytes": bound, "within_bound": packed_bytes <= bound,
            "checkpoint_packed_bytes": total(packed_dir), "checkpoint_fp16_bytes": total(fp16_dir)}


MEMORY_CHILD = r"""
import json, resource, sys, torch
import hiq, transformers

def rss():  # current resident memory, MiB
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

base = rss()
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
loaded = rss()
x = torch.randint(0, m.config.vocab_size, (1, 512))
with torch.no_grad():
    m(x)
print(json.dumps({"import_mb": base, "after_load_mb": loaded, "after_forward_mb": rss(), "peak_mb": peak()}))
"""


def memory(path: Path, dtype: str) -> dict:
    res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path), dtype], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode:
        raise SystemExit(f"memory child failed for {path}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def speed(fp16_dir: Path, packed_dir: Path, dtype: torch.dtype, repeats: int, new_tokens: int = 32) -> dict:
    from transformers import AutoModelForCausalLM

    models = {"fp16": AutoModelForCausalLM.from_pretrained(fp16_dir, dtype=dtype).eval(),
              "packed": AutoModelForCausalLM.from_pretrained(packed_dir, dtype=dtype).eval()}
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, models["fp16"].config.vocab_size, (1, 512), generator=gen)
    out: dict = {}
    with torch.no_grad():
        for name, m in models.items():
            m(prompt[:, :16])  # warm-up
            prefill = _median_time(lambda m=m: m(prompt), repeats)
            def decode(m=m, short=prompt[:, :32]):
                m.generate(short, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)

            decode_s = _median_time(decode, max(1, repeats // 2))
            out[name] = {"prefill_tok_s": 512 / prefill, "decode_tok_s": new_tokens / decode_s}
    return out


def time_breakdown(packed_dir: Path, dtype: torch.dtype, repeats: int) -> dict:
    """Where one packed forward of the largest layer goes: unpacking, dequantising, re-ordering, matmul."""
    from transformers import AutoModelForCausalLM

    from hiq.packed import PackedLinear, _part_widths
    from hiq.quant.packing import unpack_codes

    model = AutoModelForCausalLM.from_pretrained(packed_dir, dtype=dtype)
    layer = max((m for m in model.modules() if isinstance(m, PackedLinear)),
                key=lambda m: m.in_features * m.out_features)
    x = torch.randn(1, 512, layer.in_features, dtype=dtype)
    w = layer.dequantized_weight(dtype)
    parts = [(p, wd, b) for p, (wd, b) in _part_widths(layer.geometry).items() if wd]

    def unpack():
        for p, wd, b in parts:
            unpack_codes(getattr(layer, f"{p}_codes"), b, layer.out_features * wd)

    with torch.no_grad():
        t_unpack = _median_time(unpack, repeats)
        t_weight = _median_time(lambda: layer.dequantized_weight(dtype), repeats)
        t_matmul512 = _median_time(lambda: torch.nn.functional.linear(x, w), repeats)
        t_matmul1 = _median_time(lambda: torch.nn.functional.linear(x[:, :1], w), repeats)
    return {"layer": f"{layer.out_features}x{layer.in_features}", "unpack_ms": t_unpack * 1e3,
            "dequantized_weight_ms": t_weight * 1e3, "matmul_512_ms": t_matmul512 * 1e3,
            "matmul_1_ms": t_matmul1 * 1e3}


def equality(run: Path, windows_max: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hiq.data import eval_windows, load_text, tokenize_text
    from hiq.perplexity import evaluate_dataset

    metrics = json.loads((run / "metrics.json").read_text())
    dq = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    pk = AutoModelForCausalLM.from_pretrained(run / "packed", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(run / "packed")
    info = metrics["eval"]["wikitext2"]
    seqlen = info["tokens_scored"] // info["windows"] + 1
    windows = eval_windows(tokenize_text(tok, load_text("wikitext2", "test")), seqlen, windows_max)
    with torch.no_grad():
        diff = max(float((dq(w[None]).logits - pk(w[None]).logits).abs().max()) for w in windows)
    ppl = evaluate_dataset(pk, tok, "wikitext2", seqlen=seqlen, max_windows=info["windows"]).ppl
    return {"max_abs_logit_diff": diff, "packed_wikitext2_ppl": ppl, "metrics_wikitext2_ppl": metrics["wikitext2_ppl"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="finished hiq fit run with packed/ and model/ exported")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    p.add_argument("--out", default="runs/packed_report")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], choices=["size", "equality", "memory", "speed"])
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.compute_dtype)
    report: dict = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "compute_dtype": args.compute_dtype}
    for shape in args.shapes:
        if shape == "bundled":
            run = Path(args.run)
            if not (run / "packed" / "config.json").is_file():
                raise SystemExit(f"{run}/packed is missing: run `hiq fit` with export on (or `hiq export {run}`)")
            # the run's own source model (metrics.json / run.json name it), not always the bundled one
            source = None
            for name in ("metrics.json", "run.json"):
                if (run / name).is_file():
                    source = json.loads((run / name).read_text()).get("model") or source
            from hiq.model import resolve_model_path

            fp16_dir, packed_dir = resolve_model_path(source or "tiny-llama"), run / "packed"
        else:
            fp16_dir, packed_dir = build_7b_block(out / "7b-block")
        row: dict = {"fp16_dir": str(fp16_dir), "packed_dir": str(packed_dir)}
        print(f"== {shape}", file=sys.stderr, flush=True)
        if "size" not in args.skip:
            row["size"] = size_rows(Path(fp16_dir), packed_dir)
        if shape == "bundled" and "equality" not in args.skip:
            row["equality"] = equality(Path(args.run), 4)
        if "memory" not in args.skip:
            row["memory"] = {"fp16": memory(Path(fp16_dir), "float16"), "packed": memory(packed_dir, "float16")}
        if "speed" not in args.skip:
            row["speed"] = speed(Path(fp16_dir), packed_dir, dtype, args.repeats)
            row["breakdown"] = time_breakdown(packed_dir, dtype, args.repeats)
        report[shape] = row
        (out / "report.json").write_text(json.dumps(report, indent=2))
    print_tables(report)
    return 0


def print_tables(report: dict) -> None:
    shapes = [s for s in SHAPES if s in report]
    print("| shape | packed block linears | bound ((storage bits/16) x fp16 + 2 %) | storage avg bits | "
          "checkpoint packed | checkpoint fp16 |")
    print("|---|---|---|---|---|---|")
    for s in shapes:
        z = report[s].get("size")
        if z:
            print(f"| {s} | {_mb(z['block_linears_packed_bytes'])} | {_mb(z['bound_bytes'])} "
                  f"({'within' if z['within_bound'] else 'OVER'}) | {z['storage_avg_bits']:.3f} | "
                  f"{_mb(z['checkpoint_packed_bytes'])} | {_mb(z['checkpoint_fp16_bytes'])} |")
    for s in shapes:
        e = report[s].get("equality")
        if e:
            print(f"\n{s}: max |logit diff| packed vs dequantised {e['max_abs_logit_diff']:.3g}; WikiText-2 ppl "
                  f"packed {e['packed_wikitext2_ppl']:.4f} vs metrics.json {e['metrics_wikitext2_ppl']:.4f}")
    print("\n| shape | RSS after imports | + load: fp16 | packed | + one forward (512 tok): fp16 | packed | "
          "process peak: fp16 | packed |")
    print("|---|---|---|---|---|---|---|---|")
    for s in shapes:
        m = report[s].get("memory")
        if m:
            a, b = m["fp16"], m["packed"]
            print(f"| {s} | {a['import_mb']:.0f} / {b['import_mb']:.0f} MiB | "
                  f"{a['after_load_mb'] - a['import_mb']:.0f} MiB | {b['after_load_mb'] - b['import_mb']:.0f} MiB | "
                  f"{a['after_forward_mb'] - a['import_mb']:.0f} MiB | "
                  f"{b['after_forward_mb'] - b['import_mb']:.0f} MiB | {a['peak_mb']:.0f} MiB | "
                  f"{b['peak_mb']:.0f} MiB |")
    print("\n| shape | prefill 512 tok/s: fp16 | packed | packed / fp16 | decode tok/s: fp16 | packed | "
          f"packed / fp16 |  (compute dtype {report['compute_dtype']}, {report['torch_threads']} threads)")
    print("|---|---|---|---|---|---|---|")
    for s in shapes:
        v = report[s].get("speed")
        if v:
            a, b = v["fp16"], v["packed"]
            print(f"| {s} | {a['prefill_tok_s']:.0f} | {b['prefill_tok_s']:.0f} | "
                  f"{b['prefill_tok_s'] / a['prefill_tok_s']:.2f} | {a['decode_tok_s']:.1f} | "
                  f"{b['decode_tok_s']:.1f} | {b['decode_tok_s'] / a['decode_tok_s']:.2f} |")
    for s in shapes:
        d = report[s].get("breakdown")
        if d:
            print(f"\n{s}, one packed forward of the {d['layer']} layer: unpack codes {d['unpack_ms']:.1f} ms, whole "
                  f"dequantised weight (unpack + scale + reorder) {d['dequantized_weight_ms']:.1f} ms, matmul 512 "
                  f"tokens {d['matmul_512_ms']:.1f} ms, matmul 1 token {d['matmul_1_ms']:.2f} ms")


if __name__ == "__main__":
    raise SystemExit(main())

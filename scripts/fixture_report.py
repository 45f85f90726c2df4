#!/usr/bin/env python
"""Measure the bundled fixture model the way its model card reports it.

Rows (WikiText-2 test and the C4 sample, protocol of ``hiq.perplexity``, seqlen = model context):
FP, all blocks skipped (embeddings -> final norm -> head), RTN W3 / W2 per-channel, and a unigram model
on the same tokenizer fitted on the training corpus (add-one smoothing), scored on exactly the tokens the
windowed evaluation predicts. Writes ``<model>/report.json`` and prints a markdown table.

    python scripts/fixture_report.py --corpus ../shared/data/wikipedia-2019-en/wikitext-style/*.txt
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from hiq.data import eval_windows, load_text, tokenize_text
from hiq.model import find_blocks, load_model_and_tokenizer, resolve_model_path
from hiq.perplexity import C4_MAX_WINDOWS, perplexity
from hiq.quant import QuantSpec
from hiq.quant.rtn import quantize_model_rtn


class SkippedBlock(nn.Module):
    """Stands in for a decoder block and returns its input hidden states unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def skip_all_blocks(model: nn.Module) -> nn.Module:
    blocks = find_blocks(model)
    for i in range(len(blocks)):
        blocks[i] = SkippedBlock()
    return model


def unigram_ppl(counts: torch.Tensor, windows: torch.Tensor) -> float:
    probs = (counts.double() + 1) / (counts.sum().double() + counts.numel())
    targets = windows[:, 1:].reshape(-1)
    return math.exp(-probs.log()[targets].mean().item())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--corpus", nargs="*", default=[], help="training corpus files for the unigram baseline")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    model, tok = load_model_and_tokenizer(args.model)
    seqlen = model.config.max_position_embeddings
    sets = {
        "wikitext2": eval_windows(tokenize_text(tok, load_text("wikitext2", "test")), seqlen),
        "c4": eval_windows(tokenize_text(tok, load_text("c4", "validation")), seqlen, C4_MAX_WINDOWS),
    }
    variants = {
        "FP (fp16 weights, fp32 compute)": lambda m: m,
        "all blocks skipped": skip_all_blocks,
        "RTN W3 per-channel": lambda m: (quantize_model_rtn(m, QuantSpec(3)), m)[1],
        "RTN W2 per-channel": lambda m: (quantize_model_rtn(m, QuantSpec(2)), m)[1],
    }
    rows = {}
    for label, make in variants.items():
        t0 = time.time()
        m = make(copy.deepcopy(model))
        rows[label] = {name: perplexity(m, w, batch_size=args.batch_size) for name, w in sets.items()}
        print(f"{label}: {rows[label]} ({time.time() - t0:.0f}s)", flush=True)
    if args.corpus:
        counts = torch.zeros(len(tok), dtype=torch.long)
        for path in args.corpus:
            with open(path, encoding="utf-8") as f:
                ids = tok(f.read(), add_special_tokens=False, verbose=False)["input_ids"]
            counts += torch.bincount(torch.tensor(ids), minlength=len(tok))
        rows["unigram (same tokenizer, training corpus)"] = {n: unigram_ppl(counts, w) for n, w in sets.items()}
    fp = rows["FP (fp16 weights, fp32 compute)"]
    report = {
        "model": args.model,
        "seqlen": seqlen,
        "windows": {n: int(w.shape[0]) for n, w in sets.items()},
        "rows": rows,
        "ratios_to_fp": {k: {n: v[n] / fp[n] for n in v} for k, v in rows.items()},
    }
    model_dir = Path(resolve_model_path(args.model))
    out = model_dir / "report.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = ["| model | WikiText-2 test ppl | x FP | C4-sample ppl | x FP |", "|---|---|---|---|---|"]
    for k, v in rows.items():
        r = report["ratios_to_fp"][k]
        table.append(f"| {k} | {v['wikitext2']:.2f} | {r['wikitext2']:.2f} | {v['c4']:.2f} | {r['c4']:.2f} |")
    print("\n" + "\n".join(table))
    if (model_dir / "training_log.json").is_file():
        card = model_card(json.loads((model_dir / "training_log.json").read_text()), report, table)
        (model_dir / "README.md").write_text(card)
        print(f"model card written to {model_dir / 'README.md'}")
    print(f"\nwritten to {out}")
    return 0


def model_card(log: dict, report: dict, table: list[str]) -> str:
    a = log["args"]
    probes = ["| step | tokens seen | train loss | valid ppl (FP) | RTN W3 pc | RTN W2 pc |", "|---|---|---|---|---|---|"]
    for h in log["history"]:
        probes.append(f"| {h['step']} | {h['tokens'] / 1e6:.1f}M | {h['train_loss']:.3f} | {h['fp']:.2f} | "
                      f"{h['rtn_w3']:.2f} ({h['rtn_w3'] / h['fp']:.2f}x) | {h['rtn_w2']:.2f} ({h['rtn_w2'] / h['fp']:.2f}x) |")
    return f"""# tiny-llama: the bundled fixture model of hiq

A `LlamaForCausalLM` trained from scratch on CPU, with its own byte-level BPE tokenizer, so that every hiq
config runs offline on a model that really learnt English. Not for any use beyond testing quantization.

| | |
|---|---|
| architecture | LLaMA blocks (q,k,v,o,gate,up,down; RMSNorm; RoPE; SwiGLU; untied head), {a['layers']} layers, hidden {a['hidden']}, {a['heads']} heads, FFN {a['ffn']}, context {a['seqlen']} |
| parameters | {log['parameters']:,} ({log['block_parameters']:,} in the blocks' linears and norms) |
| tokenizer | byte-level BPE (`tokenizers`), vocabulary {a['vocab_size']}, trained on the training corpus; one BOS per encoded text |
| training data | `wikipedia-2019-en/wikitext-style` (5,890 English Wikipedia articles, July 2019, CC BY-SA 3.0; WikiText-2 valid/test articles removed), {log['train_stream_tokens']:,} tokens |
| validation | WikiText-2 valid (raw) |
| optimiser | AdamW (0.9, 0.95), lr {a['lr']} peak, {a['warmup']} warm-up steps, cosine to {a['min_lr_ratio']}x, weight decay {a['weight_decay']}, grad clip 1.0, init std {a['init_std']} |
| batch | {a['batch_size']} x {a['seqlen']} tokens, random windows of the token stream |
| steps / tokens seen | {log['steps']:,} / {log['tokens_seen'] / 1e6:.1f}M ({log['tokens_seen'] / log['block_parameters']:.1f} tokens per block parameter) |
| precision | bf16 autocast on CPU, fp32 master weights; saved as fp16 safetensors |
| seed | {a['seed']} |
| training time | {log['train_minutes']:.1f} min training loop ({log['total_minutes']:.1f} min with tokenizer and data), 2 CPU cores, torch {log['torch']} |

Recipe (from the repository root; the corpus is not committed):

```bash
.venv/bin/python scripts/{log['recipe'].replace('/work/shared/', '../shared/')}
```

## Measured (seqlen {report['seqlen']}, GPTQ/OmniQuant protocol; C4 = bundled 1,100-document sample, not the standard shard)

{chr(10).join(table)}

`python scripts/fixture_report.py --corpus <the training corpus files>` reproduces this table
(windows: WikiText-2 {report['windows']['wikitext2']}, C4 sample {report['windows']['c4']}).

## Sensitivity to quantization during training (WikiText-2 valid, first {a['eval_windows']} windows, bf16 autocast)

{chr(10).join(probes)}
"""


if __name__ == "__main__":
    raise SystemExit(main())

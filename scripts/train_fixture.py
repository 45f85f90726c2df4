#!/usr/bin/env python
"""Train the bundled fixture model: a tiny LlamaForCausalLM with its own byte-level BPE tokenizer.

Recipe (every choice is an argument; the defaults are what produced ``hiq/assets/tiny-llama``):

1. Train a byte-level BPE tokenizer (``tokenizers``) on the training corpus.
2. Tokenise the corpus once into one stream of token ids (each file read as text, no BOS inside).
3. Train ``LlamaForCausalLM`` from scratch on random ``seqlen`` windows of that stream with AdamW,
   linear warm-up then cosine decay, bf16 autocast on CPU (fp32 master weights), for a wall-clock
   budget: after ``--calibrate-steps`` steps the total step count is fixed from the measured speed
   (with ``--max-steps 0``; a fixed ``--max-steps`` reproduces a run exactly).
4. Every ``--eval-every`` steps: WikiText-2 *valid* perplexity on the first windows, and the same with
   every block linear fake-quantised by RTN W3 / W2 per-channel, so the log shows how sensitive to
   quantization the model is becoming.
5. Save with ``save_pretrained`` (safetensors, fp16) plus the tokenizer and ``training_log.json``.

The corpus (``../shared/data/wikipedia-2019-en/wikitext-style/*.txt``, 16M words) is not committed;
the paths are arguments. Never train on WikiText-2 test.

The committed model (``hiq/assets/tiny-llama``, its card has the measurements) was made with::

    .venv/bin/python scripts/train_fixture.py \
        --corpus ../shared/data/wikipedia-2019-en/wikitext-style/*.txt \
        --valid ../shared/data/wikitext-2-raw/wiki.valid.raw --out hiq/assets/tiny-llama \
        --vocab-size 2048 --hidden 128 --layers 8 --heads 4 --ffn 384 --batch-size 8 --max-steps 4400 \
        --lr 3e-3 --weight-decay 0 --min-lr-ratio 0.01 --eval-every 500 --seed 0

(56 min on 2 cores; these are also the defaults.) Then ``python scripts/fixture_report.py --corpus ...``
measures it and writes its model card.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_tokenizer(files: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    bos = tok.token_to_id("<s>")
    # Like LLaMA tokenizers: one BOS at the start of every encoded text (none with add_special_tokens=False).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>", model_max_length=512
    )
    fast.save_pretrained(out_dir)
    return fast


def encode_files(tokenizer, files: list[str], chunk_lines: int = 2000) -> torch.Tensor:
    ids: list[int] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        for i in range(0, len(lines), chunk_lines):
            chunk = "".join(lines[i : i + chunk_lines])
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        log(f"tokenised {path}: {len(ids):,} tokens so far")
    return torch.tensor(ids, dtype=torch.int32)


@torch.no_grad()
def window_ppl(model, stream: torch.Tensor, seqlen: int, max_windows: int) -> float:
    n = min(stream.numel() // seqlen, max_windows)
    nll = 0.0
    for i in range(n):
        x = stream[i * seqlen : (i + 1) * seqlen].long().unsqueeze(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x).logits
        nll += torch.nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:]).item()
    return math.exp(nll / n)


def sensitivity_probe(model, valid: torch.Tensor, seqlen: int, windows: int) -> dict:
    import copy

    from hiq.quant.grid import QuantSpec
    from hiq.quant.rtn import quantize_model_rtn

    model.eval()
    out = {"fp": window_ppl(model, valid, seqlen, windows)}
    for bits in (3, 2):
        q = copy.deepcopy(model)
        quantize_model_rtn(q, QuantSpec(bits))  # every block linear, per output channel
        out[f"rtn_w{bits}"] = window_ppl(q, valid, seqlen, windows)
        del q
    model.train()
    return out


def save_checkpoint(model, tokenizer, path: Path) -> None:
    import copy

    half = copy.deepcopy(model).half()
    half.config.torch_dtype = torch.float16
    half.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", nargs="+", required=True, help="training text files (WikiText layout)")
    p.add_argument("--valid", required=True, help="WikiText-2 wiki.valid.raw")
    p.add_argument("--out", required=True, help="output directory for save_pretrained")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=384)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--minutes", type=float, default=50.0,
                   help="wall-clock budget for the training loop, used with --max-steps 0")
    p.add_argument("--max-steps", type=int, default=4400,
                   help="step count; 0 = derive it from --minutes and the measured speed")
    p.add_argument("--calibrate-steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    missing = [f for f in [*args.corpus, args.valid] if not Path(f).is_file()]
    if missing:
        p.error(f"file(s) not found: {', '.join(missing)}")

    log(f"training tokenizer (byte-level BPE, vocab {args.vocab_size}) on {len(args.corpus)} files")
    tokenizer = train_tokenizer(args.corpus, args.vocab_size, out)
    stream = encode_files(tokenizer, args.corpus)
    with open(args.valid, encoding="utf-8") as f:
        valid_rows = [line if line.strip() else "" for line in f]
    valid = torch.tensor(tokenizer("\n\n".join(valid_rows))["input_ids"], dtype=torch.int32)
    log(f"train stream {stream.numel():,} tokens; valid {valid.numel():,} tokens "
        f"({time.time() - t_start:.0f}s)")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seqlen,
        rms_norm_eps=1e-5,
        initializer_range=args.init_std,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_block = sum(p.numel() for p in model.model.layers.parameters())
    log(f"model: {n_params:,} parameters, {n_block:,} in blocks ({100 * n_block / n_params:.0f}%)")

    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (decay if prm.dim() >= 2 and "embed" not in name else no_decay).append(prm)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    max_start = stream.numel() - args.seqlen - 1

    def lr_at(step: int, total: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    total = args.max_steps or 10**9
    history: list[dict] = []
    model.train()
    t_loop = time.time()
    step = 0
    loss_ema = None
    while step < total:
        starts = torch.randint(0, max_start, (args.batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + args.seqlen] for s in starts.tolist()]).long()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if args.max_steps is None and step == args.calibrate_steps:
            per_step = (time.time() - t_loop) / step
            n_evals_guess = 1 + (args.minutes * 60 / per_step) / args.eval_every
            eval_cost = 2.5 * args.eval_windows * per_step / args.batch_size * 3
            total = int((args.minutes * 60 - n_evals_guess * eval_cost) / per_step)
            log(f"{per_step:.2f}s/step -> {total} steps in {args.minutes} min "
                f"({total * args.batch_size * args.seqlen / 1e6:.1f}M tokens)")
        if step % 50 == 0:
            tok_s = step * args.batch_size * args.seqlen / (time.time() - t_loop)
            log(f"step {step}/{total} loss {loss_ema:.3f} lr {lr_at(step, total):.2e} {tok_s:.0f} tok/s")
        if step % args.eval_every == 0 or step == total:
            probe = sensitivity_probe(model, valid, args.seqlen, args.eval_windows)
            rec = {"step": step, "tokens": step * args.batch_size * args.seqlen, "train_loss": loss_ema,
                   "minutes": (time.time() - t_loop) / 60, **probe}
            history.append(rec)
            log("probe " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}))
            if step < total:  # an interim checkpoint, overwritten by the next one and by the final model
                save_checkpoint(model, tokenizer, out / "interim")

    train_minutes = (time.time() - t_loop) / 60
    save_checkpoint(model, tokenizer, out)
    shutil.rmtree(out / "interim", ignore_errors=True)
    info = {
        "recipe": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "parameters": n_params,
        "block_parameters": n_block,
        "steps": step,
        "tokens_seen": step * args.batch_size * args.seqlen,
        "train_stream_tokens": int(stream.numel()),
        "train_minutes": train_minutes,
        "total_minutes": (time.time() - t_start) / 60,
        "torch": torch.__version__,
        "history": history,
    }
    (out / "training_log.json").write_text(json.dumps(info, indent=2))
    log(f"saved to {out} after {train_minutes:.1f} min of training")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

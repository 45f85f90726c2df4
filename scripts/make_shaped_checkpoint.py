"""Write a random-weight checkpoint with the shapes of a real architecture, for cost and memory measurements only.

    python scripts/make_shaped_checkpoint.py llama-2-7b --blocks 2 --out runs/shaped/llama-2-7b-2blk
    python scripts/make_shaped_checkpoint.py mistral-7b --blocks 4 --out runs/shaped/mistral-7b-4blk
    python scripts/make_shaped_checkpoint.py qwen2-7b --blocks 2 --hidden-size 64 --heads 4 --kv-heads 2 \
        --intermediate-size 128 --out /tmp/tiny-qwen2   # any width: for tests

The weights are random (normal, std ``initializer_range``; norms 1): the model's text is noise and its perplexity
means nothing. What it does carry is a real architecture's shapes — hidden size, heads, key/value heads (GQA),
feed-forward width, q/k/v biases — so a ``hiq fit`` on it costs what a block of the real model costs (time,
memory, export sizes). The blocks are full width; only their number is chosen (``--blocks``). The tokenizer is
the bundled tiny model's (2,048 tokens); the vocabulary defaults to 2,560 rows (a 32,000-row LLaMA vocabulary is
``--vocab 32000``). Tensors are written one at a time in bfloat16 into safetensors shards of at most
``--shard-mb`` MB, with ``model.safetensors.index.json``, as ``save_pretrained`` writes a sharded checkpoint;
the folder gets a README saying all this.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "hiq" / "assets" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

#: the architectures' published shapes (their config.json on the hub); blocks and vocabulary are chosen per run
SHAPE_FIELDS = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "rms_norm_eps", "rope_theta", "max_position_embeddings", "full_blocks")
ARCHITECTURES: dict[str, dict] = {name: dict(zip(SHAPE_FIELDS, row, strict=True)) for name, row in {
    "llama-2-7b": ("llama", 4096, 32, 32, 11008, 1e-5, 10000.0, 4096, 32),
    "llama-2-13b": ("llama", 5120, 40, 40, 13824, 1e-5, 10000.0, 4096, 40),
    "llama-2-70b": ("llama", 8192, 64, 8, 28672, 1e-5, 10000.0, 4096, 80),
    "mistral-7b": ("mistral", 4096, 32, 8, 14336, 1e-5, 1000000.0, 32768, 32),
    "qwen2-7b": ("qwen2", 3584, 28, 4, 18944, 1e-6, 1000000.0, 32768, 28),  # q/k/v biases: Qwen2's own config
}.items()}

NOTICE = ("RANDOM WEIGHTS: this checkpoint has a real architecture's shapes and random values. Its text is noise; "
          "use it for cost and memory only (time, RAM, export sizes), never for quality.")


def build_config(arch: str, blocks: int, vocab: int, overrides: dict):
    """The transformers config of ``arch`` with ``blocks`` blocks, ``vocab`` rows and any shape ``overrides``."""
    from transformers import AutoConfig

    shape = {k: v for k, v in ARCHITECTURES[arch].items() if k != "full_blocks"}
    shape.update({k: v for k, v in overrides.items() if v is not None})
    model_type = shape.pop("model_type")
    rope_theta = shape.pop("rope_theta")
    config = AutoConfig.for_model(
        model_type, num_hidden_layers=blocks, vocab_size=vocab, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1, pad_token_id=1, initializer_range=0.02, hidden_act="silu", use_cache=True,
        rope_parameters={"rope_theta": rope_theta, "rope_type": "default"}, **shape)
    config.head_dim = config.hidden_size // config.num_attention_heads
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.dtype = "bfloat16"
    return config


def parameter_shapes(config) -> dict[str, tuple[tuple[int, ...], bool]]:
    """``{name: (shape, is_norm)}`` of every persistent tensor, from a model built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    norms = {f"{name}.weight" for name, mod in model.named_modules() if "norm" in type(mod).__name__.lower()}
    return {name: (tuple(t.shape), name in norms) for name, t in model.state_dict().items()}


def random_tensor(name: str, shape: tuple[int, ...], is_norm: bool, seed: int, std: float):
    import hashlib

    import torch

    if is_norm:
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        std = std / 2
    g = torch.Generator().manual_seed(seed + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def write_checkpoint(out: Path, arch: str, blocks: int, vocab: int = 2560, shard_mb: float = 300.0, seed: int = 0,
                     overrides: dict | None = None) -> dict:
    """Write the checkpoint into ``out`` (created; must be empty or absent); returns a summary of what it holds."""
    from safetensors.torch import save_file

    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(arch, blocks, vocab, overrides or {})
    shapes = parameter_shapes(config)
    limit = int(shard_mb * 1e6)
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, _) in shapes.items():
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors")
        tensors = {n: random_tensor(n, shapes[n][0], shapes[n][1], seed, config.initializer_range) for n in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: file for n in names})
        del tensors
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.save_pretrained(out)
    for f in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / f, out / f)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = config.max_position_embeddings
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    block_bytes = 2 * sum(_numel(s) for n, (s, _) in shapes.items() if n.startswith("model.layers.0."))
    summary = {"architecture": arch, "blocks": blocks, "full_blocks": ARCHITECTURES[arch]["full_blocks"],
               "hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
               "num_key_value_heads": config.num_key_value_heads, "intermediate_size": config.intermediate_size,
               "vocab_size": vocab, "dtype": "bfloat16", "shards": len(shards), "bytes": total,
               "block_bytes": block_bytes, "seed": seed, "random_weights": True, "notice": NOTICE}
    (out / "shaped.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(_readme(summary, " ".join(sys.argv)))
    return summary


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _readme(s: dict, command: str) -> str:
    return (f"# {s['architecture']}-shaped checkpoint, {s['blocks']} of {s['full_blocks']} blocks — random weights\n\n"
            f"**{NOTICE}**\n\n"
            f"- hidden {s['hidden_size']}, {s['num_attention_heads']} heads, {s['num_key_value_heads']} key/value "
            f"heads, feed-forward {s['intermediate_size']}, vocabulary {s['vocab_size']} rows\n"
            f"- bfloat16, {s['bytes'] / 2**30:.3f} GiB in {s['shards']} safetensors shard(s); one block "
            f"{s['block_bytes'] / 2**30:.3f} GiB\n"
            f"- tokenizer: hiq's bundled tiny model's (2,048 tokens)\n"
            f"- written by `{command}` (seed {s['seed']})\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", choices=sorted(ARCHITECTURES))
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (full width each)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab", type=int, default=2560, help="vocabulary rows (>= 2048, the tokenizer's)")
    parser.add_argument("--shard-mb", type=float, default=300.0, help="largest safetensors shard, MB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--heads", type=int, dest="num_attention_heads")
    parser.add_argument("--kv-heads", type=int, dest="num_key_value_heads")
    parser.add_argument("--intermediate-size", type=int)
    args = parser.parse_args(argv)
    if args.blocks < 1:
        parser.error("--blocks must be at least 1")
    if args.vocab < 2048:
        parser.error("--vocab must be at least 2048 (the bundled tokenizer's size)")
    overrides = {k: getattr(args, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                 "intermediate_size")}
    s = write_checkpoint(args.out, args.arch, args.blocks, args.vocab, args.shard_mb, args.seed, overrides)
    print(f"{NOTICE}\nwrote {args.out}: {s['architecture']} shapes, {s['blocks']} blocks, "
          f"{s['bytes'] / 2**30:.3f} GiB bf16 in {s['shards']} shard(s), one block {s['block_bytes'] / 2**30:.3f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

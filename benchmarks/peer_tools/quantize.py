#!/usr/bin/env python
"""Quantize a Hugging Face causal LM with a peer PTQ tool, through the tool's own public API.

Runs inside a peer venv made by benchmarks/peer_tools/setup.sh (it does not import hiq):

    .venv-peers/bin/python benchmarks/peer_tools/quantize.py --method gptq|awq|hqq ...
    .venv-peers-autoround/bin/python benchmarks/peer_tools/quantize.py --method autoround ...
        --bits B --group-size G|none --calibration <out>/calibration.pt --model <path> --out <dir>
        [--amp on|off] [--seed S] [--iters N]       # AutoRound: bf16 autocast (its CPU default) or fp32, ...
        [--sym] [--alg-ext]                         # AutoRound: symmetric grid (its W2A16 default), and its
                                                    # enable_alg_ext (SignRoundV2), the README's W2A16 advice
    .venv-peers-autoround/bin/python benchmarks/peer_tools/quantize.py --method autoround-scheme \
        --avg-bits 2.10 --scheme-bits 2 3 --group-size none ...   # AutoRound's own mixed precision (AutoScheme)

Writes ``<dir>/model``: a plain ``save_pretrained`` checkpoint (float32) whose block linears hold the tool's
DEQUANTISED weights (every other parameter as the tool left it: AWQ folds its scales into the norms), with
the tokenizer; and ``<dir>/peer.json``: method, tool and version, bits, group size, seconds (model load to
dequantised weights, saving excluded), peak RSS MiB (``resource.getrusage``), the options used.

Matched to hiq's settings: bits, group size (``none`` = one scale/zero per output row), asymmetric grids
(scale + zero point), the same calibration windows (int64 [n, seqlen] from ``calibration.pt``). Everything
else is the tool's own default; the options actually passed are written to peer.json.

``autoround-scheme``: ``AutoRound(scheme=AutoScheme(avg_bits=A, options=(W<b>A16 at the setting's grouping, ...),
ignore_scale_zp_bits=True))`` -- the tool picks each block linear's bits (one of ``--scheme-bits``) so that the
average CODE bits of the quantized layers is at most A (scale/zero excluded, as hiq's budget excludes them), then
tunes as usual. AutoScheme's scorer accepts only a dataset *name or path* (GenScheme raises "`dataset` must be a
string" for a list of tensors), so the calibration windows are written as decoded text to ``calib.jsonl`` and the
tokenizer's BOS is switched off (``add_bos_token=False``): re-tokenised, each line gives back exactly its window
(checked before the run: all must match, or the run stops). peer.json gets ``layer_bits`` (the bits AutoScheme gave
each block linear, from ``AutoRound.layer_config``) for the per-layer grid check.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def log(msg: str) -> None:
    print(f"[quantize {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def is_block_linear(name: str, module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and ".layers." in name and name.split(".")[-1] in BLOCK_LINEARS


def load(model_path: str):
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_path)


# ------------------------------------------------------------------------------------------- llmcompressor
def quantize_llmcompressor(method: str, model, tokenizer, calib: torch.Tensor, bits: int, group: int | None):
    """GPTQModifier, or AWQModifier + QuantizationModifier, with an asymmetric int scheme on the Linears."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False,
                               strategy="channel" if group is None else "group", group_size=group)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "gptq":
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    else:
        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    notes = ["asymmetric int (scale + int zero point)"]
    if method == "awq" and not torch.accelerator.is_available():
        # llmcompressor 0.14's AWQ pins its CPU activation cache (IntermediatesCache.pin_memory) unconditionally,
        # which raises "Cannot access accelerator device when none is available" on a CPU-only machine.
        # Pinning only speeds up host-to-device copies; with no device it is a no-op, so make it one.
        torch.Tensor.pin_memory = lambda self, *a, **k: self
        notes.append("CPU workaround: torch.Tensor.pin_memory made a no-op (llmcompressor AWQ pins its cache "
                     "unconditionally and fails without an accelerator)")
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    deq = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not is_block_linear(name, module):
                continue
            if not hasattr(module, "weight_scale"):
                raise RuntimeError(f"{method}: {name} was not quantized by llmcompressor")
            if getattr(module, "weight_g_idx", None) is not None:
                raise RuntimeError(f"{method}: {name} has a g_idx (activation-order groups); not handled")
            args = module.quantization_scheme.weights
            deq[name] = fake_quantize(module.weight.detach().float(), module.weight_scale.float(),
                                      module.weight_zero_point, args).float()
    options = {"scheme": weights.model_dump(mode="json"), "targets": ["Linear"], "ignore": ["lm_head"],
               "recipe": [type(m).__name__ for m in recipe], "num_calibration_samples": calib.shape[0],
               "max_seq_length": calib.shape[1], "shuffle_calibration_samples": False,
               "dequantise": "compressed_tensors fake_quantize(weight, weight_scale, weight_zero_point)"}
    if method == "gptq":
        g = recipe[0]
        options.update(block_size=g.block_size, dampening_frac=g.dampening_frac, actorder=str(g.actorder))
    else:
        options.update(duo_scaling=recipe[0].duo_scaling, n_grid=recipe[0].n_grid, mappings="inferred (default)")
    return deq, options, notes, ("llmcompressor", version("llmcompressor"))


# ------------------------------------------------------------------------------------------- auto-round
def _calibration_jsonl(tokenizer, calib: torch.Tensor, path: Path, max_mismatch: int = 0) -> int:
    """The windows as decoded text, one JSON line each, for AutoRound's local-file dataset loader (the only
    dataset form AutoScheme's scorer takes). The caller has switched BOS off; every line must re-tokenise to
    exactly its window (truncated at seqlen), else the run stops rather than calibrate on other tokens — unless
    at most ``max_mismatch`` tokens differ over all windows (same lengths). Returns the number that differ."""
    lines, seqlen, differ = [], calib.shape[1], 0
    for i, row in enumerate(calib):
        ids = row.tolist()
        text = tokenizer.decode(ids)
        back = tokenizer(text, truncation=True, max_length=seqlen)["input_ids"]
        if back != ids:
            n = sum(a != b for a, b in zip(back, ids, strict=False)) + abs(len(back) - len(ids))
            differ += n
            if len(back) != len(ids) or differ > max_mismatch:
                raise RuntimeError(f"calibration window {i} does not survive decode -> tokenize ({n} of {seqlen} "
                                   f"tokens differ, {len(back)} tokens back; {differ} so far, "
                                   f"--max-token-mismatch {max_mismatch}); AutoScheme would calibrate on other tokens")
        lines.append(json.dumps({"text": text}))
    path.write_text("\n".join(lines) + "\n")
    return differ


def quantize_autoround(model, tokenizer, calib: torch.Tensor, bits: int, group: int | None, out: Path,
                       amp: bool | None = None, seed: int | None = None, iters: int | None = None,
                       avg_bits: float | None = None, scheme_bits: tuple[int, ...] = (), sym: bool = False,
                       alg_ext: bool = False, max_token_mismatch: int = 0):
    """AutoRound(...).quantize_and_save(format="fake"): the tool's own export of QDQ (dequantised) weights.

    ``avg_bits`` set: mixed precision by AutoRound's own AutoScheme over ``scheme_bits`` at this grouping.
    ``sym``: AutoRound's symmetric grid (its own W2A16 default; no zero point) instead of hiq's asymmetric one.
    ``alg_ext``: ``enable_alg_ext=True`` (SignRoundV2: an init-scale search and an outlier-suppressed loss, which in
    auto-round 0.16.1 apply to symmetric int grids only), the tool's advice for W2A16 with auto-round-best."""
    from auto_round import AutoRound
    from safetensors.torch import load_file

    gs = -1 if group is None else group
    kwargs = dict(bits=bits, group_size=gs, sym=sym,
                  dataset=[row.unsqueeze(0) for row in calib], nsamples=calib.shape[0], seqlen=calib.shape[1],
                  device_map="cpu")
    if amp is not None:
        kwargs["amp"] = amp
    if seed is not None:
        kwargs["seed"] = seed
    if iters is not None:
        kwargs["iters"] = iters
    if alg_ext:
        kwargs["enable_alg_ext"] = True
    notes = ["symmetric (sym=True)" if sym else "asymmetric (sym=False)"]
    if alg_ext:
        notes.append("enable_alg_ext=True (SignRoundV2 extension)")
    if amp is False:
        notes.append("fp32 tuning (amp=False)")
    scheme_repr = None
    if avg_bits is not None:
        from auto_round import AutoScheme
        from auto_round.schemes import QuantizationScheme

        options = tuple(QuantizationScheme(bits=b, group_size=gs, sym=sym, data_type="int") for b in scheme_bits)
        scheme = AutoScheme(avg_bits=avg_bits, options=options, ignore_scale_zp_bits=True,
                            nsamples=calib.shape[0], seqlen=calib.shape[1])
        tokenizer.add_bos_token = False  # the windows carry no BOS; see _calibration_jsonl
        jsonl = out / "calib.jsonl"
        differ = _calibration_jsonl(tokenizer, calib, jsonl, max_token_mismatch)
        for k in ("bits", "group_size", "sym"):
            kwargs.pop(k)
        kwargs.update(scheme=scheme, dataset=str(jsonl))
        scheme_repr = {"avg_bits": avg_bits, "options": [f"W{b}A16 group_size={gs} sym={sym} int" for b in scheme_bits],
                       "ignore_scale_zp_bits": True, "nsamples": calib.shape[0], "seqlen": calib.shape[1],
                       "method": scheme.method}
        notes.append(f"AutoScheme avg_bits={avg_bits} over W{'/W'.join(map(str, scheme_bits))}A16, scale/zero bits "
                     f"excluded (ignore_scale_zp_bits=True); calibration as calib.jsonl (decoded windows, BOS off, "
                     + ("re-tokenised identically)" if differ == 0 else
                        f"re-tokenised: {differ} of {calib.numel()} tokens differ from the windows)"))
    fake_dir = out / "autoround-fake"
    timing = fake_dir / "timing.json"  # written right after the export, so a later failure can resume from it
    options = {k: v for k, v in kwargs.items() if k not in ("dataset", "scheme")}
    if scheme_repr is not None:
        options["scheme"] = scheme_repr
    layer_bits = None
    if timing.is_file():
        log(f"reusing the finished AutoRound export in {fake_dir}")
        reused = json.loads(timing.read_text())
        options.update(reused.get("options", {}))
        layer_bits = reused.get("layer_bits")
    else:
        t0 = time.time()
        ar = AutoRound(model, tokenizer, **kwargs)
        ar.quantize_and_save(output_dir=str(fake_dir), format="fake")  # writes <fake_dir>/<model name>-w<b>a16/
        for attr in ("iters", "lr", "minmax_lr", "batch_size", "enable_minmax_tuning", "amp", "amp_dtype",
                     "scale_dtype", "data_type", "enable_quanted_input", "enable_torch_compile", "seed",
                     "enable_alg_ext", "sym"):
            value = getattr(ar, attr, None)
            if value is not None:
                options[attr] = value if isinstance(value, (int, float, bool, str)) else str(value)
        if avg_bits is not None:
            layer_bits = {name: int(cfg["bits"]) for name, cfg in (ar.layer_config or {}).items()
                          if ".layers." in name and name.split(".")[-1] in BLOCK_LINEARS}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        reused = {"seconds": time.time() - t0, "peak_rss_mb": round(rss, 1), "options": options,
                  "layer_bits": layer_bits}
        timing.write_text(json.dumps(reused, indent=2) + "\n")
        reused = None
    state = {}
    for f in sorted(fake_dir.rglob("*.safetensors")):
        state.update(load_file(str(f)))
    deq = {k[: -len(".weight")]: v.float() for k, v in state.items()
           if k.endswith(".weight") and ".layers." in k and k.split(".")[-2] in BLOCK_LINEARS}
    if avg_bits is not None and (not layer_bits or set(layer_bits) != set(deq)):
        raise RuntimeError(f"AutoScheme: per-layer bits for {len(layer_bits or {})} layers, "
                           f"{len(deq)} block linears exported")
    options["dataset"] = (f"{calib.shape[0]} tensors [1, {calib.shape[1]}] from calibration.pt" if avg_bits is None
                          else f"calib.jsonl: the {calib.shape[0]} windows of calibration.pt as text")
    options["dequantise"] = "quantize_and_save(format='fake') checkpoint, block linear weights"
    if reused is not None:
        notes.append(f"quantization reused from a finished export in {fake_dir.name}/ (timing.json: "
                     f"{reused.get('note', 'seconds and peak RSS of the run that made it')})")
    return deq, options, notes, ("auto-round", version("auto-round")), state, reused, layer_bits


# ------------------------------------------------------------------------------------------- hqq
def quantize_hqq(model, bits: int, group: int | None):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    deq, notes = {}, ["calibration-free; asymmetric, zero point kept in float (not rounded for 2/3 bits)"]
    used = None
    for name, module in list(model.named_modules()):
        if not is_block_linear(name, module):
            continue
        # axis=1: groups of consecutive input columns; per-channel = one group spanning the whole row
        gs = module.in_features if group is None else group
        cfg = BaseQuantizeConfig(nbits=bits, group_size=gs, axis=1)
        layer = HQQLinear(module, cfg, compute_dtype=torch.float32, device="cpu", del_orig=False)
        deq[name] = layer.dequantize().reshape(module.weight.shape).float().clone()
        used = cfg
    if group is None:
        notes.append("per-channel as group_size=in_features (hqq's group_size=None fails to dequantize 3-bit)")
        used["weight_quant_params"]["group_size"] = "in_features of each layer"
    options = {"quant_config": json.loads(json.dumps(used, default=str)), "compute_dtype": "float32",
               "device": "cpu", "api": "hqq.core.quantize.HQQLinear(...).dequantize()"}
    return deq, options, notes, ("hqq", version("hqq"))


# ------------------------------------------------------------------------------------------- main
def save_dequantised(model_path: str, deq: dict[str, torch.Tensor], source_state: dict[str, torch.Tensor],
                     out: Path) -> None:
    """A fresh copy of the original model, with the tool's parameters (names it shares) and dequantised
    block linears, saved as a plain float32 checkpoint plus the tokenizer."""
    fresh = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    state = fresh.state_dict()
    new = {}
    for key, value in state.items():
        mod = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and mod in deq:
            new[key] = deq[mod]
        elif key in source_state and source_state[key].shape == value.shape:
            new[key] = source_state[key].detach().float()
        else:
            new[key] = value
        if new[key].shape != value.shape:
            raise RuntimeError(f"{key}: shape {tuple(new[key].shape)} != {tuple(value.shape)}")
    missing = [m for m in deq if f"{m}.weight" not in state]
    if missing:
        raise RuntimeError(f"dequantised layers not in the model: {missing[:3]}")
    fresh.load_state_dict(new, strict=True)
    fresh.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=["gptq", "awq", "autoround", "autoround-scheme", "hqq"])
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", required=True, help="input columns per group, or 'none' for per-channel")
    p.add_argument("--calibration", required=True, help="int64 tensor [n, seqlen] (torch.save)")
    p.add_argument("--model", required=True, help="save_pretrained directory of the model to quantize")
    p.add_argument("--out", required=True)
    p.add_argument("--amp", choices=["on", "off"], default=None,
                   help="AutoRound: on = bf16 autocast (its CPU default), off = fp32 (amp=False); unset = default")
    p.add_argument("--seed", type=int, default=None, help="AutoRound's seed (unset: its default, 42)")
    p.add_argument("--iters", type=int, default=None, help="AutoRound's steps per block (unset: its default, 200)")
    p.add_argument("--sym", action="store_true",
                   help="AutoRound: symmetric grid (its W2A16 default; hiq's is asymmetric)")
    p.add_argument("--alg-ext", action="store_true",
                   help="AutoRound: enable_alg_ext=True (SignRoundV2; 0.16.1 applies it to symmetric int grids)")
    p.add_argument("--max-token-mismatch", type=int, default=0,
                   help="autoround-scheme: tokens of the re-tokenised text windows allowed to differ (default 0)")
    p.add_argument("--avg-bits", type=float, default=None, help="autoround-scheme: AutoScheme's avg_bits (code bits)")
    p.add_argument("--scheme-bits", type=int, nargs="+", default=[2, 3],
                   help="autoround-scheme: the bit widths AutoScheme chooses from (same grouping)")
    args = p.parse_args(argv)
    if args.method == "autoround-scheme" and args.avg_bits is None:
        p.error("--method autoround-scheme needs --avg-bits")
    group = None if args.group_size.lower() in ("none", "null", "-1", "0") else int(args.group_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    calib = torch.load(args.calibration).to(torch.int64)
    if calib.dim() != 2:
        raise SystemExit(f"{args.calibration}: expected [n, seqlen], got {tuple(calib.shape)}")
    log(f"{args.method} W{args.bits} {'per-channel' if group is None else f'g{group}'}; "
        f"calibration {tuple(calib.shape)}")
    t0 = time.time()
    model, tokenizer = load(args.model)
    n_linears = sum(is_block_linear(n, m) for n, m in model.named_modules())
    if args.method in ("gptq", "awq"):
        deq, options, notes, tool = quantize_llmcompressor(args.method, model, tokenizer, calib, args.bits, group)
        qmodel = model
    elif args.method in ("autoround", "autoround-scheme"):
        amp = None if args.amp is None else args.amp == "on"
        scheme = args.method == "autoround-scheme"
        deq, options, notes, tool, fake_state, reused, layer_bits = quantize_autoround(
            model, tokenizer, calib, args.bits, group, out, amp=amp, seed=args.seed, iters=args.iters,
            avg_bits=args.avg_bits if scheme else None, scheme_bits=tuple(args.scheme_bits) if scheme else (),
            sym=args.sym, alg_ext=args.alg_ext, max_token_mismatch=args.max_token_mismatch)
        qmodel = None
    else:
        deq, options, notes, tool = quantize_hqq(model, args.bits, group)
        qmodel = model
        notes.insert(0, "calibration.pt not used (HQQ needs no data)")
    if len(deq) != n_linears:
        raise RuntimeError(f"{args.method}: dequantised {len(deq)} of {n_linears} block linears")
    if qmodel is not None:
        source_state = {k: v for k, v in qmodel.state_dict().items() if isinstance(v, torch.Tensor)}
    else:  # AutoRound: its exported fake checkpoint
        source_state = fake_state
    seconds = time.time() - t0
    if args.method.startswith("autoround") and reused is not None:  # the export's own run time, not this re-read
        seconds = reused["seconds"]
    save_dequantised(args.model, deq, source_state, out / "model")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if args.method.startswith("autoround") and reused is not None:
        rss = max(rss, reused["peak_rss_mb"])
    info = {"method": args.method, "tool": tool[0], "version": tool[1], "bits": args.bits, "group_size": group,
            "seconds": round(seconds, 2), "peak_rss_mb": round(rss, 1), "options": options, "notes": notes,
            "setting_note": "; ".join(n for n in notes if n.startswith("per-channel as")),
            "calibration": {"path": str(args.calibration), "shape": list(calib.shape)},
            "torch": torch.__version__, "transformers": version("transformers"), "layers": len(deq)}
    if args.method == "autoround-scheme":
        info.update(avg_bits_target=args.avg_bits, scheme_bits=args.scheme_bits, layer_bits=layer_bits)
    (out / "peer.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    log(f"done in {seconds:.1f} s; wrote {out / 'model'} and {out / 'peer.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""hiq against the PTQ tools users would pick instead: same model, same calibration data, one evaluator.

Rows per setting (configs/tiny/<setting>.yaml gives bits = ``quant.bits`` and ``quant.group_size``):

  rtn         hiq eval's round-to-nearest (asymmetric min-max), no calibration
  gptq        llmcompressor GPTQModifier                      } run by benchmarks/peer_tools/quantize.py inside the
  awq         llmcompressor AWQModifier                       } peer venv (benchmarks/peer_tools/setup.sh), which
  autoround   auto-round AutoRound, its defaults              } writes a dequantised HF checkpoint; scored by
  hqq         hqq (calibration-free half-quadratic)           } `hiq eval --quant.method=none` here
  autoround-fp32    AutoRound with amp=False (fp32 tuning; its CPU default is bf16 autocast), --autoround-seed
  autoround-best    AutoRound's "best" recipe (auto-round-best: iters 1000, nsamples 512), fp32, --autoround-seed;
                    512 windows of the same data section (its own calibration-512.pt)
  autoround-ext     AutoRound's W2A16 advice at its default iterations: symmetric grid (sym=True, its W2A16 default)
                    + enable_alg_ext=True (SignRoundV2's init-scale search and outlier-suppressed loss; auto-round
                    0.16.1 applies them to symmetric int grids only), fp32, --autoround-seed
  autoround-best-ext  the README's W2A16 recommendation: auto-round-best (iters 1000, nsamples 512) + sym +
                    enable_alg_ext, fp32, --autoround-seed
  autoround-scheme  AutoRound's own mixed precision: AutoScheme(avg_bits=B, options=(W<b>A16, W<b+1>A16) at the
                    setting's grouping, ignore_scale_zp_bits=True), fp32, --autoround-seed; one row per
                    --budgets B (code bits, scale/zero excluded as in hiq's budget), cached as autoround-scheme-<B>
  autoround-scheme-ext  the same with AutoRound's W2A16 advice (sym=True + enable_alg_ext=True; the SignRoundV2
                    paper's recipe: "turn on enable_alg_ext and use the AutoScheme API"), cached as
                    autoround-scheme-ext-<B>
  autoround-scheme-best-ext  the same at auto-round-best's 1000 steps on its 512 windows
  hiq-lwc     hiq fit with ratios fixed at 0, LWC only (the tool at the peers' bits)
  hiq         hiq fit, the method (optimal ratios + AdaRound/LWC hybrid) at its own budget

Every calibrated peer reads the same windows, written once to ``<out>/calibration.pt`` by the code ``hiq fit``
uses (``hiq.modules.CalibrationData(...).windows(tokenizer, max_context)`` with the configs' ``data`` section).
Before a peer is scored, each block linear of its checkpoint must lie on a b-bit grid: at most 2^b distinct
values per (row, group) (per row for per-channel); a violation fails the row naming layer, row, group, count.
For autoround-scheme b is each layer's own bits (peer.json ``layer_bits``, AutoRound's layer_config); the row's avg
bits is the parameter-weighted mean of those bits, and grid.json also records the bits the levels imply
(ceil(log2(max distinct values)) per layer), which must not exceed them.

``--frontier w2=runs/frontier/w2`` (benchmarks/frontier.py output) adds a matched-bits table: each
autoround-scheme row next to hiq's frontier run at the same budget, with degradation = ppl - FP ppl
(``--fp-ppl``) and the ratio hiq / AutoRound per test set.

Every row runs as its own process (peers in their own virtual environments, ``hiq fit`` / ``hiq eval`` for hiq's
rows and the scoring): the table reports each row's peak memory, which only a fresh process measures.

Each row is cached in ``<out>/<setting>/<method>/`` and read back when finished, so reruns only compute what
is missing. ``--reuse runs/ablation`` copies finished ``runs/ablation/<setting>/{lwc,ours}`` run directories and
``runs/ablation/<setting>/rtn.json`` (computed by benchmarks/ablation.py with the identical ``hiq fit`` / ``hiq
eval`` commands) instead of recomputing them.

    bash benchmarks/peer_tools/setup.sh                                   # once: .venv-peers
    python benchmarks/peer_table.py [--settings w2 w3 w2-g128 w3-g128 w2-g64] [--methods rtn gptq ...] \\
        [--out runs/bench] [--reuse runs/ablation]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ablation.py: the hiq rows' options

import torch
import yaml

from hiq.quant.grid import setting_label

ROOT = Path(__file__).resolve().parents[1]
# this interpreter's hiq: its console script when there is one (``python -m hiq`` would put the working
# directory first on sys.path, so a PYTHONPATH snapshot of the package could not take precedence)
_HIQ_SCRIPT = Path(sys.executable).with_name("hiq")
HIQ = [str(_HIQ_SCRIPT)] if _HIQ_SCRIPT.is_file() else [sys.executable, "-m", "hiq"]
QUANTIZE = ROOT / "benchmarks" / "peer_tools" / "quantize.py"
# the peer venvs (benchmarks/peer_tools/setup.sh): llmcompressor 0.14 pins auto-round<=0.15.1, so AutoRound has its own
PEER_VENVS = {"gptq": ".venv-peers", "awq": ".venv-peers", "hqq": ".venv-peers", "autoround": ".venv-peers-autoround",
              "autoround-fp32": ".venv-peers-autoround", "autoround-best": ".venv-peers-autoround",
              "autoround-scheme": ".venv-peers-autoround", "autoround-ext": ".venv-peers-autoround",
              "autoround-best-ext": ".venv-peers-autoround", "autoround-scheme-ext": ".venv-peers-autoround",
              "autoround-scheme-best-ext": ".venv-peers-autoround"}

PEERS = ("gptq", "awq", "autoround", "autoround-fp32", "autoround-best", "autoround-ext", "autoround-best-ext",
         "autoround-scheme", "autoround-scheme-ext", "autoround-scheme-best-ext", "hqq")
# quantize.py options of the AutoRound variants (the seed is added from --autoround-seed)
AUTOROUND_VARIANTS = {"autoround-fp32": ["--amp", "off"], "autoround-best": ["--amp", "off", "--iters", "1000"],
                      "autoround-ext": ["--amp", "off", "--sym", "--alg-ext"],
                      "autoround-best-ext": ["--amp", "off", "--iters", "1000", "--sym", "--alg-ext"],
                      "autoround-scheme": ["--amp", "off"],
                      "autoround-scheme-ext": ["--amp", "off", "--sym", "--alg-ext"],
                      # one of the 512 windows' 262,144 tokens does not survive decode -> tokenize (the text
                      # dataset AutoScheme needs): allowed, and counted in the row's notes
                      "autoround-scheme-best-ext": ["--amp", "off", "--iters", "1000", "--sym", "--alg-ext",
                                                    "--max-token-mismatch", "8"]}
# AutoScheme rows: one per --budgets B
SCHEMES = ("autoround-scheme", "autoround-scheme-ext", "autoround-scheme-best-ext")
# auto-round-best's 512 windows
USES_BEST_CALIBRATION = ("autoround-best", "autoround-best-ext", "autoround-scheme-best-ext")
BEST_NSAMPLES = 512  # auto-round-best's nsamples (auto_round/cli/main.py RECIPES["best"])
METHODS = ("rtn", *PEERS, "hiq-lwc", "hiq", "hiq-sr", "hiq-sr-opt")
DEFAULT_METHODS = tuple(m for m in METHODS if m not in AUTOROUND_VARIANTS)  # the variants are opt-in (--methods)
LABELS = {
    "rtn": "RTN (hiq eval)",
    "gptq": "GPTQ (llmcompressor)",
    "awq": "AWQ (llmcompressor)",
    "autoround": "AutoRound (auto-round)",
    "autoround-fp32": "AutoRound fp32 (auto-round, amp=False)",
    "autoround-best": "AutoRound best recipe (auto-round, iters 1000, nsamples 512, amp=False)",
    "autoround-ext": "AutoRound sym + enable_alg_ext (auto-round, amp=False)",
    "autoround-best-ext": "AutoRound best recipe + sym + enable_alg_ext (auto-round, iters 1000, nsamples 512, "
                          "amp=False)",
    "autoround-scheme": "AutoRound AutoScheme (auto-round, mixed bits, amp=False)",
    "autoround-scheme-ext": "AutoRound AutoScheme + sym + enable_alg_ext (auto-round, mixed bits, amp=False)",
    "autoround-scheme-best-ext": "AutoRound AutoScheme + best recipe + sym + enable_alg_ext (auto-round, mixed bits, "
                                 "iters 1000, nsamples 512, amp=False)",
    "hqq": "HQQ (hqq)",
    "hiq-lwc": "hiq LWC-only (paper preset)",
    "hiq": "hiq, paper preset",
    "hiq-sr": "hiq SignRound-only (ratio 0)",
    "hiq-sr-opt": "hiq, signround preset (default)",
}
# hiq fit options of the two hiq rows; identical to benchmarks/ablation.py's "lwc" and "ours" rows
def _cli(options: dict) -> list[str]:
    from ablation import as_command

    return as_command(options={**options, "export.enabled": False}).split()[1:]


_ABLATION = {name: options for name, _, options in __import__("ablation").FIT_ROWS}
HIQ_FIT_ROWS = {method: (row, _cli(_ABLATION[row])) for method, row in
                (("hiq-lwc", "lwc"), ("hiq", "ours"), ("hiq-sr", "sr"), ("hiq-sr-opt", "sr-optimal"))}
CALIBRATED = ("gptq", "awq", "autoround", "autoround-fp32", "autoround-best", "autoround-ext", "autoround-best-ext",
              "autoround-scheme", "autoround-scheme-ext", "autoround-scheme-best-ext", "hiq-lwc", "hiq",
              "hiq-sr", "hiq-sr-opt")  # rtn and hqq use no data
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class GridError(RuntimeError):
    """A peer checkpoint's block linear has more distinct values in a (row, group) than its bits allow."""


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- grid check
def _group_slices(in_features: int, group_size: int | None) -> list[slice]:
    if group_size in (None, 0, -1) or group_size >= in_features:
        return [slice(0, in_features)]
    return [slice(s, min(s + group_size, in_features)) for s in range(0, in_features, group_size)]


def grid_levels_where(weight: torch.Tensor, group_size: int | None) -> tuple[int, int, int]:
    """(max distinct values over all (row, group), its row, its group index) of a 2-D weight [out, in].

    Groups are ``group_size`` consecutive input columns (a ragged last group is its own group); ``None``
    means per output channel (the whole row is one group).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().float()  # float16/bfloat16 values are exact in float32
    best = (0, 0, 0)
    for gi, sl in enumerate(_group_slices(w.shape[1], group_size)):
        part = torch.sort(w[:, sl], dim=1).values
        distinct = 1 + (part[:, 1:] != part[:, :-1]).sum(dim=1)  # per row
        row = int(distinct.argmax())
        if int(distinct[row]) > best[0]:
            best = (int(distinct[row]), row, gi)
    return best


def grid_levels(weight: torch.Tensor, group_size: int | None) -> int:
    """Max number of distinct values in any (row, group) of ``weight``: <= 2^b for a b-bit grid."""
    return grid_levels_where(weight, group_size)[0]


def block_linear_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The block linears' weights (``model.layers.*.{self_attn,mlp}.*_proj.weight``) of a HF checkpoint."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    out = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            parts = name.split(".")
            if ".layers." in name and name.endswith(".weight") and len(parts) >= 2 and parts[-2] in BLOCK_LINEARS:
                out[name] = t
    if not out:
        raise GridError(f"{model_dir}: no block linear weights found")
    return out


def check_grid(model_dir: Path, bits: int, group_size: int | None) -> dict:
    """Raise :class:`GridError` unless every block linear has <= 2^bits values per (row, group)."""
    allowed = 2**bits
    worst = {"levels": 0}
    weights = block_linear_weights(model_dir)
    for name, w in sorted(weights.items()):
        levels, row, group = grid_levels_where(w, group_size)
        if levels > allowed:
            gs = "per-channel" if group_size is None else f"group_size {group_size}"
            raise GridError(
                f"{model_dir}: {name} is not on a {bits}-bit grid: row {row}, group {group} ({gs}) has {levels} "
                f"distinct values > 2^{bits} = {allowed}"
            )
        if levels > worst["levels"]:
            worst = {"levels": levels, "layer": name, "row": row, "group": group}
    return {"allowed": allowed, "layers": len(weights), "max_levels": worst["levels"], "worst": worst}


def check_grid_per_layer(model_dir: Path, layer_bits: dict[str, int], group_size: int | None) -> dict:
    """Mixed precision: raise :class:`GridError` unless every block linear has <= 2^(its bits) values per (row,
    group); return the parameter-weighted average of the assigned bits and of the bits the levels imply."""
    weights = block_linear_weights(model_dir)
    names = {n[: -len(".weight")] for n in weights}
    if names != set(layer_bits):
        raise GridError(f"{model_dir}: layer_bits names {len(layer_bits)} layers, the checkpoint has {len(names)} "
                        f"block linears (missing: {sorted(names - set(layer_bits))[:3]})")
    per_layer, params, assigned, implied = {}, 0, 0, 0
    worst = {"levels": 0}
    for name, w in sorted(weights.items()):
        layer = name[: -len(".weight")]
        bits = int(layer_bits[layer])
        levels, row, group = grid_levels_where(w, group_size)
        if levels > 2**bits:
            gs = "per-channel" if group_size is None else f"group_size {group_size}"
            raise GridError(f"{model_dir}: {name} is not on its {bits}-bit grid: row {row}, group {group} ({gs}) has "
                            f"{levels} distinct values > 2^{bits} = {2**bits}")
        need = max(1, (levels - 1).bit_length())  # ceil(log2(levels))
        per_layer[layer] = {"bits": bits, "max_levels": levels, "implied_bits": need}
        params += w.numel()
        assigned += w.numel() * bits
        implied += w.numel() * need
        if levels > worst["levels"]:
            worst = {"levels": levels, "layer": name, "row": row, "group": group}
    counts = {}
    for v in per_layer.values():
        counts[v["bits"]] = counts.get(v["bits"], 0) + 1
    return {"layers": len(weights), "avg_bits": assigned / params, "avg_bits_implied": implied / params,
            "layers_per_bits": {str(k): counts[k] for k in sorted(counts)}, "max_levels": worst["levels"],
            "worst": worst, "per_layer": per_layer}


# ---------------------------------------------------------------------------------------------- settings
def setting_spec(setting: str) -> tuple[int, int | None, dict]:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny" / f"{setting}.yaml").read_text())
    return int(cfg["quant"]["bits"]), cfg["quant"]["group_size"], cfg


def layer_shapes(model_path: str) -> list[tuple[int, int]]:
    """(out, in) of every block linear of the model (from its config, no weights loaded)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    h, inter = c.hidden_size, c.intermediate_size
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or h // heads
    per_block = [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd), (inter, h), (inter, h), (h, inter)]
    return per_block * c.num_hidden_layers


def storage_bits(model_path: str, bits: int, group: int | None, layer_bits: list[int] | None = None) -> float:
    """Bits per weight incl. an fp16 scale + b-bit zero per group/row (hiq.quant.bits ``storage``); ``layer_bits``:
    each block linear's own bits, in ``layer_shapes`` order (mixed precision)."""
    from hiq.quant.bits import average_bits, average_bits_over_layers

    shapes = layer_shapes(model_path)
    per = layer_bits if layer_bits is not None else [bits] * len(shapes)
    return average_bits_over_layers(
        (o * i, average_bits(b, group, i, convention="storage")) for (o, i), b in zip(shapes, per, strict=True)
    )


LINEAR_PATHS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")  # layer_shapes order


# ---------------------------------------------------------------------------------------------- calibration
def write_calibration(out: Path, cfg: dict, model_path: str, nsamples: int | None = None) -> tuple[Path, dict]:
    """``<out>/calibration.pt``: the windows ``hiq fit`` calibrates on (int64 [nsamples, seqlen]); idempotent.
    ``nsamples`` other than the config's: ``<out>/calibration-<n>.pt``, the same data section with n windows."""
    from transformers import AutoConfig, AutoTokenizer

    from hiq.modules import CalibrationData

    data = dict(cfg["data"])
    stem = "calibration"
    if nsamples is not None and nsamples != data["nsamples"]:
        data["nsamples"] = nsamples
        stem = f"calibration-{nsamples}"
    path = out / f"{stem}.pt"
    meta_path = out / f"{stem}.json"
    meta = {"dataset": data["dataset"], "split": data["split"], "nsamples": data["nsamples"],
            "seqlen": data["seqlen"], "seed": data["seed"], "model": model_path}
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("source") == meta:
        return path, json.loads(meta_path.read_text())
    tok = AutoTokenizer.from_pretrained(model_path)
    max_context = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    dm = CalibrationData(dataset=data["dataset"], split=data["split"], nsamples=data["nsamples"],
                         seqlen=data["seqlen"], seed=data["seed"], tokenizer_path=model_path)
    windows = dm.windows(tok, max_context).to(torch.int64).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(windows, path)
    info = {"source": meta, "count": int(windows.shape[0]), "length": int(windows.shape[1]),
            "seed": data["seed"], "dataset": f"{data['dataset']} {data['split']}"}
    meta_path.write_text(json.dumps(info, indent=2) + "\n")
    return path, info


# ---------------------------------------------------------------------------------------------- runners
def _run(cmd: list[str], logfile: Path) -> float:
    log("$ " + shlex.join(cmd))
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(logfile, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        tail = "".join(logfile.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"command failed ({proc.returncode}); see {logfile}:\n{tail}")
    return time.time() - t0


def _show(cmd: list[str]) -> str:
    """A command as printed under the table: ``hiq ...`` for hiq, paths relative to the repo."""
    if cmd[: len(HIQ)] == HIQ:
        cmd = ["hiq", *cmd[len(HIQ):]]
    # the bundled model wherever the imported hiq lives (a PYTHONPATH snapshot of the package, say)
    return shlex.join(re.sub(r"^\S*/hiq/assets/tiny-llama$", "hiq/assets/tiny-llama",
                             str(c).replace(str(ROOT) + os.sep, "")) for c in cmd)


def _rel(path: str | Path) -> str:
    return str(path).replace(str(ROOT) + os.sep, "")


def eval_command(model: str, output: Path, quick: int | None) -> list[str]:
    cmd = [*HIQ, "eval", f"--model.path={model}", "--quant.method=none", "--evaluation.datasets=[wikitext2,c4]",
           "--evaluation.batch_size=4", f"--output={output}"]
    if quick:
        cmd.append(f"--evaluation.max_windows={quick}")
    return cmd


def run_rtn(setting: str, bits: int, group: int | None, d: Path, model_path: str, reuse: Path | None,
            quick: int | None) -> dict:
    out = d / "eval.json"
    cmd = [*HIQ, "eval", "--config", "configs/tiny/rtn-w2.yaml", f"--quant.bits={bits}",
           f"--quant.group_size={group if group is not None else 'null'}",
           "--quant.avg_bits_convention=weights_only", f"--output={out}"]
    if quick:
        cmd.append(f"--evaluation.max_windows={quick}")
    if not out.is_file():
        src = reuse / setting / "rtn.json" if reuse else None  # benchmarks/ablation.py ran the identical command
        if src is not None and not quick and src.is_file():
            log(f"rtn: reusing finished {src}")
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, out)
            (d / "reused_from.txt").write_text(f"{src}\n")
        else:
            _run(cmd, d / "eval.log")
    r = json.loads(out.read_text())
    notes = []
    if (d / "reused_from.txt").is_file():
        notes.append(f"reused from {_rel((d / 'reused_from.txt').read_text().strip())} (benchmarks/ablation.py, same "
                     f"hiq eval command)")
    return {"setting_note": "", "avg_bits": float(bits), "avg_bits_storage": storage_bits(model_path, bits, group),
            "wikitext2_ppl": r["wikitext2_ppl"], "c4_ppl": r["c4_ppl"], "seconds": r["wall_time_s"],
            "peak_rss_mb": (r.get("memory") or {}).get("peak_rss_mb"), "commands": [_show(cmd)], "notes": notes}


def run_peer(method: str, bits: int, group: int | None, d: Path, model_path: str, calibration: Path,
             peers_python: Path, quick: int | None, extra: list[str] | None = None) -> dict:
    qcmd = [str(peers_python), str(QUANTIZE), "--method", method, "--bits", str(bits),
            "--group-size", str(group) if group is not None else "none", "--calibration", str(calibration),
            "--model", model_path, "--out", str(d), *(extra or [])]
    peer_json = d / "peer.json"
    if not peer_json.is_file():
        if not Path(peers_python).is_file():
            raise RuntimeError(f"peer venv python {peers_python} missing; run: bash benchmarks/peer_tools/setup.sh")
        shutil.rmtree(d / "model", ignore_errors=True)
        _run(qcmd, d / "quantize.log")
    peer = json.loads(peer_json.read_text())
    grid_json = d / "grid.json"
    mixed = peer.get("layer_bits") is not None
    if not grid_json.is_file():
        if mixed:
            grid = check_grid_per_layer(d / "model", peer["layer_bits"], group)
        else:
            grid = check_grid(d / "model", bits, group)  # raises GridError: the row fails loudly
        grid_json.write_text(json.dumps(grid, indent=2) + "\n")
    grid = json.loads(grid_json.read_text())
    if mixed:
        log(f"{d.name}: grid ok per layer (<= 2^bits of each layer), avg code bits {grid['avg_bits']:.4f} "
            f"(implied by the levels {grid['avg_bits_implied']:.4f}), layers per bits {grid['layers_per_bits']}")
    else:
        log(f"{d.name}: grid ok, max {grid['max_levels']} distinct values per (row, group) <= {grid['allowed']}")
    ecmd = eval_command(str(d / "model"), d / "eval.json", quick)
    if not (d / "eval.json").is_file():
        _run(ecmd, d / "eval.log")
    r = json.loads((d / "eval.json").read_text())
    q_rss, e_rss = peer.get("peak_rss_mb"), r.get("memory", {}).get("peak_rss_mb")
    notes = list(peer.get("notes", []))
    opts = peer.get("options", {})
    if opts.get("seed") is not None or opts.get("iters") is not None:
        notes.append(f"iters {opts.get('iters')}, nsamples {opts.get('nsamples')}, seed {opts.get('seed')}, "
                     f"amp {opts.get('amp')}")
    notes.append(f"quantize {peer['seconds']:.0f} s ({peer['tool']} {peer['version']}), eval "
                 f"{r['wall_time_s']:.0f} s (shared machine, not a timing); peak RSS quantize {q_rss} MiB / eval "
                 f"{e_rss} MiB")
    avg_bits, setting_note, per_layer = float(bits), peer.get("setting_note", "").split(" (")[0], None
    if mixed:
        avg_bits = grid["avg_bits"]
        setting_note = (f"target {peer['avg_bits_target']:.2f}, layers per bits {grid['layers_per_bits']}, "
                        f"levels imply {grid['avg_bits_implied']:.3f}")
        lb = {k.split("layers.")[1].split(".", 1)[1] + "@" + k.split("layers.")[1].split(".")[0]: v
              for k, v in peer["layer_bits"].items()}
        n_blocks = len(peer["layer_bits"]) // len(LINEAR_PATHS)
        per_layer = [int(lb[f"{path}@{i}"]) for i in range(n_blocks) for path in LINEAR_PATHS]
    return {"setting_note": setting_note, "avg_bits": avg_bits, "avg_bits_target": peer.get("avg_bits_target"),
            "avg_bits_storage": storage_bits(model_path, bits, group, per_layer), "wikitext2_ppl": r["wikitext2_ppl"],
            "c4_ppl": r["c4_ppl"], "seconds": peer["seconds"] + r["wall_time_s"],
            "peak_rss_mb": max(x for x in (q_rss, e_rss) if x is not None) if (q_rss or e_rss) else None,
            "commands": [_show(qcmd), _show(ecmd)], "notes": notes}


def run_hiq(method: str, setting: str, d: Path, reuse: Path | None, quick: int | None) -> dict:
    abl_name, options = HIQ_FIT_ROWS[method]
    cmd = [*HIQ, "fit", "--config", f"configs/tiny/{setting}.yaml", f"--trainer.default_root_dir={d}", *options]
    if quick:
        cmd.append(f"--evaluation.max_windows={quick}")
    notes = []
    if not (d / "metrics.json").is_file():
        src = reuse / setting / abl_name if reuse else None
        if src is not None and not quick and (src / "metrics.json").is_file():
            log(f"{method}: reusing finished run {src}")
            if d.exists():
                shutil.rmtree(d)
            shutil.copytree(src, d)
            (d / "reused_from.txt").write_text(f"{src}\n")
        else:
            _run(cmd, d.parent / f"{d.name}.log")
    if (d / "reused_from.txt").is_file():
        notes.append(f"reused from {_rel((d / 'reused_from.txt').read_text().strip())} (benchmarks/ablation.py, same "
                     f"hiq fit options)")
    m = json.loads((d / "metrics.json").read_text())
    seconds = sum(v for k, v in m["stage_seconds"].items() if k != "export")
    return {"setting_note": m.get("setting", ""), "avg_bits": m["avg_bits"], "avg_bits_storage": m["avg_bits_storage"],
            "wikitext2_ppl": m["wikitext2_ppl"], "c4_ppl": m["c4_ppl"], "seconds": seconds,
            "peak_rss_mb": (m.get("memory") or {}).get("peak_rss_mb"), "commands": [_show(cmd)], "notes": notes}


# ---------------------------------------------------------------------------------------------- table
def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(rows: list[dict], calib: dict, reuse: Path | None, quick: int | None) -> str:
    lines = ["| method | setting | avg bits | avg bits (storage) | WikiText-2 ppl | C4-sample ppl | wall time s "
             "(shared machine, not a timing) | peak memory MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = r["label_setting"] + (f" ({r['setting_note']})" if r.get("setting_note") else "")
        if r.get("error"):
            lines.append(f"| {r['label']} | {setting} | - | - | - | - | - | - |")
            continue
        lines.append(f"| {r['label']} | {setting} | {r['avg_bits']:.3f} | {r['avg_bits_storage']:.3f} | "
                     f"{r['wikitext2_ppl']:.2f} | {r['c4_ppl']:.2f} | {r['seconds']:.0f} | "
                     f"{_fmt(r['peak_rss_mb'], '.0f')} |")
    notes = [""]
    if calib:
        notes.append(
            f"Calibration (every calibrated method: GPTQ, AWQ, AutoRound, hiq): {calib['count']} windows x "
            f"{calib['length']} tokens of {calib['dataset']}, seed {calib['seed']}, written once by "
            f"hiq.modules.CalibrationData to calibration.pt (hiq fit draws the identical windows itself); "
            f"RTN and HQQ use no data.")
    notes += [
        "avg bits = code bits per weight (b; hiq rows: metrics.json avg_bits). avg bits (storage) adds an fp16 "
        "scale + b-bit zero per group or row for every row alike (hiq.quant.bits 'storage').",
        "All perplexities from `hiq eval` (peers: their dequantised checkpoint with --quant.method=none). Peer "
        "checkpoints passed the grid check (<= 2^b distinct values per row and group; AutoScheme rows: b = each "
        "layer's own bits, avg bits = their parameter-weighted mean) before scoring.",
        "Wall time: RTN = hiq eval; peers = quantize + hiq eval; hiq rows = sum of stage_seconds (Fisher, M, "
        "ratios, reconstruction, evaluation; export off). Peak memory = max RSS of the processes of the row.",
    ]
    if quick:
        notes.append(f"QUICK RUN: evaluation on the first {quick} windows of each set only; not comparable.")
    if reuse:
        notes.append(f"--reuse {_rel(reuse)}: rows marked 'reused' (hiq fit runs, RTN eval JSON) were copied from "
                     f"finished runs there (benchmarks/ablation.py, identical commands), not recomputed.")
    notes.append("")
    for r in rows:
        head = f"- {r['label']}, {r['label_setting']}:"
        if r.get("error"):
            notes.append(f"{head} {'' if r['error'].startswith('not run') else 'FAILED: '}{r['error']}")
            continue
        for n in r["notes"]:
            head += f" {n};"
        notes.append(head.rstrip(";"))
        for c in r["commands"]:
            notes.append(f"  - `{c}`")
    return "\n".join(lines + notes)


def fp_perplexities(out: Path, quick: int | None) -> tuple[float, float]:
    """FP WikiText-2 / C4-sample perplexity of the bundled model (`hiq eval --config configs/tiny/fp.yaml`)."""
    d = out / "fp"
    cmd = [*HIQ, "eval", "--config", "configs/tiny/fp.yaml", f"--output={d / 'eval.json'}"]
    if quick:
        cmd.append(f"--evaluation.max_windows={quick}")
    if not (d / "eval.json").is_file():
        _run(cmd, d / "eval.log")
    r = json.loads((d / "eval.json").read_text())
    return r["wikitext2_ppl"], r["c4_ppl"]


def render_matched(rows: list[dict], frontiers: dict[str, str], fp: tuple[float, float]) -> str:
    """autoround-scheme rows against hiq's frontier run at the same budget: degradation = ppl - FP ppl and
    the ratio hiq / AutoRound per test set (issue #12's target: <= 0.75 on both)."""
    lines = [f"FP: WikiText-2 {fp[0]:.2f}, C4-sample {fp[1]:.2f}. Degradation = ppl - FP ppl; ratio = hiq degradation "
             f"/ AutoRound-AutoScheme degradation (target <= 0.75).", "",
             "| setting | budget | hiq code bits | AutoScheme code bits | hiq WikiText-2 | AutoScheme WikiText-2 | "
             "hiq C4 | AutoScheme C4 | Δ WikiText-2 hiq / AR | ratio WikiText-2 | Δ C4 hiq / AR | ratio C4 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    commands = []
    for r in sorted(rows, key=lambda r: (r.get("setting", ""), r.get("budget") or 0)):
        if r.get("method") not in SCHEMES or r.get("error") or r["setting"] not in frontiers:
            continue
        run = Path(frontiers[r["setting"]]) / f"{r['budget']:.3f}"
        setting = r["setting"] + {"autoround-scheme-ext": " (AR sym + alg_ext)",
                                  "autoround-scheme-best-ext": " (AR best + sym + alg_ext)"}.get(r["method"], "")
        if not (run / "metrics.json").is_file():
            lines.append(f"| {setting} | {r['budget']:.2f} | (no hiq run at {_rel(run)}) | {r['avg_bits']:.3f} "
                         f"| - | "
                         f"{r['wikitext2_ppl']:.2f} | - | {r['c4_ppl']:.2f} | - | - | - | - |")
            continue
        m = json.loads((run / "metrics.json").read_text())
        dh = (m["wikitext2_ppl"] - fp[0], m["c4_ppl"] - fp[1])
        da = (r["wikitext2_ppl"] - fp[0], r["c4_ppl"] - fp[1])
        ratio = [h / a if a > 0 else float("nan") for h, a in zip(dh, da, strict=True)]
        lines.append(f"| {setting} | {r['budget']:.2f} | {m['avg_bits']:.3f} | {r['avg_bits']:.3f} | "
                     f"{m['wikitext2_ppl']:.2f} | {r['wikitext2_ppl']:.2f} | {m['c4_ppl']:.2f} | {r['c4_ppl']:.2f} | "
                     f"{dh[0]:.2f} / {da[0]:.2f} | {ratio[0]:.2f} | {dh[1]:.2f} / {da[1]:.2f} | {ratio[1]:.2f} |")
        commands.append(f"- {setting} {r['budget']:.2f}: hiq `{_rel(run)}` (benchmarks/frontier.py); AutoScheme "
                        + "; ".join(f"`{c}`" for c in r["commands"]))
    return "\n".join(lines + [""] + commands)


def _finished(method: str, d: Path, setting: str, reuse: Path | None) -> bool:
    """Whether a row can be read back without computing (its cache, or a --reuse source, is complete)."""
    if method == "rtn":
        return (d / "eval.json").is_file() or bool(reuse and (reuse / setting / "rtn.json").is_file())
    if method in PEERS or method.startswith("autoround-scheme"):
        return (d / "peer.json").is_file() and (d / "eval.json").is_file()
    src = reuse / setting / HIQ_FIT_ROWS[method][0] if reuse else None
    return (d / "metrics.json").is_file() or bool(src and (src / "metrics.json").is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["w2", "w3", "w2-g128", "w3-g128", "w2-g64"],
                   help="configs/tiny/<setting>.yaml (w2, w2-g128, w2-g64, w3, w3-g128, w3-g64)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                   help="default: every method but the opt-in AutoRound variants (autoround-fp32, autoround-best, "
                        "autoround-ext, autoround-best-ext, autoround-scheme, autoround-scheme-ext, "
                        "autoround-scheme-best-ext)")
    p.add_argument("--out", default="runs/bench", help="cache: <out>/<setting>/<method>/")
    p.add_argument("--reuse", default=None, help="copy finished <reuse>/<setting>/{lwc,ours} hiq runs and "
                                                 "<reuse>/<setting>/rtn.json (e.g. runs/ablation, written by "
                                                 "benchmarks/ablation.py with the identical commands) instead of "
                                                 "recomputing those rows")
    p.add_argument("--peers-venv-dir", default=str(ROOT),
                   help="directory holding .venv-peers and .venv-peers-autoround (benchmarks/peer_tools/setup.sh)")
    p.add_argument("--eval-max-windows", type=int, default=None,
                   help="quick plumbing runs: score only the first N windows per eval set (not comparable)")
    p.add_argument("--keep-going", action="store_true", help="a failed row is reported in the table")
    p.add_argument("--cached-only", action="store_true",
                   help="compute nothing: print the table of the finished rows, the others as 'not run'")
    p.add_argument("--budgets", type=float, nargs="+", default=None,
                   help="autoround-scheme: AutoScheme avg_bits per row (code bits); default bits + 0.05 0.10 0.20 "
                        "of each setting; a budget outside (bits, bits + 1) of a setting is skipped there")
    p.add_argument("--autoround-seed", type=int, default=42,
                   help="seed of the autoround-fp32 / -best / -scheme rows (42 = AutoRound's default; any other "
                        "seed is cached in its own <row>-seed<S> directory)")
    p.add_argument("--frontier", nargs="+", default=[], metavar="SETTING=DIR",
                   help="hiq frontier runs (benchmarks/frontier.py --out DIR) to set against autoround-scheme at "
                        "matched budgets: DIR/<budget:.3f>/metrics.json")
    p.add_argument("--fp-ppl", type=float, nargs=2, default=None, metavar=("WIKITEXT2", "C4"),
                   help="FP perplexities for the degradation columns (default: `hiq eval --config "
                        "configs/tiny/fp.yaml`, cached in <out>/fp/eval.json)")
    p.add_argument("--matched-out", default=None, help="also write the matched-bits table (markdown) here")
    args = p.parse_args(argv)

    from hiq.model import resolve_model_path

    out = Path(args.out).resolve()
    reuse = Path(args.reuse).resolve() if args.reuse else None
    model_path = resolve_model_path("tiny-llama")
    specs = {s: setting_spec(s) for s in args.settings}
    datas = {json.dumps(c["data"], sort_keys=True) for _, _, c in specs.values()}
    if len(datas) != 1:
        raise SystemExit("the settings' data sections differ; run them in separate --out directories")
    first_cfg = next(iter(specs.values()))[2]
    if any(c["model"]["path"] != "tiny-llama" for _, _, c in specs.values()):
        raise SystemExit("peer_table.py benchmarks the bundled tiny-llama only")
    calibration, calib = None, None
    if any(m in CALIBRATED or m in PEERS for m in args.methods):  # quantize.py takes --calibration always
        calibration, calib = write_calibration(out, first_cfg, model_path)
        log(f"calibration {calibration}: {calib['count']} x {calib['length']} tokens, seed {calib['seed']}")
    calibration_best = None
    if any(m in USES_BEST_CALIBRATION for m in args.methods):
        calibration_best, calib_best = write_calibration(out, first_cfg, model_path, nsamples=BEST_NSAMPLES)
        log(f"calibration {calibration_best}: {calib_best['count']} x {calib_best['length']} tokens (autoround-best)")

    rows = []
    for setting, (bits, group, _) in specs.items():
        jobs = []
        for method in [m for m in METHODS if m in args.methods]:
            if method not in SCHEMES:
                jobs.append((method, None))
                continue
            budgets = args.budgets or [bits + 0.05, bits + 0.10, bits + 0.20]
            jobs += [(method, round(b, 3)) for b in budgets if bits < b < bits + 1]
        for method, budget in jobs:
            name = method if budget is None else f"{method}-{budget:.2f}"
            seeded = method in AUTOROUND_VARIANTS and args.autoround_seed != 42  # 42: AutoRound's default seed
            if seeded:
                name += f"-seed{args.autoround_seed}"
            d = out / setting / name
            row = {"label": LABELS[method] + ("" if budget is None else f", target {budget:.2f}")
                   + (f", seed {args.autoround_seed}" if seeded else ""),
                   "label_setting": f"{setting}: {setting_label(bits, group)}",
                   "method": method, "setting": setting, "budget": budget}
            log(f"{setting} / {d.name} ...")
            t0 = time.time()
            if args.cached_only and not _finished(method, d, setting, reuse):
                row["error"] = "not run (no finished result in the cache; rerun without --cached-only)"
                rows.append(row)
                continue
            try:
                if method == "rtn":
                    row.update(run_rtn(setting, bits, group, d, model_path, reuse, args.eval_max_windows))
                elif method in PEERS:
                    python = Path(args.peers_venv_dir) / PEER_VENVS[method] / "bin" / "python"
                    extra = list(AUTOROUND_VARIANTS.get(method, []))
                    if method in AUTOROUND_VARIANTS:
                        extra += ["--seed", str(args.autoround_seed)]
                    if budget is not None:
                        extra += ["--avg-bits", f"{budget}", "--scheme-bits", str(bits), str(bits + 1)]
                    qmethod = "autoround-scheme" if method in SCHEMES else \
                        "autoround" if method.startswith("autoround") else method
                    row.update(run_peer(qmethod, bits, group, d, model_path,
                                        calibration_best if method in USES_BEST_CALIBRATION else calibration, python,
                                        args.eval_max_windows, extra))
                else:
                    row.update(run_hiq(method, setting, d, reuse, args.eval_max_windows))
            except (RuntimeError, GridError, FileNotFoundError) as err:
                if not args.keep_going:
                    raise
                row["error"] = str(err).splitlines()[0]
                log(f"{setting} / {method} FAILED: {err}")
            log(f"{setting} / {method} done in {time.time() - t0:.0f} s")
            rows.append(row)
    table = render(rows, calib, reuse, args.eval_max_windows)
    if args.frontier:
        fp = args.fp_ppl or fp_perplexities(out, args.eval_max_windows)
        frontiers = dict(item.split("=", 1) for item in args.frontier)
        matched = render_matched(rows, frontiers, fp)
        table += "\n\n" + matched
        if args.matched_out:
            Path(args.matched_out).write_text(matched + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    print(table)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())

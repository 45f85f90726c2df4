"""Write every ``hiq fit`` config under configs/ from one commented template, so all settings stay consistent.

    python scripts/make_configs.py          # (re)write configs/{tiny,llama-2-7b,llama-2-13b}/*.yaml
    python scripts/make_configs.py --check  # exit 1 if a file differs from what this script would write

Budgets (``target_avg_bits``, weight bits only; scale/zero overhead is not part of the budget) follow the
paper's Tables 1-2 "Avg. bit" column. For grouped settings the paper's figure includes the group overhead,
so the weight budget is that figure minus the overhead the same tables print for the plain b-bit group
setting: W2A16g128 2.25 - 0.15 = 2.10, W2A16g64 2.30 - 0.24 = 2.06, W3A16g128 3.25 - 0.15 = 3.10,
W3A16g64 3.30 - 0.24 = 3.06. Per channel the paper prints 2.20 (W2) and 3.13 (W3). 2.20 is the largest
budget the paper's candidates reach (every layer at 0.2); the configs' candidates also hold 0 and ratios up to 1
(the whole layer at b_H), so every budget from b_N to b_H is reachable and 2.20 leaves the MILP a choice. The
LLaMA configs keep 2.20 to match the paper; the tiny W2 config uses 2.10 (`make demo`, the README's results).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {  # name: (bits_low, bits_high, group_size, paper avg bits, weight budget)
    "w2": (2, 3, None, "2.20", 2.20),
    "w2-g128": (2, 3, 128, "2.25", 2.10),
    "w2-g64": (2, 3, 64, "2.30", 2.06),
    "w3": (3, 4, None, "3.13", 3.13),
    "w3-g128": (3, 4, 128, "3.25", 3.10),
    "w3-g64": (3, 4, 64, "3.30", 3.06),
}

MODELS = {
    "tiny": {
        "path": "tiny-llama", "what": "the bundled tiny LLaMA (2.2M parameters, 8 blocks)", "dtype": "float32",
        "dtype_note": "float32 on CPU", "accelerator": "auto", "seqlen_note": "-> 512 for the tiny model",
        "m_nsamples": 4, "fidelity": 0, "fisher_batch": 8, "iterations": 200, "batch_size": 8, "eval_batch": 4,
        "tune_batch": 4,
        "tasks": "null", "zs_batch": 32,
        "iter_note": "AutoRound's 200 steps of 8 windows; the paper 5,000; `make demo` stays under 15 min on 2 cores",
        "logger": "  logger: true                # CSV in <run dir>/lightning_logs; W&B: --trainer.logger=WandbLogger",
        "export_dtype": "null",
    },
    "llama-2-7b": {
        "path": "meta-llama/Llama-2-7b-hf", "what": "LLaMA-2-7B (paper Tables 1-4)", "dtype": "bfloat16",
        "dtype_note": "bfloat16 on GPUs", "accelerator": "auto", "seqlen_note": "-> 2048",
        "m_nsamples": 16, "fidelity": 20, "fisher_batch": 1, "iterations": 5000, "batch_size": 1, "eval_batch": 1,
        "tune_batch": 1,
        "tasks": "all", "zs_batch": 16,
        "iter_note": "paper Section 4.1: 5,000", "export_dtype": "float16",
        "logger": ("  logger:                      # W&B as in the paper's runs; files go to <run dir>/wandb\n"
                   "    class_path: lightning.pytorch.loggers.WandbLogger\n"
                   "    init_args:\n"
                   "      project: hiq               # W&B project\n"
                   "      save_dir: null             # null = the run directory (set by hiq fit)"),
    },
}
MODELS["llama-2-13b"] = {**MODELS["llama-2-7b"], "path": "meta-llama/Llama-2-13b-hf",
                         "what": "LLaMA-2-13B (paper Tables 1-2)"}

TEMPLATE = """\
# HiQ {label} (b_N={bl}, b_H={bh}, {gs_text}) on {what}.
# Fisher scores -> matrix M -> HiGHS ratios -> learned-rounding block reconstruction (the quantizers below) -> scale
# tuning -> export -> perplexity.
#   hiq fit --config configs/{model}/{name}.yaml [--trainer.default_root_dir=runs/my-run] [--model.path=...]
# Run directory: run.json, fisher.safetensors, sensitivity/, ratios.json, plots/, blocks/, tuning.safetensors,
# packed/, model/, eval/, metrics.json. Rerunning with the same run directory resumes at the first unfinished stage
# or block (every artifact checked against its checksum and key); another recipe there is refused (--overwrite=true
# replaces it).
# Written by scripts/make_configs.py.
# Sections quant/ratios/sensitivity/reconstruction are the Recipe (hiq.recipe); the same recipe in Python:
#   hiq.quantize("{path}", recipe=hiq.Recipe(quant=..., ratios=...), calibration=..., run_dir=...)
seed_everything: 0             # Lightning's seed; every stage also has its own explicit seed below
model:
  path: {path}          # a save_pretrained dir, a hub id, or tiny-llama (bundled)
  dtype: {dtype}             # weights dtype while quantizing: {dtype_note}
  trust_remote_code: false     # let transformers run code shipped with a hub model
  offload: null                # block weights in host memory during Fisher/tuning/evaluation (null: auto, when
                               # they take over half the GPU's memory); docs/large-models.md
quant:
  bits: {bl}                       # b_N: bits of the normal columns
  bits_high: {bh}                  # b_H: bits of the high-impact columns (paper: b_N + 1)
  group_size: {gs}             # null = one scale/zero per output row and part; else columns per group
ratios:
  candidates: {candidates}  # candidate ratios B: the paper's
                               # 0.02-0.20 (Section 4.1) plus 0 (all at b_N) and larger ones up to 1 (the whole layer
                               # at b_H); README "Wider candidate ratios". The paper's: {paper_candidates}
  target_avg_bits: {budget}          # budget: mean weight bits over the block linears, group overhead excluded
                               # ({budget_note})
  mode: optimal                # optimal (MILP of Eq. 9) | uniform | fixed (ablations)
  fixed_ratio: null            # the ratio for mode=fixed
  time_limit: 300              # seconds for HiGHS
  mip_rel_gap: 0.0             # 0 = prove optimality
data:
  dataset: wikitext2           # calibration text: WikiText-2 train (bundled, <unk> tokens variant)
  split: train
  nsamples: 128                # calibration windows (paper: 128)
  seqlen: null                 # tokens per window; null = min(2048, model context) {seqlen_note}
  seed: 0                      # window sampling seed
trainer:
  accelerator: {accelerator}            # cpu, cuda, or auto
  devices: 1                   # >1 with --trainer.strategy=ddp: data-parallel Fisher and reconstruction
  default_root_dir: null       # the run directory; null = runs/{model}-{name}-<time>
{logger}
sensitivity:
  nsamples: {m_nsamples}                  # calibration windows per M evaluation (cost grows with it)
  fidelity_assignments: {fidelity}      # random assignments per block to check δᵀMδ/2 against the measured loss
  fidelity_seed: 0
  method: gram                 # gram: 35 block evaluations per block, cross terms from output changes | pairs: 560
  enabled: true                # off only for ratios.mode uniform/fixed
  fisher_batch_size: {fisher_batch}         # windows per forward/backward of the Fisher pass (speed and memory only)
plots:
  enabled: true                # Figure 1/2 analogs in <run dir>/plots
reconstruction:
  iterations: {iterations}           # optimizer steps per block ({iter_note})
  batch_size: {batch_size}                # calibration windows per step, over all processes
  nsamples: null               # windows used; null = all of data.nsamples
  lr_round: 0.001              # AdaRound's V (paper: Adam 1e-3)
  weight_decay_round: 1.0e-05  # paper: 1e-5
  lr_lwc: 0.01                 # LWC clipping logits (OmniQuant's default), no weight decay
  round_weight: 0.01           # λ of the rounding regulariser, for the per-token summed squared error
  warmup: 0.2                  # share of steps before the regulariser starts
  beta_start: 20.0             # regulariser exponent (the paper's γ) annealed 20 -> 2
  beta_end: 2.0
  high_quantizer: {high_quantizer:<15}# high-impact columns: adaround (the paper) | lwc | signround
  normal_quantizer: {normal_quantizer:<13}# normal columns: lwc (the paper) | signround (both parts or neither)
  lwc_init: 4.0                # initial clipping logits (OmniQuant: 4.0)
  lr_signround: null           # SignRound's step size; null = 1 / iterations (AutoRound's default)
  lr_schedule: {lr_schedule:<16}# constant (the paper) | linear (decay to 0)
  clip_init: {clip_init:<18}# SignRound's clipping starts at minmax | search (input-weighted best RTN grid)
  loss_trim: {loss_trim:<18}# share of the largest squared errors left out of the loss (AutoRound ext: 0.001)
  keep_best: {keep_best:<18}# restore the lowest-batch-loss step's parameters (AutoRound's; off: the last step's)
  gradient_clip_val: 1.0       # gradient norm clipping of each block fit
  log_every_n_steps: 25
  seed: 0                      # sample order
  enabled: true
  tune_steps: {tune_steps:<17}# end-to-end scale tuning after the last block (hiq.tuning; 0 = off, the paper):
                               # every layer's scales fitted to the FP model's next-token distributions
  tune_lr: {tune_lr:<20}# its Adam lr on the log scales, linear decay to 0
  tune_batch_size: {tune_batch:<12}# calibration windows per tuning step, over all processes
export:
  formats: [packed, dequantized]  # packed/ (deployable, bit-packed codes) | model/ (dequantised) | compressed-tensors
  dtype: {export_dtype}                  # dtype of model/ (null = the source checkpoint's dtype)
  enabled: true
evaluation:
  datasets: [wikitext2, c4]    # WikiText-2 test; C4 = the bundled validation sample (256 windows)
  seqlen: null                 # null = min(2048, model context)
  max_windows: null            # null = all windows
  batch_size: {eval_batch}
  tasks: {tasks:<22}# zero-shot via lm-eval (hiq[eval]): piqa, arc_easy, arc_challenge, hellaswag, winogrande, all
  limit: null                  # first N documents per zero-shot task (quick runs); null = all
  zeroshot_batch_size: {zs_batch:<8}# lm-eval requests per forward pass
  enabled: true
"""


#: the reconstruction preset of every config (hiq.recipe.RECONSTRUCTION_PRESETS; the README says why)
PRESET = "signround"


def _listed(ratios: tuple[float, ...]) -> str:
    """A YAML flow list of ratios as the configs print them: [0, 0.02, ...]."""
    return "[" + ", ".join("0" if c == 0 else f"{c:.2f}" for c in ratios) + "]"


def render(model: str, name: str) -> str:
    from hiq.recipe import DEFAULT_CANDIDATES, PAPER_CANDIDATES, RECONSTRUCTION_PRESETS

    bl, bh, gs, paper, budget = SETTINGS[name]
    m = MODELS[model]
    preset = {k: str(v).lower() for k, v in RECONSTRUCTION_PRESETS[PRESET].items()}
    # the last step's rounding at W2, the lowest batch loss's at W3: what measured better at each on the bundled model
    # (three seeds each, benchmarks/results/levers_w2_tiny.md)
    preset["keep_best"] = "true" if bl >= 3 else "false"
    if model == "tiny" and name == "w2":
        budget = 2.10
        budget_note = f"paper Table avg bits {paper}; 2.10 is the README's results and `make demo`"
    elif gs is None:
        budget_note = f"paper Table avg bits {paper}"
    else:
        budget_note = f"paper Table avg bits {paper} incl. group overhead; see scripts/make_configs.py"
    label = f"W{bl}A16" + ("" if gs is None else f"g{gs}")
    return TEMPLATE.format(
        label=label, bl=bl, bh=bh, gs="null" if gs is None else gs,
        gs_text="per-channel" if gs is None else f"groups of {gs}", model=model, name=name,
        budget=f"{budget:.2f}", budget_note=budget_note, candidates=_listed(DEFAULT_CANDIDATES),
        paper_candidates=_listed(PAPER_CANDIDATES), **preset, **m)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args()
    stale = []
    for model in MODELS:
        for name in SETTINGS:
            path = ROOT / "configs" / model / f"{name}.yaml"
            text = render(model, name)
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(str(path))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if stale:
        print("out of date (run python scripts/make_configs.py):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

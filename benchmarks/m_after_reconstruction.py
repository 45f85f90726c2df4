#!/usr/bin/env python
"""Does M rank ratio assignments by the block loss they leave *after* reconstruction?

M (paper Eq. 7-8) is measured with round-to-nearest deltas; the block is then reconstructed with learned rounding
(the signround preset), which may change which columns deserve the extra bit. For one block this script:

1. draws ``--assignments`` random per-layer candidate choices (one ratio per linear) whose block-average bits lie
   within ``--tolerance`` of ``--budget`` (the question is which assignment *at the same bits* is better);
2. reconstructs the block for each (``hiq.blockfit.fit_block``, the run's recipe: signround, ``--iters`` steps of 8
   windows, on the full-precision inputs of the calibration windows) and measures its loss on held-out windows;
3. predicts each assignment's loss several ways: δᵀMδ/2 with M from RTN deltas as hiq measures it (``gram`` on
   ``--m-windows`` windows), the same M by ``pairs``, ``gram`` on 4x the windows, δᵀMδ/2 with M from *learned*
   deltas (each layer at each candidate first fitted alone by SignRound on its own output error, then the same Gram
   M), and the measured RTN block loss of the assignment on the held-out windows (the best any RTN-based
   quadratic model could do);
4. prints the Spearman rank correlation of each prediction with the measured post-reconstruction loss.

    python benchmarks/m_after_reconstruction.py [--config configs/tiny/w2.yaml] [--blocks 1 6] \\
        [--assignments 12] [--iters 100] [--out benchmarks/results/m_after_reconstruction_w2.md]

Fisher scores: ``--fisher RUN/fisher.safetensors`` from any run of the same model and calibration windows (e.g.
``make demo``'s); quality only, timings are not reported.
"""

from __future__ import annotations

import argparse
import random
import sys
import types
from pathlib import Path

import torch
import yaml
from torchmetrics.functional import spearman_corrcoef

import hiq
from hiq.artifacts import load_tensors
from hiq.blockfit import SignSGD, fit_block, reconstruction_loss
from hiq.data import calibration_windows, load_text, tokenize_text
from hiq.layouts import layout_for
from hiq.model import BlockInputs, block_outputs, capture_block_inputs, find_blocks, load_model_and_tokenizer
from hiq.quant.hybrid import HybridLinear
from hiq.sensitivity import (
    SensitivitySettings,
    assignment_vector,
    gram_matrix,
    measure_block,
    quantized_candidates,
    swapped_weights,
)


def layer_inputs(block, inputs, linears) -> dict:
    """Each linear's input over the given windows, (tokens, in_features)."""
    seen: dict = {lin: [] for lin in linears}
    hooks = [lin.register_forward_pre_hook(lambda m, a: seen[m].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for lin in linears]
    try:
        block_outputs(block, inputs)
    finally:
        for h in hooks:
            h.remove()
    return {lin: torch.cat(x) for lin, x in seen.items()}


def learned_weight(lin, x: torch.Tensor, scores, ratio: float, q, steps: int) -> torch.Tensor:
    """The weight SignRound finds for this layer alone at this ratio (lowest output error of ``steps`` signed steps)."""
    hybrid = HybridLinear(lin, scores, ratio, q.bits_high, q.bits, q.group_size, "signround", 4.0, "signround")
    params = list(hybrid.parameters())
    optimizer = SignSGD(params, lr=1.0 / steps)
    ref = x @ lin.weight.detach().T
    best, best_state = float("inf"), None
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = (1.0 / steps) * (1.0 - step / steps)  # linear decay to 0, as AutoRound
        loss = (x @ hybrid.quantized_weight().T - ref).pow(2).sum(-1).mean()
        if loss.item() < best:
            best, best_state = loss.item(), [p.detach().clone() for p in params]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hybrid.project()
    with torch.no_grad():
        for p, saved in zip(params, best_state, strict=True):
            p.copy_(saved)
    return hybrid.finish().dequantize().to(lin.weight.dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny/w2.yaml")
    p.add_argument("--fisher", required=True, help="fisher.safetensors of a run of this config")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 6])
    p.add_argument("--assignments", type=int, default=12)
    p.add_argument("--iters", type=int, default=100, help="reconstruction steps per assignment")
    p.add_argument("--layer-steps", type=int, default=100, help="SignRound steps per layer for the learned deltas")
    p.add_argument("--m-windows", type=int, default=4)
    p.add_argument("--fit-windows", type=int, default=64)
    p.add_argument("--test-windows", type=int, default=16)
    p.add_argument("--budget", type=float, default=None, help="block-average bits of the assignments (default: the "
                                                                "config's target_avg_bits)")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--candidates", type=float, nargs="+", default=None,
                   help="candidate ratios (default: the config's; the README's table: 0.02 0.05 0.1 0.15 0.2)")
    args = p.parse_args(argv)

    cfg = yaml.safe_load(Path(args.config).read_text())
    if args.candidates:
        cfg["ratios"]["candidates"] = args.candidates
    recipe = hiq.Recipe.from_dict({k: cfg[k] for k in ("quant", "ratios", "sensitivity", "reconstruction")})
    q, cands = recipe.quant, recipe.ratios.candidates
    opts = hiq.ReconstructionOptions(**{**vars(recipe.reconstruction), "iterations": args.iters})
    model, tok = load_model_and_tokenizer(cfg["model"]["path"])
    model.eval()
    ids = tokenize_text(tok, load_text(cfg["data"]["dataset"], cfg["data"]["split"]))
    seqlen = cfg["data"]["seqlen"] or min(2048, model.config.max_position_embeddings)
    n = args.fit_windows + args.test_windows
    windows = calibration_windows(ids, n, seqlen, cfg["data"]["seed"])
    fisher = load_tensors(Path(args.fisher))["scores"]
    layout = layout_for(model)
    rt = types.SimpleNamespace(device=torch.device("cpu"), is_global_zero=False, logger=None, world_size=1,
                               run=types.SimpleNamespace(root=Path("/tmp")))
    job = types.SimpleNamespace(recipe=types.SimpleNamespace(reconstruction=opts, quant=q), rt=rt, layout=layout,
                                budget=recipe.ratios.target_avg_bits)
    settings = SensitivitySettings(tuple(cands), q.bits, q.bits_high, q.group_size)

    inputs = capture_block_inputs(model, windows)
    rows = []
    for b in range(max(args.blocks) + 1):
        block = find_blocks(model)[b]
        if b in args.blocks:
            rows.append(study_block(b, block, inputs, fisher, layout, model, settings, job, q, args))
        with torch.no_grad():
            inputs = inputs.with_hidden(block_outputs(block, inputs))

    lines = [f"M against the block loss after reconstruction: `{' '.join(['python', *sys.argv])}`", "",
             f"{args.config}; per block {args.assignments} random assignments at "
             f"{args.budget or recipe.ratios.target_avg_bits} ± {args.tolerance} block-average bits, each "
             f"reconstructed with {args.iters} signround steps of 8 windows on {args.fit_windows} "
             f"full-precision-path windows, loss measured on {args.test_windows} other windows; M on "
             f"{args.m_windows} windows.", "",
             "Spearman rank correlation of each prediction with the loss after reconstruction:", "",
             f"| block | gram M, {args.m_windows} windows (hiq's default) | pairs M, {args.m_windows} windows | "
             f"gram M, {4 * args.m_windows} windows | gram M of learned deltas | RTN block loss, measured | "
             "post-reconstruction loss range |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['gram']:.3f} | {r['pairs']:.3f} | {r['gram_more']:.3f} | "
                     f"{r['learned']:.3f} | {r['rtn_loss']:.3f} | "
                     f"{min(r['measured']):.4g} .. {max(r['measured']):.4g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def study_block(b, block, inputs, fisher, layout, model, settings, job, q, args) -> dict:
    k = len(settings.candidates)
    scores = layout.block_part(fisher, model, b)
    names, linears, rtn_weights = quantized_candidates(block, scores, settings)
    fit_idx = list(range(args.fit_windows))
    test_idx = list(range(args.fit_windows, args.fit_windows + args.test_windows))
    m_inputs, fit_inputs, test_inputs = (_subset(inputs, fit_idx[: args.m_windows]), _subset(inputs, fit_idx),
                                         _subset(inputs, test_idx))
    m_rtn, _, _ = gram_matrix(block, m_inputs, linears, lambda i, m: rtn_weights[i][m], k)
    m_pairs = measure_block(block, m_inputs, scores, settings, method="pairs")["matrix"]
    m_more, _, _ = gram_matrix(block, _subset(inputs, fit_idx[: 4 * args.m_windows]), linears,
                                lambda i, m: rtn_weights[i][m], k)
    xs = layer_inputs(block, m_inputs, linears)
    print(f"[block {b}] learned deltas for {len(linears)} x {k} (layer, ratio) pairs", file=sys.stderr, flush=True)
    learned = [[learned_weight(lin, xs[lin], scores[name], r, q, args.layer_steps) for r in settings.candidates]
               for name, lin in zip(names, linears, strict=True)]
    m_learned, _, _ = gram_matrix(block, m_inputs, linears, lambda i, m: learned[i][m], k)
    with torch.no_grad():
        fit_targets = block_outputs(block, fit_inputs)
        test_targets = block_outputs(block, test_inputs)
    state = {n: t.clone() for n, t in block.state_dict().items()}
    rng = random.Random(args.seed + b)
    sizes = [lin.weight.numel() for lin in linears]
    budget = args.budget if args.budget is not None else job.budget

    def avg_bits(choice: list[int]) -> float:
        return q.bits + (q.bits_high - q.bits) * sum(
            n * settings.candidates[m] for n, m in zip(sizes, choice, strict=True)) / sum(sizes)

    preds: dict[str, list[float]] = {"gram": [], "pairs": [], "gram_more": [], "learned": []}
    rtn_loss, measured = [], []
    for a in range(args.assignments):
        choice = [rng.randrange(k) for _ in names]
        while abs(avg_bits(choice) - budget) > args.tolerance:
            choice = [rng.randrange(k) for _ in names]
        delta = assignment_vector(choice, k)
        for name, m in (("gram", m_rtn), ("pairs", m_pairs), ("gram_more", m_more), ("learned", m_learned)):
            preds[name].append(0.5 * float(delta @ m @ delta))
        with swapped_weights({linears[i]: rtn_weights[i][m] for i, m in enumerate(choice)}):
            total, tokens = reconstruction_loss(block, test_inputs, test_targets, None)
        rtn_loss.append(total / tokens)
        ratios = {name: settings.candidates[m] for name, m in zip(names, choice, strict=True)}
        layers, _ = fit_block(block, job.layout, b, scores, ratios, fit_inputs, fit_targets, job.recipe.quant,
                              job.recipe.reconstruction, job.rt, f"block {b} #{a}")  # installs the records
        total, tokens = reconstruction_loss(block, test_inputs, test_targets, None)
        measured.append(total / tokens)
        block.load_state_dict(state)
        print(f"[block {b}] assignment {a}: ratios {[settings.candidates[m] for m in choice]} -> rtn "
              f"{rtn_loss[-1]:.4g}, after reconstruction {measured[-1]:.4g}", file=sys.stderr, flush=True)
    meas = torch.tensor(measured)

    def rho(x):
        return float(spearman_corrcoef(torch.tensor(x), meas))

    return {"block": b, **{name: rho(v) for name, v in preds.items()}, "rtn_loss": rho(rtn_loss),
            "measured": measured}


def _subset(inputs: BlockInputs, idx: list[int]) -> BlockInputs:
    """The windows ``idx`` of equal-length calibration inputs (one shared set of block arguments)."""
    return BlockInputs([inputs.hidden[i] for i in idx], [inputs.shared_kwargs()], [0] * len(idx))


if __name__ == "__main__":
    raise SystemExit(main())

"""The matrix M of paper Eq. 7-8, measured per transformer block on cached block inputs.

Block reconstruction loss ``L(Δ) = (1/N) Σ_n ||f_block(X_n; W+Δ) - f_block(X_n; W)||_F²`` (paper Eq. 3,
N calibration samples). ``Δ_{l,m}`` is the mixed-precision RTN error of layer l with its top ``B_m`` columns
(by Fisher score) at ``bits_high`` and the rest at ``bits_low`` (:func:`hiq.quant.mixed.mixed_fake_quant`).

* diagonal ``M[(l,m),(l,m)] = 2·L(Δ_{l,m})``
* same block, ``l1 ≠ l2``: ``M[(l1,m1),(l2,m2)] = L(Δ_{l1,m1}+Δ_{l2,m2}) − L(Δ_{l1,m1}) − L(Δ_{l2,m2})``
* different blocks: 0 (so M is stored per block).

Two ways to get the same-block cross terms (``method``):

* ``pairs`` (the paper's definition): one block evaluation per pair of perturbations. Per LLaMA block with
  K=5: 35 single and 525 pair evaluations.
* ``gram`` (the default): only the 35 single perturbations are run; each one's output change
  ``D_{l,m} = f(X; W+Δ_{l,m}) − f(X; W)`` is kept and the cross term is ``2⟨D_{l1,m1}, D_{l2,m2}⟩/N`` — what
  ``L(Δ1+Δ2) − L(Δ1) − L(Δ2)`` is when the two output changes add up, ``f(W+Δ1+Δ2) − f(W) ≈ D1 + D2``
  (first order in the deltas). The diagonal is the same measured ``2·L(Δ_{l,m})``. 16x fewer block
  evaluations at K=5 (35 instead of 560 per LLaMA block). What the first-order step drops is checked the same
  way as for ``pairs``: :func:`quadratic_fidelity` against measured losses of whole-block assignments.

Either way two candidates of one layer are never chosen together, so those entries are 0.

Index of (layer l, candidate m) inside a block: ``l * K + m``.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hiq.model import BlockInputs, block_linears, run_block
from hiq.quant.mixed import mixed_fake_quant
from hiq.recipe import DEFAULT_CANDIDATES, SENSITIVITY_METHODS


@dataclass(frozen=True)
class SensitivitySettings:
    candidates: tuple[float, ...] = DEFAULT_CANDIDATES
    bits_low: int = 2
    bits_high: int = 3
    group_size: int | None = None

    def to_dict(self) -> dict:
        return {"candidates": list(self.candidates), "bits_low": self.bits_low, "bits_high": self.bits_high,
                "group_size": self.group_size}


@contextlib.contextmanager
def swapped_weights(replacements: dict[nn.Linear, torch.Tensor]) -> Iterator[None]:
    """Temporarily give linears new weights; the originals are restored bit-exactly afterwards."""
    saved = {lin: lin.weight.data for lin in replacements}
    try:
        for lin, w in replacements.items():
            lin.weight.data = w
        yield
    finally:
        for lin, w in saved.items():
            lin.weight.data = w


class BlockLoss:
    """``L(Δ)`` for one block: squared distance of its outputs to the full-precision outputs, mean over samples."""

    def __init__(self, block: nn.Module, inputs: BlockInputs, device: torch.device | str | None = None):
        self.block = block
        self.inputs = inputs
        self.device = device
        self.n_samples = sum(h.shape[0] for h in inputs.hidden)
        self.targets = self._outputs()
        self.evaluations = 0

    @torch.no_grad()
    def _outputs(self) -> list[torch.Tensor]:
        return [run_block(self.block, h, self.inputs.kwargs_for(i), self.device).float()
                for i, h in enumerate(self.inputs.hidden)]

    @torch.no_grad()
    def __call__(self, replacements: dict[nn.Linear, torch.Tensor]) -> float:
        total = 0.0
        with swapped_weights(replacements):
            for i, h in enumerate(self.inputs.hidden):
                out = run_block(self.block, h, self.inputs.kwargs_for(i), self.device).float()
                total += (out - self.targets[i]).pow(2).sum().item()
        self.evaluations += 1
        return total / self.n_samples


def candidate_weight(lin: nn.Linear, scores: torch.Tensor, ratio: float, settings: SensitivitySettings) -> torch.Tensor:
    """The mixed-precision fake-quantised weight of one linear with its top ``ratio`` columns at ``bits_high``."""
    return mixed_fake_quant(lin.weight.data, scores, ratio, settings.bits_high, settings.bits_low,
                            settings.group_size).to(lin.weight.dtype)


def candidate_weights(lin: nn.Linear, scores: torch.Tensor, settings: SensitivitySettings) -> list[torch.Tensor]:
    """:func:`candidate_weight` for every candidate ratio."""
    return [candidate_weight(lin, scores, r, settings) for r in settings.candidates]


def block_layers(block: nn.Module, scores: dict[str, torch.Tensor]) -> tuple[list[str], list[nn.Linear]]:
    """The block's linears (names, modules) in execution order; every one must have impact scores."""
    names, linears = [], []
    for name, lin in block_linears(block):
        if name not in scores:
            raise KeyError(f"no impact scores for layer {name!r} (have {sorted(scores)[:4]}...)")
        names.append(name)
        linears.append(lin)
    return names, linears


def quantized_candidates(
    block: nn.Module, scores: dict[str, torch.Tensor], settings: SensitivitySettings
) -> tuple[list[str], list[nn.Linear], list[list[torch.Tensor]]]:
    """For every linear of the block and every candidate ratio, the mixed-precision fake-quantised weight — K copies
    of the block's weights at once (the measurements below hold one layer's K at a time instead)."""
    names, linears = block_layers(block, scores)
    return names, linears, [candidate_weights(lin, scores[n], settings) for n, lin in zip(names, linears, strict=True)]


#: bytes of output changes ``gram_matrix`` holds at once (windows are taken in chunks that fit; at least one)
CHANGES_BUDGET = 1 << 30


def measure_block(
    block: nn.Module,
    inputs: BlockInputs,
    scores: dict[str, torch.Tensor],
    settings: SensitivitySettings,
    device: torch.device | str | None = None,
    method: str = "gram",
) -> dict:
    """M for one block (float64, (L*K, L*K)) plus the single losses and cost figures (``method``: see the module
    docstring)."""
    if method not in SENSITIVITY_METHODS:
        raise ValueError(f"sensitivity method {method!r}; choose one of {', '.join(SENSITIVITY_METHODS)}")
    t0 = time.time()
    names, linears = block_layers(block, scores)
    k = len(settings.candidates)

    def weights_of(l_idx: int) -> list[torch.Tensor]:
        return candidate_weights(linears[l_idx], scores[names[l_idx]], settings)

    if method == "gram":
        def weight_of(l_idx: int, m: int) -> torch.Tensor:
            return candidate_weight(linears[l_idx], scores[names[l_idx]], settings.candidates[m], settings)

        matrix, single, n_samples = gram_matrix(block, inputs, linears, weight_of, k, device)
        return {"layers": names, "matrix": matrix, "single_losses": single, "settings": settings.to_dict(),
                "method": method, "evaluations": single.numel(), "samples": n_samples,
                "seconds": time.time() - t0}
    n_layers = len(names)
    loss = BlockLoss(block, inputs, device)
    single = torch.zeros(n_layers, k, dtype=torch.float64)
    for l_idx in range(n_layers):
        weights = weights_of(l_idx)
        for m in range(k):
            single[l_idx, m] = loss({linears[l_idx]: weights[m]})
    size = n_layers * k
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for l_idx, m in itertools.product(range(n_layers), range(k)):
        matrix[l_idx * k + m, l_idx * k + m] = 2.0 * single[l_idx, m]
    first: tuple[int, list[torch.Tensor]] | None = None  # one layer's K weights per side of a pair at a time
    for l1, l2 in itertools.combinations(range(n_layers), 2):
        if first is None or first[0] != l1:
            first = (l1, weights_of(l1))
        w1, w2 = first[1], weights_of(l2)
        for m1, m2 in itertools.product(range(k), range(k)):
            pair = loss({linears[l1]: w1[m1], linears[l2]: w2[m2]})
            value = pair - single[l1, m1] - single[l2, m2]
            matrix[l1 * k + m1, l2 * k + m2] = value
            matrix[l2 * k + m2, l1 * k + m1] = value
    return {
        "layers": names,
        "matrix": matrix,
        "single_losses": single,
        "settings": settings.to_dict(),
        "method": method,
        "evaluations": loss.evaluations,
        "samples": loss.n_samples,
        "seconds": time.time() - t0,
    }


@torch.no_grad()
def gram_matrix(block: nn.Module, inputs: BlockInputs, linears: list[nn.Linear],
                weight_of: Callable[[int, int], torch.Tensor], k: int, device=None,
                budget: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(M, single losses, samples) from the Gram matrix of the output changes of the single perturbations
    ``weight_of(l, m)`` (layer ``linears[l]`` given that weight, the others unchanged).

    Windows are taken in chunks whose L*K output changes fit ``budget`` bytes (:data:`CHANGES_BUDGET`; at least one
    window); per chunk each candidate weight is made once and dropped before the next, so one layer's weight is held
    beside the block, never the block's K copies. Each window's inner products are accumulated in
    float64 in window order: the result does not depend on the chunking.
    """
    n_layers = len(linears)
    size = n_layers * k
    budget = CHANGES_BUDGET if budget is None else budget
    gram = torch.zeros(size, size, dtype=torch.float64)
    n_samples, start = 0, 0
    while start < len(inputs.hidden):
        chunk = [start]
        per_window = size * inputs.hidden[start][0].numel() * 4
        while chunk[-1] + 1 < len(inputs.hidden) and (len(chunk) + 1) * per_window <= budget:
            chunk.append(chunk[-1] + 1)
        start = chunk[-1] + 1
        targets = [run_block(block, inputs.hidden[i], inputs.kwargs_for(i), device).float().reshape(-1)
                   for i in chunk]
        changes = [t.new_empty(size, t.numel()) for t in targets]
        for l_idx, m in itertools.product(range(n_layers), range(k)):
            with swapped_weights({linears[l_idx]: weight_of(l_idx, m)}):
                for j, i in enumerate(chunk):
                    out = run_block(block, inputs.hidden[i], inputs.kwargs_for(i), device).float().reshape(-1)
                    torch.sub(out, targets[j], out=changes[j][l_idx * k + m])
        for j, i in enumerate(chunk):
            gram += (changes[j] @ changes[j].T).double().cpu()
            n_samples += inputs.hidden[i].shape[0]
        del changes, targets
    gram /= n_samples
    # two candidates of one layer are never chosen together: those entries are 0 (the diagonal stays)
    same_layer = torch.block_diag(*[torch.ones(k, k, dtype=torch.bool)] * n_layers) & ~torch.eye(size, dtype=bool)
    matrix = torch.where(same_layer, 0.0, 2.0 * gram)
    return matrix, gram.diagonal().clone().reshape(n_layers, k), n_samples


def assignment_vector(choice: list[int], k: int) -> torch.Tensor:
    """δ of one per-layer candidate choice (``choice[l]`` = candidate index of layer l): 1 at ``l * k + choice[l]``."""
    delta = torch.zeros(len(choice) * k, dtype=torch.float64)
    delta[[l_idx * k + m for l_idx, m in enumerate(choice)]] = 1.0
    return delta


def quadratic_fidelity(
    block: nn.Module,
    inputs: BlockInputs,
    scores: dict[str, torch.Tensor],
    settings: SensitivitySettings,
    matrix: torch.Tensor,
    n_assignments: int = 50,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict:
    """How well δᵀMδ/2 predicts the measured block loss when all layers are perturbed together.

    Draws ``n_assignments`` random per-layer candidate choices; returns the Spearman rank correlation between
    the prediction and the measurement, and both series.
    """
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    names, linears = block_layers(block, scores)
    n_layers, k = len(linears), len(settings.candidates)
    loss = BlockLoss(block, inputs, device)
    rng = random.Random(seed)
    predicted, measured = [], []
    for _ in range(n_assignments):
        choice = [rng.randrange(k) for _ in range(n_layers)]
        delta = assignment_vector(choice, k)
        predicted.append(0.5 * float(delta @ matrix @ delta))
        measured.append(loss({linears[i]: candidate_weight(linears[i], scores[names[i]], settings.candidates[m],
                                                           settings) for i, m in enumerate(choice)}))
    p, m = torch.tensor(predicted), torch.tensor(measured)
    return {
        "spearman": float(spearman_corrcoef(p, m)),
        "pearson": float(pearson_corrcoef(p, m)),
        "predicted": predicted,
        "measured": measured,
        "n_assignments": n_assignments,
    }

"""Layer-wise high-impact ratio assignment: the MILP of Eq. 9 in arXiv 2511.17801, solved exactly with HiGHS.

Problem
-------
A model has ``L`` linear layers (``nn.Linear`` inside transformer blocks) and ``K`` candidate ratios
``B = (r_1, ..., r_K)``.  Layer ``l`` with ratio ``r`` keeps its top ``r`` fraction of input columns at
``bits_high`` (b_H) bits and the rest at ``bits_low`` (b_N) bits, i.e. ``b_N + r * (b_H - b_N)`` bits per
weight.  A one-hot ``delta[l, m]`` picks one ratio per layer; the method minimises ``delta^T M delta``
subject to::

    sum_l n_l * (b_N + r_l * (b_H - b_N))  <=  target_avg_bits * sum_l n_l        (n_l = parameters of l)

``M`` is block-diagonal over transformer blocks, so it is passed as one symmetric matrix per block,
indexed ``l_local * K + m`` (``l_local`` = position of the layer among the layers of its block).  Its
diagonal is ``2 * L(Delta_{l,m})``; off-diagonal entries (pairs of distinct layers of one block) may
be negative.

Bit accounting
--------------
The budget counts **weight bits only**: the scale / zero-point overhead of per-channel or grouped
quantization is *not* included.  This matches how the papers print e.g. "2.20 bits" for per-channel
W2 rows (``hiq.quant.bits`` computes storage-inclusive figures when those are wanted).

How it is solved
----------------
``mode="optimal"`` builds an exact MILP and hands it to HiGHS (``highspy``).  ``M`` is never passed as
a Hessian: HiGHS refuses integer QPs and may silently mis-solve non-convex continuous QPs.  Instead
each product ``delta[l1, m1] * delta[l2, m2]`` of two distinct layers of one block becomes a continuous
``y >= 0`` tied to the binaries by the tight one-hot linearisation::

    sum_{m2} y[(l1, m1), (l2, m2)] = delta[l1, m1]    for every m1
    sum_{m1} y[(l1, m1), (l2, m2)] = delta[l2, m2]    for every m2

which forces ``y = delta[l1, m1] * delta[l2, m2]`` at every integer ``delta``.  Products of two
candidates of the *same* layer vanish under the one-hot constraint and ``delta_i^2 = delta_i``, so the
objective is ``sum_i M[i, i] delta_i + sum_{pairs} (M[a, b] + M[b, a]) y_ab``: the MILP optimum *is*
the optimum of Eq. 9 (up to ``mip_rel_gap``, default 0).

``mode="uniform"`` (one ratio for all layers: the largest candidate that fits the budget) and
``mode="fixed"`` (a given ratio in [0, 1] for every layer) are the paper's baselines.

Outcomes of the MILP
--------------------
* optimal: returned with ``status="Optimal"`` and HiGHS's ``mip_gap``;
* time limit (or another early stop) *with* a feasible incumbent: returned with HiGHS's status string
  (e.g. ``"Time limit reached"``) and the remaining gap, plus a ``RuntimeWarning``;
* time limit or any other stop *without* a feasible incumbent: ``RuntimeError`` naming the status.

An infeasible budget is detected by :func:`check_budget` before any model is built (``ValueError``
naming the achievable range).  The returned assignment always satisfies the budget up to 1e-9 bits
(recomputed in numpy; a violation would raise ``RuntimeError``).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hiq.layouts import LayerInfo  # the solver's view of a layer (re-exported: hiq.solver.LayerInfo)

__all__ = [
    "MODES",
    "LayerInfo",
    "MilpSize",
    "RatioSolution",
    "achievable_range",
    "assignment_objective",
    "average_bits",
    "check_budget",
    "check_target",
    "milp_size",
    "solve_ratios",
]

MODES: tuple[str, ...] = ("optimal", "uniform", "fixed")

# An average that exceeds the target by no more than this (relative to max(1, target)) is float round-off
# and counts as fitting.  Used by check_budget, uniform, fixed, and as the slack of the MILP budget row.
_FIT_RTOL = 1e-12
# Hard guarantee on the returned assignment: achieved_avg_bits <= target_avg_bits + _VERIFY_TOL.
_VERIFY_TOL = 1e-9
# HiGHS primal / MIP feasibility tolerance (its lower bound is 1e-10); keeps the budget row tight.
_HIGHS_FEAS_TOL = 1e-10
# Relative asymmetry of a block matrix above which it is rejected rather than symmetrised.
_SYM_RTOL = 1e-6


@dataclass
class MilpSize:
    """Dimensions of the MILP built for an instance (for logs and reports)."""

    n_binary: int
    n_continuous: int
    n_rows: int
    n_nonzeros: int


@dataclass
class RatioSolution:
    """The ratio chosen for every layer, with the figures that describe the choice (``ratios.json``).

    Attributes:
        mode: ``"optimal"``, ``"uniform"`` or ``"fixed"``.
        layers: per layer, in input order: ``name``, ``block``, ``ratio``, ``bits``
            (= ``bits_low + ratio * (bits_high - bits_low)``), ``n_params``, ``candidate_index``
            (index into ``candidates``, or ``None`` for a fixed ratio that is not a candidate).
        achieved_avg_bits: parameter-weighted average weight bits of the assignment.
        target_avg_bits: the budget it was solved for.
        objective: ``delta^T M delta`` of the assignment, recomputed in numpy from the (symmetrised)
            block matrices; ``None`` when no matrices were given or a fixed ratio is not a candidate.
        mip_gap: HiGHS's relative MIP gap for ``"optimal"``; ``None`` for the closed-form modes.
        solve_time_s: wall time of building and solving (seconds).
        status: HiGHS model status string (``"Optimal"``, ``"Time limit reached"``, ...) for
            ``"optimal"``; ``"closed form"`` for ``"uniform"`` / ``"fixed"``.
        bits_low: b_N.
        bits_high: b_H.
        candidates: the candidate ratios, in the order of the matrix columns.
        model_size: dimensions of the MILP (``"optimal"`` only).
    """

    mode: str
    layers: list[dict[str, Any]]
    achieved_avg_bits: float
    target_avg_bits: float
    objective: float | None
    mip_gap: float | None
    solve_time_s: float
    status: str
    bits_low: float
    bits_high: float
    candidates: tuple[float, ...]
    model_size: MilpSize | None = None
    budget_counts: str = field(default="weight bits only (scale / zero-point overhead excluded)")

    @property
    def ratios(self) -> dict[str, float]:
        """``{layer name: ratio}``."""
        return {entry["name"]: entry["ratio"] for entry in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (non-finite floats become ``None``)."""
        out = asdict(self)
        out["candidates"] = list(self.candidates)
        for key in ("achieved_avg_bits", "target_avg_bits", "objective", "mip_gap", "solve_time_s"):
            value = out[key]
            if value is not None and not math.isfinite(value):
                out[key] = None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RatioSolution:
        """Inverse of :meth:`to_dict` (e.g. to resume a run from its ``ratios.json``)."""
        data = dict(data)
        size = data.pop("model_size", None)
        data["candidates"] = tuple(data["candidates"])
        data["layers"] = [dict(entry) for entry in data["layers"]]
        return cls(**data, model_size=MilpSize(**size) if size is not None else None)

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` to ``path`` atomically (temporary file in the same folder + ``os.replace``)."""
        from hiq.artifacts import atomic_write_bytes

        path = Path(path)
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n").encode())
        return path

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> RatioSolution:
        """Load a file written by :meth:`write_json`."""
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))


# ----------------------------------------------------------------------------------------------------------------
# Validation and budget arithmetic
# ----------------------------------------------------------------------------------------------------------------


def _fmt_candidates(candidates: Sequence[float]) -> str:
    return "(" + ", ".join(f"{c:g}" for c in candidates) + ")"


def _validate_candidates(candidates: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(c) for c in candidates)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"candidates must be a sequence of numbers, got {candidates!r}") from exc
    if not values:
        raise ValueError("candidates must not be empty")
    for c in values:
        if not (math.isfinite(c) and 0.0 <= c <= 1.0):
            raise ValueError(f"candidate ratio {c!r} is outside [0, 1] (candidates {candidates!r})")
    seen: set[float] = set()
    for c in values:
        if c in seen:
            raise ValueError(f"candidate ratio {c:g} appears more than once in {_fmt_candidates(values)}")
        seen.add(c)
    return values


def _validate_bits(bits_low: float, bits_high: float) -> None:
    for name, value in (("bits_low", bits_low), ("bits_high", bits_high)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not bits_low < bits_high:
        raise ValueError(f"bits_low must be smaller than bits_high, got bits_low={bits_low} and bits_high={bits_high}")


def _validate_layers(layers: Sequence[LayerInfo]) -> None:
    if len(layers) == 0:
        raise ValueError("layers must not be empty")
    names: set[str] = set()
    for layer in layers:
        if not isinstance(layer, LayerInfo):
            raise ValueError(f"layers must be LayerInfo instances, got {layer!r}")
        if layer.name in names:
            raise ValueError(f"layer name {layer.name!r} appears more than once")
        names.add(layer.name)
        if isinstance(layer.n_params, bool) or not isinstance(layer.n_params, (int, np.integer)) or layer.n_params <= 0:
            raise ValueError(f"layer {layer.name!r}: n_params must be a positive integer, got {layer.n_params!r}")
        if isinstance(layer.block, bool) or not isinstance(layer.block, (int, np.integer)) or layer.block < 0:
            raise ValueError(f"layer {layer.name!r}: block must be a non-negative integer, got {layer.block!r}")


def _bits_per_weight(ratio: float, bits_low: float, bits_high: float) -> float:
    return bits_low + ratio * (bits_high - bits_low)


def _fits(avg_bits: float, target_avg_bits: float) -> bool:
    return avg_bits <= target_avg_bits + _FIT_RTOL * max(1.0, abs(target_avg_bits))


def average_bits(ratios: Sequence[float], layers: Sequence[LayerInfo], bits_low: float, bits_high: float) -> float:
    """Parameter-weighted average weight bits when layer ``i`` gets ratio ``ratios[i]`` (:mod:`hiq.quant.bits`)."""
    from hiq.quant.bits import ratio_average_bits

    return ratio_average_bits(ratios, [layer.n_params for layer in layers], bits_low, bits_high)


def achievable_range(
    layers: Sequence[LayerInfo], candidates: Sequence[float], bits_low: float, bits_high: float
) -> tuple[float, float]:
    """``(min_avg_bits, max_avg_bits)`` reachable with the candidate ratios (all layers at the smallest / largest)."""
    _validate_layers(layers)
    values = _validate_candidates(candidates)
    _validate_bits(bits_low, bits_high)
    return _bits_per_weight(min(values), bits_low, bits_high), _bits_per_weight(max(values), bits_low, bits_high)


def check_target(target_avg_bits: float, candidates: Sequence[float], bits_low: float,
                 bits_high: float) -> tuple[float, float]:
    """The one budget rule of a run (``hiq.Recipe`` checks it before any model loads, the ratio stage's callback
    again with the model's layers through :func:`check_budget`): the target inside ``b_N + r·(b_H − b_N)`` for the
    smallest and the largest candidate ``r``. Returns that range; ``ValueError`` naming the value and the fix."""
    values = _validate_candidates(candidates)
    _validate_bits(bits_low, bits_high)
    if isinstance(target_avg_bits, bool) or not isinstance(target_avg_bits, (int, float, np.integer, np.floating)) \
            or not math.isfinite(target_avg_bits):
        raise ValueError(f"ratios.target_avg_bits={target_avg_bits!r}; give a finite number of bits")
    lo, hi = _bits_per_weight(min(values), bits_low, bits_high), _bits_per_weight(max(values), bits_low, bits_high)
    if not lo - 1e-9 <= target_avg_bits <= hi + 1e-9:
        fix = ("lower it or add larger ratios to ratios.candidates" if target_avg_bits > hi else
               "raise it or add smaller ratios (0 = no high-impact columns) to ratios.candidates")
        raise ValueError(f"ratios.target_avg_bits={target_avg_bits} is infeasible: with candidates "
                         f"{', '.join(f'{c:g}' for c in values)} and bits {bits_low}/{bits_high} the reachable "
                         f"average is {lo:.3f} .. {hi:.3f} bits; {fix}")
    return lo, hi


def check_budget(
    target_avg_bits: float,
    layers: Sequence[LayerInfo],
    candidates: Sequence[float],
    bits_low: float,
    bits_high: float,
) -> tuple[float, float]:
    """Fail early (``ValueError``) on a budget no assignment of the candidates can meet.

    Checks the inputs (non-empty layers with positive ``n_params``, candidates non-empty, in [0, 1] and
    distinct, ``0 < bits_low < bits_high``), that ``bits_low <= target_avg_bits <= bits_high``, and that
    the target is not below the smallest achievable average.  A target above the largest achievable
    average is fine (every layer then gets the largest candidate).  Cheap: call it before measuring M.

    Returns:
        ``achievable_range(...)``.
    """
    min_avg, max_avg = achievable_range(layers, candidates, bits_low, bits_high)
    _validate_target(target_avg_bits, bits_low, bits_high)
    if not _fits(min_avg, target_avg_bits):
        raise ValueError(
            f"target_avg_bits={target_avg_bits} is infeasible: with candidates "
            f"{_fmt_candidates(_validate_candidates(candidates))} and bits {bits_low}/{bits_high} the achievable "
            f"average is {min_avg:.3f} .. {max_avg:.3f} bits"
        )
    return min_avg, max_avg


def _validate_target(target_avg_bits: float, bits_low: float, bits_high: float) -> None:
    if isinstance(target_avg_bits, bool) or not isinstance(target_avg_bits, (int, float, np.integer, np.floating)):
        raise ValueError(f"target_avg_bits must be a number, got {target_avg_bits!r}")
    if not math.isfinite(target_avg_bits):
        raise ValueError(f"target_avg_bits must be finite, got {target_avg_bits!r}")
    if target_avg_bits < bits_low or target_avg_bits > bits_high:
        raise ValueError(
            f"target_avg_bits={target_avg_bits} must lie between bits_low={bits_low} and bits_high={bits_high}"
        )


def _block_members(layers: Sequence[LayerInfo], n_blocks: int) -> list[list[int]]:
    """Global layer indices of each block, in input order."""
    members: list[list[int]] = [[] for _ in range(n_blocks)]
    for i, layer in enumerate(layers):
        if layer.block >= n_blocks:
            raise ValueError(
                f"layer {layer.name!r} is in block {layer.block}, but only {n_blocks} block matrices were given"
            )
        members[layer.block].append(i)
    return members


def _validate_matrices(M_blocks: Sequence[np.ndarray], members: list[list[int]], n_candidates: int) -> list[np.ndarray]:
    """Check shape, finiteness and symmetry of every block matrix; return float64 symmetrised copies."""
    out: list[np.ndarray] = []
    for b, (matrix, idx) in enumerate(zip(M_blocks, members, strict=True)):
        arr = np.asarray(matrix, dtype=np.float64)
        size = len(idx) * n_candidates
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
            raise ValueError(f"block {b}: matrix must be square, got shape {tuple(arr.shape)}")
        if arr.shape[0] != size:
            raise ValueError(
                f"block {b}: matrix has shape {tuple(arr.shape)} but the block has {len(idx)} layers x "
                f"{n_candidates} candidates = {size} rows"
            )
        if not np.all(np.isfinite(arr)):
            bad = tuple(int(v) for v in np.argwhere(~np.isfinite(arr))[0])
            raise ValueError(f"block {b}: matrix has a non-finite entry at {bad} ({arr[bad]})")
        asym = float(np.max(np.abs(arr - arr.T))) if size else 0.0
        scale = float(np.max(np.abs(arr))) if size else 0.0
        if asym > _SYM_RTOL * scale:
            raise ValueError(
                f"block {b}: matrix is not symmetric (max |M - M^T| = {asym:.3g}, max |M| = {scale:.3g}, "
                f"relative tolerance {_SYM_RTOL:g})"
            )
        out.append((arr + arr.T) / 2.0)
    return out


def assignment_objective(
    M_blocks: Sequence[np.ndarray], layers: Sequence[LayerInfo], choice: Sequence[int], n_candidates: int
) -> float:
    """``delta^T M delta`` for the one-hot ``delta`` that gives layer ``i`` candidate ``choice[i]``."""
    members = _block_members(layers, len(M_blocks))
    total = 0.0
    for matrix, idx in zip(M_blocks, members, strict=True):
        if not idx:
            continue
        rows = np.array([local * n_candidates + int(choice[g]) for local, g in enumerate(idx)])
        total += float(np.asarray(matrix, dtype=np.float64)[np.ix_(rows, rows)].sum())
    return total


# ----------------------------------------------------------------------------------------------------------------
# MILP
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Milp:
    n_cols: int
    n_rows: int
    cost: np.ndarray
    col_upper: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray
    start: np.ndarray
    index: np.ndarray
    value: np.ndarray
    n_binary: int


def milp_size(layers: Sequence[LayerInfo], n_candidates: int) -> MilpSize:
    """Dimensions of the MILP for these layers and ``n_candidates`` candidate ratios (no model is built).

    Binary: ``L*K``; continuous: ``K^2`` per pair of layers in one block; rows: ``L`` one-hot rows, one
    budget row and ``2K`` linking rows per pair.  Nonzeros assume every candidate ratio is nonzero.
    """
    counts: dict[int, int] = {}
    for layer in layers:
        counts[layer.block] = counts.get(layer.block, 0) + 1
    pairs = sum(c * (c - 1) // 2 for c in counts.values())
    k = n_candidates
    n_layers = len(layers)
    return MilpSize(
        n_binary=n_layers * k,
        n_continuous=pairs * k * k,
        n_rows=n_layers + 1 + pairs * 2 * k,
        n_nonzeros=2 * n_layers * k + pairs * 2 * k + pairs * 2 * k * k,
    )


def _build_milp(
    M_sym: list[np.ndarray],
    layers: Sequence[LayerInfo],
    members: list[list[int]],
    candidates: tuple[float, ...],
    bits_low: float,
    bits_high: float,
    target_avg_bits: float,
) -> _Milp:
    """Assemble the linearised MILP in column-wise (CSC) form.

    Columns: ``delta[l, m]`` at ``l*K + m`` (global layer order), then the ``y`` of each same-block pair.
    Rows: ``0..L-1`` one-hot, ``L`` budget, then per pair ``K`` rows for ``l1`` and ``K`` rows for ``l2``.
    The objective is divided by its largest coefficient so HiGHS's tolerances are scale-free.
    """
    k = len(candidates)
    n_layers = len(layers)
    n_delta = n_layers * k
    total = float(sum(int(layer.n_params) for layer in layers))
    ratios = np.asarray(candidates, dtype=np.float64)

    cost = np.zeros(n_delta)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []

    # One-hot rows: sum_m delta[l, m] = 1.
    delta_cols = np.arange(n_delta)
    rows.append(delta_cols // k)
    cols.append(delta_cols)
    vals.append(np.ones(n_delta))

    # Budget row, in bits above b_N: sum_l (n_l / N) * r_m * (b_H - b_N) * delta[l, m] <= target - b_N.
    weight = np.array([int(layer.n_params) / total for layer in layers])
    budget = (weight[:, None] * ratios[None, :] * (bits_high - bits_low)).ravel()
    nz = budget != 0.0
    rows.append(np.full(int(nz.sum()), n_layers))
    cols.append(delta_cols[nz])
    vals.append(budget[nz])

    y_costs: list[np.ndarray] = []
    next_col = n_delta
    next_row = n_layers + 1
    mm1, mm2 = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")  # y index within a pair: m1*K + m2
    mm1, mm2 = mm1.ravel(), mm2.ravel()
    for matrix, idx in zip(M_sym, members, strict=True):
        for local, g in enumerate(idx):
            cost[g * k : (g + 1) * k] = np.diag(matrix)[local * k : (local + 1) * k]
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                g1, g2 = idx[a], idx[b]
                block = matrix[a * k : (a + 1) * k, b * k : (b + 1) * k]
                y_costs.append(2.0 * block.ravel())  # M[p, q] + M[q, p] of the symmetrised matrix
                y_cols = next_col + np.arange(k * k)
                row_l1 = next_row + mm1  # sum_{m2} y[m1, m2] - delta[l1, m1] = 0
                row_l2 = next_row + k + mm2  # sum_{m1} y[m1, m2] - delta[l2, m2] = 0
                rows += [row_l1, row_l2, next_row + np.arange(k), next_row + k + np.arange(k)]
                cols += [y_cols, y_cols, g1 * k + np.arange(k), g2 * k + np.arange(k)]
                vals += [np.ones(k * k), np.ones(k * k), -np.ones(k), -np.ones(k)]
                next_col += k * k
                next_row += 2 * k

    n_cols, n_rows = next_col, next_row
    full_cost = np.concatenate([cost, *y_costs]) if y_costs else cost
    scale = float(np.max(np.abs(full_cost))) if full_cost.size else 0.0
    if scale > 0.0:
        full_cost = full_cost / scale

    row_idx = np.concatenate(rows)
    col_idx = np.concatenate(cols)
    values = np.concatenate(vals)
    order = np.lexsort((row_idx, col_idx))
    row_idx, col_idx, values = row_idx[order], col_idx[order], values[order]
    start = np.searchsorted(col_idx, np.arange(n_cols + 1)).astype(np.int32)

    row_lower = np.zeros(n_rows)
    row_upper = np.zeros(n_rows)
    row_lower[:n_layers] = 1.0
    row_upper[:n_layers] = 1.0
    row_lower[n_layers] = -np.inf
    row_upper[n_layers] = (target_avg_bits - bits_low) + _FIT_RTOL * max(1.0, abs(target_avg_bits))

    return _Milp(
        n_cols=n_cols,
        n_rows=n_rows,
        cost=full_cost,
        col_upper=np.ones(n_cols),
        row_lower=row_lower,
        row_upper=row_upper,
        start=start,
        index=row_idx.astype(np.int32),
        value=values,
        n_binary=n_delta,
    )


def _solve_milp(milp: _Milp, time_limit: float, mip_rel_gap: float) -> tuple[np.ndarray, str, float]:
    """Run HiGHS; return (delta values, model status string, mip gap).  Raises if no feasible solution."""
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("log_to_console", False)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", float(mip_rel_gap))
    h.setOptionValue("mip_abs_gap", 0.0)
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("primal_feasibility_tolerance", _HIGHS_FEAS_TOL)
    h.setOptionValue("mip_feasibility_tolerance", _HIGHS_FEAS_TOL)

    lp = highspy.HighsLp()
    lp.num_col_ = milp.n_cols
    lp.num_row_ = milp.n_rows
    lp.sense_ = highspy.ObjSense.kMinimize
    lp.col_cost_ = milp.cost
    lp.col_lower_ = np.zeros(milp.n_cols)
    lp.col_upper_ = milp.col_upper
    lp.row_lower_ = milp.row_lower
    lp.row_upper_ = milp.row_upper
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.num_col_ = milp.n_cols
    lp.a_matrix_.num_row_ = milp.n_rows
    lp.a_matrix_.start_ = milp.start
    lp.a_matrix_.index_ = milp.index
    lp.a_matrix_.value_ = milp.value
    integer, continuous = highspy.HighsVarType.kInteger, highspy.HighsVarType.kContinuous
    lp.integrality_ = [integer] * milp.n_binary + [continuous] * (milp.n_cols - milp.n_binary)

    if h.passModel(lp) == highspy.HighsStatus.kError:
        raise RuntimeError("HiGHS rejected the ratio-assignment MILP (passModel returned an error)")
    run_status = h.run()
    model_status = h.getModelStatus()
    status = h.modelStatusToString(model_status)
    info = h.getInfo()
    has_solution = int(info.primal_solution_status) == int(highspy.SolutionStatus.kSolutionStatusFeasible)
    if run_status == highspy.HighsStatus.kError or not has_solution:
        raise RuntimeError(
            f"HiGHS found no feasible ratio assignment: model status {status!r}"
            + (f" (time_limit={time_limit} s)" if model_status == highspy.HighsModelStatus.kTimeLimit else "")
        )
    if model_status != highspy.HighsModelStatus.kOptimal:
        warnings.warn(
            f"HiGHS stopped with status {status!r} before proving optimality; returning its best assignment "
            f"(relative gap {info.mip_gap:.3g})",
            RuntimeWarning,
            stacklevel=3,
        )
    values = np.asarray(h.getSolution().col_value, dtype=np.float64)[: milp.n_binary]
    return values, status, float(info.mip_gap)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------


def solve_ratios(
    M_blocks: Sequence[np.ndarray] | None,
    layers: Sequence[LayerInfo],
    candidates: Sequence[float],
    bits_low: float,
    bits_high: float,
    target_avg_bits: float,
    mode: str = "optimal",
    fixed_ratio: float | None = None,
    time_limit: float = 300.0,
    mip_rel_gap: float = 0.0,
) -> RatioSolution:
    """Assign a high-impact ratio to every layer under an average-bits budget.

    Args:
        M_blocks: one symmetric matrix per transformer block (``len(layers_in_block) * K`` square,
            index ``l_local * K + m``); may be ``None`` for ``"uniform"`` / ``"fixed"`` (then
            ``objective`` is ``None``).  Matrices asymmetric beyond 1e-6 relative are rejected; smaller
            asymmetry is removed with ``(M + M^T) / 2``.
        layers: the layers, see :class:`LayerInfo`.
        candidates: candidate ratios, in the order of the matrix columns (each in [0, 1], distinct).
        bits_low: b_N, bits of the normal columns.
        bits_high: b_H, bits of the high-impact columns.
        target_avg_bits: budget on the parameter-weighted average weight bits (overhead excluded).
        mode: ``"optimal"`` (the MILP), ``"uniform"`` (largest candidate that fits, for all layers) or
            ``"fixed"`` (``fixed_ratio`` for all layers).
        fixed_ratio: the ratio of ``"fixed"`` mode, any value in [0, 1]; must fit the budget.
        time_limit: HiGHS time limit in seconds (``"optimal"``).
        mip_rel_gap: HiGHS relative gap at which to stop (``"optimal"``; 0 = prove optimality).

    Returns:
        A :class:`RatioSolution`.

    Raises:
        ValueError: bad inputs (named in the message) or an infeasible budget (message gives the range).
        RuntimeError: HiGHS ended without a feasible assignment (e.g. time limit hit before one was found).
    """
    t0 = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    values = _validate_candidates(candidates)
    _validate_layers(layers)
    _validate_bits(bits_low, bits_high)
    _validate_target(target_avg_bits, bits_low, bits_high)
    if mode != "fixed":
        check_budget(target_avg_bits, layers, values, bits_low, bits_high)
    if mode == "fixed":
        if fixed_ratio is None:
            raise ValueError("mode='fixed' needs fixed_ratio")
        is_number = isinstance(fixed_ratio, (int, float, np.integer, np.floating)) and not isinstance(fixed_ratio, bool)
        if not (is_number and 0.0 <= fixed_ratio <= 1.0):
            raise ValueError(f"fixed_ratio={fixed_ratio!r} must be a number in [0, 1]")
    elif fixed_ratio is not None:
        raise ValueError(f"fixed_ratio={fixed_ratio!r} is only used with mode='fixed', not mode={mode!r}")
    if mode == "optimal":
        if M_blocks is None:
            raise ValueError("mode='optimal' needs M_blocks")
        if not (time_limit > 0):
            raise ValueError(f"time_limit must be positive, got {time_limit!r}")
        if not (0.0 <= mip_rel_gap < 1.0):
            raise ValueError(f"mip_rel_gap must lie in [0, 1), got {mip_rel_gap!r}")

    M_sym: list[np.ndarray] | None = None
    members: list[list[int]] | None = None
    if M_blocks is not None:
        members = _block_members(layers, len(M_blocks))
        M_sym = _validate_matrices(M_blocks, members, len(values))

    k = len(values)
    size: MilpSize | None = None
    mip_gap: float | None = None
    choice: list[int | None]
    if mode == "uniform":
        fitting = [c for c in values if _fits(_bits_per_weight(c, bits_low, bits_high), target_avg_bits)]
        ratio = max(fitting)  # non-empty: check_budget passed
        ratio_list = [ratio] * len(layers)
        choice = [values.index(ratio)] * len(layers)
        status = "closed form"
    elif mode == "fixed":
        ratio = float(fixed_ratio)  # type: ignore[arg-type]
        bits = _bits_per_weight(ratio, bits_low, bits_high)
        if not _fits(bits, target_avg_bits):
            raise ValueError(
                f"fixed_ratio={fixed_ratio} gives {bits:.4f} bits per weight (bits {bits_low}/{bits_high}), "
                f"above target_avg_bits={target_avg_bits}"
            )
        ratio_list = [ratio] * len(layers)
        matches = [m for m, c in enumerate(values) if abs(c - ratio) <= 1e-12]
        choice = [matches[0] if matches else None] * len(layers)
        status = "closed form"
    else:
        assert M_sym is not None and members is not None
        milp = _build_milp(M_sym, layers, members, values, bits_low, bits_high, target_avg_bits)
        size = MilpSize(
            n_binary=milp.n_binary,
            n_continuous=milp.n_cols - milp.n_binary,
            n_rows=milp.n_rows,
            n_nonzeros=int(milp.value.size),
        )
        delta, status, mip_gap = _solve_milp(milp, time_limit, mip_rel_gap)
        grid = delta.reshape(len(layers), k)
        picked = np.argmax(grid, axis=1)
        if np.any(np.abs(grid - np.eye(k)[picked]) > 1e-3):
            raise RuntimeError("HiGHS returned a ratio assignment that is not one-hot (numerical trouble)")
        choice = [int(m) for m in picked]
        ratio_list = [values[m] for m in choice]

    achieved = average_bits(ratio_list, layers, bits_low, bits_high)
    if achieved > target_avg_bits + _VERIFY_TOL:
        raise RuntimeError(
            f"internal error: the {mode} assignment averages {achieved!r} bits, above target_avg_bits={target_avg_bits}"
        )
    objective: float | None = None
    if M_sym is not None and all(c is not None for c in choice):
        objective = assignment_objective(M_sym, layers, choice, k)  # type: ignore[arg-type]

    per_layer = [
        {
            "name": layer.name,
            "block": int(layer.block),
            "ratio": float(r),
            "bits": _bits_per_weight(float(r), bits_low, bits_high),
            "n_params": int(layer.n_params),
            "candidate_index": c,
        }
        for layer, r, c in zip(layers, ratio_list, choice, strict=True)
    ]
    return RatioSolution(
        mode=mode,
        layers=per_layer,
        achieved_avg_bits=achieved,
        target_avg_bits=float(target_avg_bits),
        objective=objective,
        mip_gap=mip_gap,
        solve_time_s=time.perf_counter() - t0,
        status=status,
        bits_low=bits_low,
        bits_high=bits_high,
        candidates=values,
        model_size=size,
    )

"""Tests of hiq.solver: the ratio-assignment MILP (Eq. 9) against brute force, budgets, baselines, errors, JSON."""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hiq.solver import (
    LayerInfo,
    RatioSolution,
    achievable_range,
    check_budget,
    milp_size,
    solve_ratios,
)

PAPER_CANDIDATES = (0.02, 0.05, 0.10, 0.15, 0.20)
FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------------------
# Instance generators and an independent brute force
# ------------------------------------------------------------------------------------------------------------


def random_instance(seed: int, n_blocks: int, layers_per_block: int, k: int, *, interleave: bool = True):
    """Random layers (blocks possibly interleaved in the list) and random symmetric, indefinite block matrices."""
    rng = np.random.default_rng(seed)
    entries = [(b, j) for b in range(n_blocks) for j in range(layers_per_block)]
    if interleave:
        entries = [entries[i] for i in rng.permutation(len(entries))]
    layers = [LayerInfo(f"blk{b}.lin{j}", b, int(rng.integers(1, 5000))) for b, j in entries]
    blocks = []
    for _ in range(n_blocks):
        n = layers_per_block * k
        a = rng.normal(size=(n, n))
        m = (a + a.T) / 2  # plenty of negative off-diagonal entries
        m[np.diag_indices(n)] = np.abs(np.diag(m)) + rng.uniform(0, 1, size=n)
        blocks.append(m)
    candidates = tuple(float(c) for c in np.sort(rng.choice(np.arange(0, 21) / 20, size=k, replace=False)))
    return layers, blocks, candidates


def gram_instance(seed: int, n_blocks: int = 8, layers_per_block: int = 7, candidates=PAPER_CANDIDATES, rank: int = 12):
    """M = D D^T per block (like D H D^T): errors shrink as the ratio grows; off-diagonals of both signs."""
    rng = np.random.default_rng(seed)
    layers = [
        LayerInfo(f"model.layers.{b}.lin{j}", b, int(rng.integers(1, 20)) * 4096)
        for b in range(n_blocks)
        for j in range(layers_per_block)
    ]
    blocks = []
    for _ in range(n_blocks):
        base = rng.normal(size=(layers_per_block, rank))
        rows = [
            base[j] * (1 - 2 * r) + 0.3 * rng.normal(size=rank) for j in range(layers_per_block) for r in candidates
        ]
        d = np.array(rows)
        blocks.append(d @ d.T)
    return layers, blocks


def full_matrix(layers, blocks, k):
    """The dense L*K x L*K matrix M in global layer order (zero across blocks)."""
    n = len(layers)
    full = np.zeros((n * k, n * k))
    local = {}
    counters: dict[int, int] = {}
    for i, layer in enumerate(layers):
        local[i] = counters.get(layer.block, 0)
        counters[layer.block] = local[i] + 1
    for i, li in enumerate(layers):
        for j, lj in enumerate(layers):
            if li.block == lj.block:
                m = blocks[li.block]
                full[i * k : (i + 1) * k, j * k : (j + 1) * k] = m[
                    local[i] * k : (local[i] + 1) * k, local[j] * k : (local[j] + 1) * k
                ]
    return full


def brute_force(layers, blocks, candidates, bits_low, bits_high, target):
    """Smallest delta^T M delta over all K^L one-hot assignments that fit the budget; also every feasible one."""
    k = len(candidates)
    n = len(layers)
    full = full_matrix(layers, blocks, k)
    choices = np.array(list(itertools.product(range(k), repeat=n)))
    onehot = np.zeros((len(choices), n * k))
    onehot[np.arange(len(choices))[:, None], np.arange(n)[None, :] * k + choices] = 1.0
    objectives = np.einsum("ai,ij,aj->a", onehot, full, onehot)
    weights = np.array([layer.n_params for layer in layers], dtype=np.float64)
    bits = bits_low + np.asarray(candidates)[choices] * (bits_high - bits_low)
    avg = bits @ weights / weights.sum()
    feasible = avg <= target + 1e-11
    return float(objectives[feasible].min()), full


def delta_of(solution: RatioSolution, k: int) -> np.ndarray:
    delta = np.zeros(len(solution.layers) * k)
    for i, entry in enumerate(solution.layers):
        delta[i * k + entry["candidate_index"]] = 1.0
    return delta


def reference_avg_bits(solution: RatioSolution) -> float:
    n = np.array([e["n_params"] for e in solution.layers], dtype=np.float64)
    r = np.array([e["ratio"] for e in solution.layers])
    return float((n * (solution.bits_low + r * (solution.bits_high - solution.bits_low))).sum() / n.sum())


@st.composite
def instances(draw, max_blocks: int = 2, max_layers: int = 3, max_k: int = 3):
    seed = draw(st.integers(0, 2**31 - 1))
    n_blocks = draw(st.integers(1, max_blocks))
    per_block = draw(st.integers(1, max_layers))
    k = draw(st.integers(1, max_k))
    bits_low, bits_high = draw(st.sampled_from([(2, 3), (3, 4), (2, 4)]))
    layers, blocks, candidates = random_instance(seed, n_blocks, per_block, k)
    lo = bits_low + min(candidates) * (bits_high - bits_low)
    hi = bits_low + max(candidates) * (bits_high - bits_low)
    how = draw(st.sampled_from(["inside", "exact", "above", "min"]))
    if how == "inside":
        target = draw(st.floats(lo, hi)) if hi > lo else lo
    elif how == "exact":  # the target is exactly the average of some assignment: the budget row is tight
        rng = np.random.default_rng(seed + 1)
        ratios = np.asarray(candidates)[rng.integers(0, k, size=len(layers))]
        n = np.array([layer.n_params for layer in layers], dtype=np.float64)
        target = float((n * (bits_low + ratios * (bits_high - bits_low))).sum() / n.sum())
    elif how == "above":
        target = draw(st.floats(hi, float(bits_high)))
    else:
        target = lo
    target = min(max(target, float(bits_low)), float(bits_high))
    return layers, blocks, candidates, bits_low, bits_high, target


# ------------------------------------------------------------------------------------------------------------
# Exactness against brute force
# ------------------------------------------------------------------------------------------------------------


@FAST
@given(instances())
def test_milp_equals_brute_force(instance):
    layers, blocks, candidates, bits_low, bits_high, target = instance
    solution = solve_ratios(blocks, layers, candidates, bits_low, bits_high, target)
    best, full = brute_force(layers, blocks, candidates, bits_low, bits_high, target)
    assert solution.status == "Optimal"
    scale = max(1.0, abs(best))
    assert solution.objective == pytest.approx(best, abs=1e-7 * scale)
    delta = delta_of(solution, len(candidates))
    assert float(delta @ full @ delta) == pytest.approx(solution.objective, abs=1e-9 * scale)
    assert solution.achieved_avg_bits <= target + 1e-9


def test_brute_force_two_blocks_three_layers_paper_shape():
    """2 blocks x 3 layers x K=3 with negative couplings strong enough to change the answer."""
    for seed in range(6):
        layers, blocks, candidates = random_instance(seed, 2, 3, 3)
        for m in blocks:
            off = ~np.eye(len(m), dtype=bool)
            m[off] *= 3.0  # couplings dominate: the separable choice is wrong
        assert any((m < 0).any() for m in blocks)
        lo, hi = achievable_range(layers, candidates, 2, 3)
        for target in np.linspace(lo, hi, 4):
            solution = solve_ratios(blocks, layers, candidates, 2, 3, float(target))
            best, _ = brute_force(layers, blocks, candidates, 2, 3, float(target))
            assert solution.objective == pytest.approx(best, abs=1e-7 * max(1.0, abs(best)))


# ------------------------------------------------------------------------------------------------------------
# Budget, baselines
# ------------------------------------------------------------------------------------------------------------


@FAST
@given(instances(max_blocks=3, max_layers=3, max_k=4), st.floats(0.0, 1.0))
def test_budget_respected_in_every_mode(instance, fixed_ratio):
    layers, blocks, candidates, bits_low, bits_high, target = instance
    optimal = solve_ratios(blocks, layers, candidates, bits_low, bits_high, target)
    uniform = solve_ratios(blocks, layers, candidates, bits_low, bits_high, target, mode="uniform")
    for solution in (optimal, uniform):
        assert solution.achieved_avg_bits <= target + 1e-9
        assert solution.achieved_avg_bits == pytest.approx(reference_avg_bits(solution), abs=1e-12)
    # The uniform assignment is feasible for the MILP, so the optimum can only be better.
    assert optimal.objective <= uniform.objective + 1e-9 * max(1.0, abs(uniform.objective))
    fixed_bits = bits_low + fixed_ratio * (bits_high - bits_low)
    if fixed_bits <= target:
        fixed = solve_ratios(
            blocks, layers, candidates, bits_low, bits_high, target, mode="fixed", fixed_ratio=fixed_ratio
        )
        assert fixed.achieved_avg_bits <= target + 1e-9
    elif fixed_bits > target + 1e-9:  # (a round-off excess in between may go either way)
        with pytest.raises(ValueError, match="fixed_ratio"):
            solve_ratios(blocks, layers, candidates, bits_low, bits_high, target, mode="fixed", fixed_ratio=fixed_ratio)


def test_uniform_picks_largest_fitting_candidate():
    layers, blocks = gram_instance(0, n_blocks=2, layers_per_block=3)
    for target, expected in [(2.12, 0.10), (2.2, 0.20), (3.0, 0.20), (2.02, 0.02), (2.149, 0.10)]:
        solution = solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, target, mode="uniform")
        assert {e["ratio"] for e in solution.layers} == {expected}, target
        assert solution.mip_gap is None and solution.status == "closed form"
    # A target equal to a candidate's average (2 + 0.15 has round-off) still admits that candidate.
    solution = solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.15, mode="uniform")
    assert {e["ratio"] for e in solution.layers} == {0.15}
    # Candidate order is the matrix column order, not necessarily sorted.
    shuffled = (0.2, 0.02, 0.15, 0.05, 0.1)
    solution = solve_ratios(None, layers, shuffled, 2, 3, 2.12, mode="uniform")
    assert {e["ratio"] for e in solution.layers} == {0.10}
    assert {e["candidate_index"] for e in solution.layers} == {4}
    assert solution.objective is None


def test_fixed_gives_exactly_the_ratio():
    layers, blocks = gram_instance(1, n_blocks=2, layers_per_block=3)
    solution = solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.2, mode="fixed", fixed_ratio=0.05)
    assert [e["ratio"] for e in solution.layers] == [0.05] * len(layers)
    assert all(e["bits"] == 2 + 0.05 for e in solution.layers)
    assert solution.achieved_avg_bits == pytest.approx(2.05)
    full = full_matrix(layers, blocks, len(PAPER_CANDIDATES))
    delta = delta_of(solution, len(PAPER_CANDIDATES))
    assert solution.objective == pytest.approx(float(delta @ full @ delta))
    # Any ratio in [0, 1] is allowed; one that is not a candidate has no M entry, hence no objective.
    other = solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.2, mode="fixed", fixed_ratio=0.0)
    assert other.achieved_avg_bits == 2.0 and other.objective is None
    assert other.layers[0]["candidate_index"] is None


def test_fixed_over_budget_and_misuse_raise():
    layers, blocks = gram_instance(2, n_blocks=1, layers_per_block=2)
    with pytest.raises(ValueError, match=r"fixed_ratio=0\.3.*target_avg_bits=2\.2"):
        solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.2, mode="fixed", fixed_ratio=0.3)
    with pytest.raises(ValueError, match="needs fixed_ratio"):
        solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.2, mode="fixed")
    with pytest.raises(ValueError, match=r"fixed_ratio=1\.5"):
        solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.2, mode="fixed", fixed_ratio=1.5)
    with pytest.raises(ValueError, match="only used with mode='fixed'"):
        solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.2, fixed_ratio=0.1)


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


def small():
    layers, blocks = gram_instance(3, n_blocks=2, layers_per_block=2)
    return layers, blocks


def test_infeasible_target_names_the_achievable_range():
    layers, blocks = small()
    with pytest.raises(ValueError) as err:
        check_budget(2.01, layers, PAPER_CANDIDATES, 2, 3)
    message = str(err.value)
    assert "target_avg_bits=2.01" in message and "infeasible" in message
    assert "2.020 .. 2.200" in message and "(0.02, 0.05, 0.1, 0.15, 0.2)" in message and "2/3" in message
    with pytest.raises(ValueError, match=r"2\.020 \.\. 2\.200"):
        solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.01)
    with pytest.raises(ValueError, match=r"2\.020 \.\. 2\.200"):
        solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.01, mode="uniform")
    assert check_budget(2.5, layers, PAPER_CANDIDATES, 2, 3) == pytest.approx((2.02, 2.2))
    assert achievable_range(layers, PAPER_CANDIDATES, 3, 4) == pytest.approx((3.02, 3.2))


@pytest.mark.parametrize("target", [1.9, 3.1, float("nan")])
def test_target_outside_bit_range_raises(target):
    layers, blocks = small()
    with pytest.raises(ValueError, match="target_avg_bits"):
        check_budget(target, layers, PAPER_CANDIDATES, 2, 3)
    with pytest.raises(ValueError, match="target_avg_bits"):
        solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, target, mode="fixed", fixed_ratio=0.0)


def test_target_message_names_bits():
    layers, _ = small()
    with pytest.raises(ValueError, match=r"target_avg_bits=3\.5 must lie between bits_low=2 and bits_high=3"):
        check_budget(3.5, layers, PAPER_CANDIDATES, 2, 3)


@pytest.mark.parametrize(
    ("candidates", "pattern"),
    [
        ((), "must not be empty"),
        ((0.1, 1.5), "1.5"),
        ((-0.1, 0.2), "-0.1"),
        ((0.1, 0.2, 0.1), "0.1 appears more than once"),
        ((0.1, float("nan")), "nan"),
        (("a",), "'a'"),
    ],
)
def test_bad_candidates_raise(candidates, pattern):
    layers, _ = small()
    with pytest.raises(ValueError, match=pattern):
        check_budget(2.1, layers, candidates, 2, 3)


def test_bad_bits_layers_and_mode_raise():
    layers, blocks = small()
    with pytest.raises(ValueError, match="bits_low=3 and bits_high=2"):
        check_budget(2.5, layers, PAPER_CANDIDATES, 3, 2)
    with pytest.raises(ValueError, match="layers must not be empty"):
        check_budget(2.1, [], PAPER_CANDIDATES, 2, 3)
    with pytest.raises(ValueError, match="'x'.*n_params.*0"):
        check_budget(2.1, [LayerInfo("x", 0, 0)], PAPER_CANDIDATES, 2, 3)
    with pytest.raises(ValueError, match="'a' appears more than once"):
        check_budget(2.1, [LayerInfo("a", 0, 5), LayerInfo("a", 0, 5)], PAPER_CANDIDATES, 2, 3)
    with pytest.raises(ValueError, match=r"unknown mode 'best'.*optimal, uniform, fixed"):
        solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.1, mode="best")
    with pytest.raises(ValueError, match="needs M_blocks"):
        solve_ratios(None, layers, PAPER_CANDIDATES, 2, 3, 2.1)
    with pytest.raises(ValueError, match="time_limit"):
        solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.1, time_limit=0)


def test_bad_matrices_raise_naming_the_block():
    layers, blocks = small()  # 2 blocks x 2 layers x 5 candidates: 10 x 10 each
    with pytest.raises(ValueError, match=r"block 1: matrix has shape \(9, 9\).*2 layers x 5 candidates = 10"):
        solve_ratios([blocks[0], blocks[1][:9, :9]], layers, PAPER_CANDIDATES, 2, 3, 2.1)
    with pytest.raises(ValueError, match=r"block 0: matrix must be square, got shape \(10, 9\)"):
        solve_ratios([blocks[0][:, :9], blocks[1]], layers, PAPER_CANDIDATES, 2, 3, 2.1)
    bad = blocks[1].copy()
    bad[0, 3] += 1.0
    with pytest.raises(ValueError, match="block 1: matrix is not symmetric"):
        solve_ratios([blocks[0], bad], layers, PAPER_CANDIDATES, 2, 3, 2.1)
    bad = blocks[0].copy()
    bad[2, 2] = np.inf
    with pytest.raises(ValueError, match=r"block 0: matrix has a non-finite entry at \(2, 2\)"):
        solve_ratios([bad, blocks[1]], layers, PAPER_CANDIDATES, 2, 3, 2.1)
    with pytest.raises(ValueError, match="in block 1, but only 1 block matrices"):
        solve_ratios([blocks[0]], layers, PAPER_CANDIDATES, 2, 3, 2.1)


def test_rounding_asymmetry_is_symmetrised():
    layers, blocks = small()
    noisy = [m.copy() for m in blocks]
    noisy[0][1, 7] *= 1 + 1e-9
    a = solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.1)
    b = solve_ratios(noisy, layers, PAPER_CANDIDATES, 2, 3, 2.1)
    assert a.ratios == b.ratios
    assert a.objective == pytest.approx(b.objective, rel=1e-8)


def test_block_without_layers_and_single_candidate():
    layers = [LayerInfo("a", 0, 10), LayerInfo("b", 2, 30), LayerInfo("c", 0, 20)]
    rng = np.random.default_rng(0)
    k = 3
    m0 = rng.normal(size=(2 * k, 2 * k))
    m0 = (m0 + m0.T) / 2
    m2 = np.diag(rng.uniform(size=k))
    blocks = [m0, np.zeros((0, 0)), m2]
    candidates = (0.0, 0.5, 1.0)
    solution = solve_ratios(blocks, layers, candidates, 2, 4, 3.0)
    best, _ = brute_force(layers, blocks, candidates, 2, 4, 3.0)
    assert solution.objective == pytest.approx(best)
    one = solve_ratios([np.ones((2, 2)), np.zeros((0, 0)), np.ones((1, 1))], layers, (0.5,), 2, 4, 3.0)
    assert one.objective == pytest.approx(5.0) and one.achieved_avg_bits == 3.0


def test_time_limit_without_incumbent_is_an_error():
    layers, blocks, candidates = random_instance(7, 4, 7, 5)
    with pytest.raises(RuntimeError, match="no feasible ratio assignment.*Time limit reached"):
        solve_ratios(blocks, layers, candidates, 2, 3, 2.4, time_limit=1e-6)


def test_time_limit_with_incumbent_returns_with_gap_and_warns():
    layers, blocks, candidates = random_instance(7, 4, 7, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            solution = solve_ratios(blocks, layers, candidates, 2, 3, 2.4, time_limit=0.2)
        except RuntimeError as exc:  # a very slow machine may not reach an incumbent in 0.2 s
            assert "Time limit reached" in str(exc)
            return
    assert solution.achieved_avg_bits <= 2.4 + 1e-9
    if solution.status != "Optimal":
        assert solution.status == "Time limit reached" and solution.mip_gap > 0
        assert any(issubclass(w.category, RuntimeWarning) and "gap" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------------------------------------
# ratios.json
# ------------------------------------------------------------------------------------------------------------


def test_ratios_json_round_trip(tmp_path):
    layers, blocks = gram_instance(4, n_blocks=2, layers_per_block=3)
    solution = solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.1)
    path = solution.write_json(tmp_path / "run" / "ratios.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["ratios.json"]  # no temporary file left
    with open(path) as fh:
        data = json.load(fh)
    assert [e["name"] for e in data["layers"]] == [layer.name for layer in layers]
    for entry, layer in zip(data["layers"], layers, strict=True):
        assert entry["n_params"] == layer.n_params and entry["block"] == layer.block
        assert entry["ratio"] in PAPER_CANDIDATES
        assert entry["bits"] == pytest.approx(2 + entry["ratio"])
    assert data["achieved_avg_bits"] == solution.achieved_avg_bits <= 2.1 + 1e-9
    assert data["target_avg_bits"] == 2.1
    assert data["objective"] == solution.objective
    assert data["mip_gap"] == solution.mip_gap and data["status"] == "Optimal"
    assert data["solve_time_s"] > 0
    assert data["candidates"] == list(PAPER_CANDIDATES)
    assert data["bits_low"] == 2 and data["bits_high"] == 3 and data["mode"] == "optimal"
    assert "overhead excluded" in data["budget_counts"]
    assert RatioSolution.read_json(path) == solution
    # Overwriting is atomic too, and closed-form solutions (gap None) serialise as null.
    uniform = solve_ratios(None, layers, PAPER_CANDIDATES, 2, 3, 2.1, mode="uniform")
    uniform.write_json(path)
    with open(path) as fh:
        data = json.load(fh)
    assert data["mip_gap"] is None and data["objective"] is None and data["mode"] == "uniform"
    assert RatioSolution.read_json(path) == uniform


# ------------------------------------------------------------------------------------------------------------
# The size of the bundled model
# ------------------------------------------------------------------------------------------------------------


def test_moderate_instance_solves_to_optimality(record_property):
    """8 blocks x 7 layers x 5 candidates, like the bundled model (280 binaries, 4,200 y)."""
    layers, blocks = gram_instance(13)
    k = len(PAPER_CANDIDATES)
    size = milp_size(layers, k)
    assert (size.n_binary, size.n_continuous, size.n_rows) == (280, 4200, 1737)
    start = time.perf_counter()
    solution = solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.1)
    elapsed = time.perf_counter() - start
    record_property("solve_time_s_8x7x5", round(elapsed, 3))
    print(f"\n8x7x5 MILP: {size}; status {solution.status}, gap {solution.mip_gap:.2e}, solve {elapsed:.2f} s")
    assert solution.status == "Optimal"
    assert solution.mip_gap <= 1e-9
    assert solution.model_size == size
    assert solution.achieved_avg_bits <= 2.1 + 1e-9
    full = full_matrix(layers, blocks, k)
    delta = delta_of(solution, k)
    assert float(delta @ full @ delta) == pytest.approx(solution.objective, rel=1e-9)
    uniform = solve_ratios(blocks, layers, PAPER_CANDIDATES, 2, 3, 2.1, mode="uniform")
    assert solution.objective <= uniform.objective
    # Ratios differ between layers: the budget is spent where it helps (otherwise nothing was optimised).
    assert len(set(solution.ratios.values())) > 1
    assert math.isfinite(solution.objective)

"""Properties of the top-p rule, its p-curve and the baselines, against brute force and hand-computed cases."""

import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moeprof.topp import (
    DEFAULT_P_GRID,
    apply_rule,
    check_p_grid,
    maxp_mask,
    topk_mask,
    topp_count,
    topp_curve,
    topp_mask,
)

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)
vectors = st.lists(finite, min_size=1, max_size=9)
ps = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def brute_force_count(v: list[float], p: float, slack: float = 0.0) -> int:
    """Smallest subset size whose |v| mass reaches (1 + slack)·p·‖v‖₁, by trying every subset in exact arithmetic.

    No subset reaching it (slack > 0 at p = 1) counts every non-zero entry, the p = 1 case of the formula."""
    mags = [Fraction(abs(x)) for x in v]
    need = Fraction(p) * sum(mags) * (1 + Fraction(slack))
    if need <= 0:
        return 0
    for k in range(1, len(v) + 1):
        if any(sum(c) >= need for c in itertools.combinations(mags, k)):
            return k
    return sum(1 for m in mags if m)


# The implementation sums in fp64, so a threshold within a few ulps of a subset's mass may land either side of
# it (hypothesis found v = [48, 1000, 2.7e-13, 1000], p = 1: the tiny entry is below half an ulp of the total).
# Exact answers are asserted wherever no subset mass lies within this relative slack of the threshold.
ULP_SLACK = 1e-12


def test_hand_computed_example():
    v = torch.tensor([0.1, -3.0, 2.0, 0.5])
    assert topp_curve(v, [0.0, 0.5, 0.9, 1.0]).tolist() == [0, 1, 3, 4]
    assert topp_mask(v, 0.9).tolist() == [False, True, True, True]
    assert topp_mask(v, 0.5).tolist() == [False, True, False, False]


@settings(max_examples=300, deadline=None)
@given(vectors, ps)
@example([48.0, 1000.0, 2.7171255696789576e-13, 1000.0], 1.0)
@example([734.0, 1000.0, 2.7171255696789576e-13, 2.7171255696789576e-13, 314.0], 0.9999999999999999)
def test_topp_keeps_fewest_entries_reaching_p(v, p):
    t = torch.tensor(v, dtype=torch.float64)
    mask = topp_mask(t, p)
    k = int(mask.sum())
    mags = t.abs()
    total = float(mags.sum())
    # The constraint holds ...
    assert float(mags[mask].sum()) >= p * total - 1e-9 * max(total, 1)
    # ... and the count is minimal: the k-1 largest entries miss it (up to fp64 rounding of the sums).
    if k > 0 and p * total > 0:  # (an underflowing p·total is checked exactly below)
        best_k_minus_1 = float(torch.sort(mags, descending=True).values[: k - 1].sum())
        assert best_k_minus_1 < p * total * (1 + ULP_SLACK)
    lo, hi = brute_force_count(v, p, -ULP_SLACK), brute_force_count(v, p, ULP_SLACK)
    assert lo <= k <= hi
    if lo == hi:  # no subset mass near the threshold: the answer is exact
        assert k == brute_force_count(v, p)
    assert int(topp_count(t, p)) == k


@settings(max_examples=200, deadline=None)
@given(vectors, st.lists(ps, min_size=1, max_size=6))
def test_curve_equals_one_count_per_p_and_is_monotone(v, grid):
    t = torch.tensor(v, dtype=torch.float32)
    grid = sorted(grid)
    curve = topp_curve(t, grid)
    assert curve.tolist() == [int(topp_count(t, p)) for p in grid]
    assert all(a <= b for a, b in zip(curve.tolist(), curve.tolist()[1:]))


def test_edge_cases_p0_p1_zero_rows():
    v = torch.tensor([[0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    assert topp_count(v, 0.0).tolist() == [0, 0]
    assert topp_count(v, 1.0).tolist() == [2, 0]  # p = 1 keeps exactly the non-zeros; v = 0 keeps none
    assert topp_mask(v, 1.0).tolist() == [[False, True, False, True], [False] * 4]


def test_per_row_p_tensor_matches_scalar_calls():
    torch.manual_seed(0)
    v = torch.randn(5, 33)
    p = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0])
    assert topp_count(v, p).tolist() == [int(topp_count(v[i], float(p[i]))) for i in range(5)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    torch.manual_seed(1)
    v = torch.randn(64, 768).to(dtype)
    ref = topp_curve(v.double(), DEFAULT_P_GRID)
    got = topp_curve(v, DEFAULT_P_GRID)
    # fp32 prefix sums of the exact low-precision values: at most one entry off at a rounding boundary.
    assert (got - ref).abs().max() <= 1
    assert (got == ref).float().mean() > 0.99


def test_rejects_bad_p_and_non_finite_values():
    v = torch.randn(4)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            topp_mask(v, bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        topp_curve(v, [0.5, 2.0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        topp_count(torch.tensor([1.0, float("inf")]), 0.5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        topp_curve(torch.tensor([float("nan"), 1.0]), [0.5])
    with pytest.raises(ValueError, match="empty"):
        check_p_grid([])


def test_baselines_topk_and_maxp():
    v = torch.tensor([0.1, -3.0, 2.0, 0.5, 1.6])
    assert topk_mask(v, 0.4).tolist() == [False, True, True, False, False]
    assert maxp_mask(v, 0.5).tolist() == [False, True, True, False, True]
    out, kept = apply_rule(v, "topp", 0.9)
    assert kept.item() == int(topp_count(v, 0.9)) and (out != 0).sum() == kept
    with pytest.raises(ValueError, match="unknown sparsification rule"):
        apply_rule(v, "topq", 0.5)


def test_p1_keeps_every_nonzero_even_when_fp32_running_sums_saturate():
    # 1e8 + 1 == 1e8 in fp32: a float32 prefix sum would reach the total before the last non-zeros.
    v = torch.cat([torch.tensor([1e8]), torch.full((2047,), 1.0)]).float()
    assert int(topp_count(v, 1.0)) == 2048
    assert int(topp_mask(v, 1.0).sum()) == 2048


def test_ties_at_the_cut_keep_exactly_k_lowest_indices_first():
    v = torch.tensor([1.0, 2.0, 1.0, 1.0, -2.0])  # |v| mass 7; p = 0.7 needs 4.9 → 2 + 2 + one of the 1s
    mask = topp_mask(v, 0.7)
    assert mask.tolist() == [True, True, False, False, True]
    assert topk_mask(v, 0.6).tolist() == [True, True, False, False, True]


def test_topp_keeps_one_entry_when_p_times_the_mass_underflows():
    v = torch.tensor([[0.5, 0.25], [0.0, 0.0]], dtype=torch.float64)
    assert topp_mask(v, 5e-324).sum(-1).tolist() == [1, 0]  # p·‖v‖₁ > 0 exactly for the first row

"""The critical-sparsity search on synthetic score curves with known answers (no model needed)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_qwen3_moe

from moeprof.critical import (
    CriticalSearchError,
    EvalPoint,
    MeaninglessCriticalWarning,
    NonMonotoneScoreWarning,
    bootstrap_ratio_ci,
    expert_tolerance,
    find_critical,
    glu_expert_error,
)


class Curve:
    """A synthetic evaluation: score = f(p), dense score 1, realized sparsity = 1 - p; counts its calls."""

    def __init__(self, f, dense=1.0):
        self.f, self.dense, self.calls = f, dense, []

    def __call__(self, p):
        self.calls.append(p)
        if p is None:
            return EvalPoint(p=None, score=self.dense, sparsity_token=0.0, sparsity_flop=0.0)
        return EvalPoint(p=p, score=float(self.f(p)), sparsity_token=1 - p, sparsity_flop=(1 - p) * 0.9)


def crossing(f, target=0.99, lo=0.5):
    grid = np.linspace(lo, 1.0, 100001)
    return float(grid[np.argmax([f(g) >= target - 1e-12 for g in grid])])


SMOOTH = {
    "linear": lambda c: (lambda p: 1 - 0.01 * (1 - p) / (1 - c)),
    "quadratic": lambda c: (lambda p: 1 - 0.01 * ((1 - p) / (1 - c)) ** 2),
    "logistic": lambda c: (lambda p: 1 - 0.02 / (1 + math.exp((p - c) / 0.02))),
}


@pytest.mark.parametrize("family", sorted(SMOOTH))
@pytest.mark.parametrize("c", [0.537, 0.66, 0.781, 0.8333, 0.905, 0.977])
def test_search_finds_monotone_crossing_within_tol_in_at_most_9_evaluations(family, c):
    f = SMOOTH[family](c)
    curve = Curve(f)
    res = find_critical(curve)
    true = crossing(f)
    assert res.critical_p >= true - 1e-9  # the answer passes
    assert res.critical_p - true <= 0.005 + 1e-9
    assert res.failing_p is not None and res.failing_p < true
    assert res.critical_ratio >= 0.99 - 1e-12
    assert res.num_evaluations == len(curve.calls) == len(res.points) <= 9
    assert res.monotone and not res.at_bound


def test_search_uses_fewer_evaluations_than_the_papers_grid_on_average():
    counts = []
    for c in np.linspace(0.505, 0.985, 25):
        res = find_critical(Curve(SMOOTH["quadratic"](c)))
        counts.append(res.num_evaluations)
    assert np.mean(counts) <= 8.0
    assert max(counts) < 26


def test_step_curve_is_found_within_bisection_budget():
    f = lambda p: 1.0 if p >= 0.7333 else 0.5  # noqa: E731
    curve = Curve(f)
    res = find_critical(curve)
    assert 0.7333 <= res.critical_p <= 0.7333 + 0.005
    # dense + scan 0.9, 0.7 + check 0.5 + ITP on a 0.2 bracket: at most bisection's 6 + 1.
    assert res.num_evaluations <= 1 + 2 + 1 + 7


def test_critical_sparsity_is_the_realized_sparsity_at_the_critical_point_not_p():
    res = find_critical(Curve(SMOOTH["linear"](0.8)))
    assert res.critical_sparsity_token == pytest.approx(1 - res.critical_p)
    assert res.critical_sparsity_flop == pytest.approx(0.9 * (1 - res.critical_p))
    assert res.critical.p == res.critical_p


def test_dense_evaluated_once_and_p_one_never():
    curve = Curve(SMOOTH["quadratic"](0.85))
    find_critical(curve)
    assert curve.calls.count(None) == 1
    assert 1.0 not in curve.calls
    assert len(set(curve.calls)) == len(curve.calls)  # no point evaluated twice


def test_cached_dense_is_reused_and_not_counted():
    curve = Curve(SMOOTH["quadratic"](0.85))
    dense = EvalPoint(p=None, score=1.0)
    res = find_critical(curve, dense=dense)
    assert None not in curve.calls
    assert res.num_evaluations == len(curve.calls)
    assert res.points[0] is dense


def test_whole_range_passing_reports_bound():
    curve = Curve(lambda p: 1.0)
    res = find_critical(curve)
    assert res.at_bound and res.critical_p == 0.5 and res.failing_p is None
    assert res.num_evaluations == 4  # dense, 0.9, 0.7, 0.5


def test_nothing_passing_reports_dense_end():
    res = find_critical(Curve(lambda p: 0.5))
    assert res.critical_p == 1.0
    assert res.critical_sparsity_token == 0.0
    assert res.failing_p >= 0.995


def test_bump_below_a_failing_region_is_flagged_and_not_taken():
    # Passes above 0.85, fails in [0.6, 0.85) except a spurious bump that passes in [0.45, 0.6): non-monotone.
    f = lambda p: 1.0 if p >= 0.85 else (1.0 if p < 0.6 else 0.9)  # noqa: E731
    with pytest.warns(NonMonotoneScoreWarning):
        res = find_critical(Curve(f), check=True)
    assert not res.monotone
    assert 0.85 <= res.critical_p <= 0.855
    assert any("not monotone" in n for n in res.notes)


def test_dip_above_true_crossing_gives_conservative_answer():
    # A narrow failing dip at 0.88–0.92 hides passes below it: the answer is the edge connected to dense.
    f = lambda p: 0.5 if 0.88 <= p < 0.92 else (1.0 if p >= 0.6 else 0.5)  # noqa: E731
    with pytest.warns(NonMonotoneScoreWarning):
        res = find_critical(Curve(f), check=True)
    assert 0.92 <= res.critical_p <= 0.925 and not res.monotone


def test_check_is_opt_in_and_costs_one_evaluation():
    f = SMOOTH["linear"](0.93)
    on, off = find_critical(Curve(f), check=True), find_critical(Curve(f))
    assert off.num_evaluations == on.num_evaluations - 1
    assert off.critical_p == pytest.approx(on.critical_p, abs=0.005)


def test_search_never_evaluates_below_a_failure_that_already_rules_it_out():
    """0.9 fails (ratio 0.955, as a real 270M model did): every later point lies between it and dense."""
    curve = Curve(lambda p: 1 - 0.45 * (1 - p) ** 1.0 if p < 0.97 else 1.0)
    res = find_critical(curve)
    sparse = [p for p in curve.calls if p is not None]
    assert sparse[0] == 0.9 and all(p > 0.9 for p in sparse[1:])
    assert 0.97 <= res.critical_p <= 0.975


def test_scan_aims_at_the_crossing_the_first_evaluation_predicts():
    """Linear ratio crossing at 0.8: 0.9 passes at 0.995, so the next point goes just past 0.8, not to 0.7."""
    curve = Curve(SMOOTH["linear"](0.8))
    res = find_critical(curve)
    assert curve.calls[1] == 0.9 and 0.77 <= curve.calls[2] < 0.8
    assert res.num_evaluations <= 6 and 0.8 - 1e-9 <= res.critical_p <= 0.805


def test_smooth_curves_need_at_most_7_evaluations_on_average():
    """Dense included; a logistic drop (flat, then sudden) gives the aimed scan the least to aim with."""
    means = {}
    for family in SMOOTH:
        counts = [find_critical(Curve(SMOOTH[family](c))).num_evaluations for c in np.linspace(0.505, 0.985, 25)]
        means[family] = np.mean(counts)
        assert max(counts) <= 8 and means[family] <= 7.25, (family, means[family])
    assert np.mean(list(means.values())) <= 7.0, means


def test_maxp_is_searched_mirrored_dense_at_zero():
    # max-p: larger p = sparser; the score falls as p grows, crossing at p = 0.2.
    curve = Curve(lambda p: 1 - 0.01 * (p / 0.2) ** 2)
    res = find_critical(curve, rule="maxp")
    assert 0.195 <= res.critical_p <= 0.2 + 1e-9
    assert 0.0 not in curve.calls


@pytest.mark.parametrize("target", [0.0, -0.1, 1.01, float("nan")])
def test_target_outside_unit_interval_is_rejected(target):
    with pytest.raises(CriticalSearchError, match="target"):
        find_critical(Curve(lambda p: 1.0), target=target)


def test_target_one_requires_no_loss():
    res = find_critical(Curve(lambda p: 1.0 if p >= 0.77 else 0.999), target=1.0)
    assert 0.77 <= res.critical_p <= 0.775


def test_zero_dense_score_is_rejected():
    with pytest.raises(CriticalSearchError, match="dense score is 0"):
        find_critical(Curve(lambda p: 0.0, dense=0.0))


def test_dense_at_chance_warns():
    with pytest.warns(MeaninglessCriticalWarning, match="chance"):
        find_critical(Curve(lambda p: 0.25, dense=0.25), chance=0.25)


def test_dense_well_above_chance_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", MeaninglessCriticalWarning)
        find_critical(Curve(lambda p: 0.6, dense=0.6), chance=0.25)


def test_bootstrap_ci_covers_the_ratio_and_shrinks_with_more_examples():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 2000):
        dense_acc = (rng.random(n) < 0.7).astype(float)
        sparse_acc = dense_acc.copy()
        flip = rng.random(n) < 0.05
        sparse_acc[flip] = 1 - sparse_acc[flip]
        d = EvalPoint(p=None, score=dense_acc.mean(), example_values=dense_acc)
        s = EvalPoint(p=0.8, score=sparse_acc.mean(), example_values=sparse_acc)
        lo, hi = bootstrap_ratio_ci(d, s, n_boot=1000)
        assert lo <= s.score / d.score <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_bootstrap_for_perplexity_resamples_sequences():
    nll_d = np.array([10.0, 20.0, 30.0, 40.0])
    tok = np.array([5.0, 10.0, 10.0, 20.0])
    d = EvalPoint(p=None, score=math.exp(-nll_d.sum() / tok.sum()), score_kind="inv_ppl",
                  example_values=nll_d, example_weights=tok)
    s = EvalPoint(p=0.9, score=math.exp(-(nll_d * 1.01).sum() / tok.sum()), score_kind="inv_ppl",
                  example_values=nll_d * 1.01, example_weights=tok)
    assert d.score_of(np.arange(4)[None])[0] == pytest.approx(d.score)
    lo, hi = bootstrap_ratio_ci(d, s, n_boot=500)
    assert lo <= s.score / d.score <= hi


def test_result_carries_ci_when_points_have_examples_and_serializes():
    rng = np.random.default_rng(1)
    base = (rng.random(500) < 0.6).astype(float)

    def ev(p):
        acc = base.copy()
        if p is not None:
            k = int(round((1 - p) * 200))  # more errors as p falls
            acc[:k] = 0
        return EvalPoint(p=p, score=acc.mean(), example_values=acc, sparsity_token=0 if p is None else 1 - p)

    res = find_critical(ev, task="synthetic", type="i")
    assert res.ratio_ci is not None and res.ratio_ci[0] <= res.critical_ratio <= res.ratio_ci[1]
    d = res.to_dict()
    json.dumps(d)  # plain data only
    assert d["critical_p"] == res.critical_p and d["task"] == "synthetic"
    assert len(d["points"]) == res.num_evaluations
    table = res.points_table()
    assert table["p"].shape == (res.num_evaluations - 1,)
    assert table["passed"][list(table["p"]).index(res.critical_p)]


def test_expert_error_is_zero_at_p_one_and_grows_as_p_falls():
    torch.manual_seed(0)
    H, I, T = 16, 32, 40
    x = torch.randn(T, H)
    wg, wu, wd = torch.randn(I, H) / 4, torch.randn(I, H) / 4, torch.randn(H, I) / 6
    for type in ("x", "u", "g", "i"):
        err2, ssum, ref2 = glu_expert_error(x, wg, wu, wd, [0.5, 0.8, 0.95, 1.0], type=type)
        rel = (err2 / ref2).sqrt()
        assert rel[-1] == pytest.approx(0.0, abs=1e-6)
        assert bool((rel[:-1] > 0).all()) and bool((rel[:-1].diff() <= 1e-9).all())
        assert bool((ssum / T)[:-1].diff().le(1e-12).all())  # sparsity falls as p rises


def test_expert_tolerance_ranks_a_peaked_expert_above_a_flat_one():
    # Expert 0's intermediate activations are concentrated in a few units (peaked): top-p drops more entries
    # for the same error, so its tolerated sparsity is higher than expert 1's (flat, spread activations).
    torch.manual_seed(0)
    H, I, T = 16, 64, 50
    x = torch.randn(T, H)
    wg = torch.randn(I, H)
    w_peaked = torch.randn(I, H) * torch.cat([torch.full((4,), 3.0), torch.full((I - 4,), 0.05)])[:, None]
    w_flat = torch.randn(I, H)
    wd = torch.randn(H, I) / 8
    weights = {(0, 0): (wg, w_peaked, wd), (0, 1): (wg, w_flat, wd)}
    tol = expert_tolerance(lambda l, e: (x, None) if e < 2 else (torch.zeros(0, H), None),
                           lambda l, e: weights[(l, e)], num_layers=1, num_experts=3, budget=0.1, type="i")
    ts = tol.tolerance_sparsity
    assert ts[0, 0] > ts[0, 1] > 0
    assert math.isnan(ts[0, 2]) and tol.tokens[0, 2] == 0
    json.dumps(tol.to_dict(), allow_nan=True)


def test_critical_items_carry_critical_p_and_documented_arrays():
    from moeprof.critical.pipeline import critical_items

    res = find_critical(Curve(SMOOTH["linear"](0.8)), task="t", type="i")
    attrs, data = critical_items(res)
    assert attrs["critical_p"] == res.critical_p and attrs["num_evaluations"] == res.num_evaluations
    assert all(isinstance(v, (str, float, int, bool)) for v in attrs.values())
    arr, doc, units = data["points/p"]
    assert arr.shape == (res.num_evaluations - 1,) and doc and units


def test_glu_expert_error_takes_sigma_by_name_from_the_activation_table():
    torch.manual_seed(0)
    H, I, T = 8, 12, 10
    x = torch.randn(T, H)
    wg, wu, wd = torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)
    y = (torch.nn.functional.gelu(x @ wg.T, approximate="tanh") * (x @ wu.T)) @ wd.T  # [T, H]
    err2, _, ref2 = glu_expert_error(x, wg, wu, wd, [0.5], type="i", act="gelu_pytorch_tanh")
    assert ref2 == pytest.approx(float((y ** 2).sum()), rel=1e-5)
    silu_ref2 = glu_expert_error(x, wg, wu, wd, [0.5], type="i")[2]
    assert silu_ref2 != pytest.approx(ref2, rel=1e-3)  # the default is silu, not the tanh GELU
    with pytest.raises(ValueError, match="known spellings"):
        expert_tolerance(lambda l, e: (x, None), lambda l, e: (wg, wu, wd), num_layers=1, num_experts=1, act="relu")


def test_expert_tolerance_of_moe_model_matches_the_experts_own_output():
    from moeprof.arch import adapter_for
    from moeprof.arch import expert_weights as _site_glu_weights
    from moeprof.critical import expert_tolerance_of_model

    model = tiny_qwen3_moe()
    seqs = torch.randint(0, 64, (3, 16))
    tol = expert_tolerance_of_model(model, seqs, type="i", p_grid=[0.5, 0.9, 1.0], budget=0.2)
    assert tol.tokens.shape == (2, 4) and tol.tokens.sum(axis=1).tolist() == [3 * 16 * 2] * 2  # T·K pairs
    live = tol.tokens > 0
    assert np.allclose(tol.rel_error[live][:, -1], 0.0, atol=1e-6)  # p = 1 keeps everything
    assert (tol.rel_error[live][:, 0] >= tol.rel_error[live][:, 1] - 1e-9).all()
    assert (tol.sparsity[live][:, 0] > tol.sparsity[live][:, 1]).all()
    # The weights read from the fused layout give the expert's own forward (transformers' eager experts).
    site = adapter_for(model).sites(model)[0]
    x = torch.randn(5, 32)
    wg, wu, wd = _site_glu_weights(site, 2)
    mine = (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
    idx = torch.full((5, 1), 2)
    theirs = site.experts(x, idx, torch.ones(5, 1))
    assert torch.allclose(mine, theirs, atol=1e-5)


def test_expert_tolerance_of_dense_model_has_one_expert_per_layer():
    from conftest import tiny_qwen3_model, tiny_tokenizer
    from moeprof.critical import expert_tolerance_of_model

    tok = tiny_tokenizer()
    model = tiny_qwen3_model(tok)
    seqs = torch.randint(0, len(tok), (2, 12))
    tol = expert_tolerance_of_model(model, seqs, type="x", budget=0.1)
    assert tol.tokens.tolist() == [[24], [24]]
    assert ((tol.tolerance_sparsity >= 0) & (tol.tolerance_sparsity <= 1)).all()


def test_too_few_examples_for_the_target_warns():
    from moeprof.critical import CoarseScoreWarning

    acc = np.array([1.0] * 36 + [0.0] * 64)  # 100 documents at 0.36: one document = 2.8 % of the score

    def ev(p):
        return EvalPoint(p=p, score=acc.mean(), example_values=acc)

    with pytest.warns(CoarseScoreWarning, match="2.8%"):
        find_critical(ev)
    big = np.tile(acc, 10)  # 1,000 documents: 0.28 % per document, fine for 99 %
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoarseScoreWarning)
        find_critical(lambda p: EvalPoint(p=p, score=big.mean(), example_values=big))


def test_tolerance_takes_the_sparsest_point_within_budget_for_any_rule_direction():
    from moeprof.critical import ExpertTolerance

    grid = np.array([0.05, 0.1, 0.5])
    # expert (0, 0): max-p-like (error and sparsity rise with p); expert (0, 1): top-p-like (both fall with p);
    # expert (0, 2): nothing fits the budget; expert (0, 3): no tokens.
    rel = np.array([[[0.10, 0.15, 0.90], [0.90, 0.15, 0.01], [0.5, 0.6, 0.7], [np.nan] * 3]])
    spars = np.array([[[0.67, 0.75, 0.95], [0.95, 0.80, 0.30], [0.9, 0.8, 0.7], [np.nan] * 3]])
    tol = ExpertTolerance(grid, rel, spars, np.array([[10, 10, 10, 0]]), budget=0.2, type="i", rule="maxp")
    assert tol.tolerance_sparsity[0, :3].tolist() == [0.75, 0.80, 0.0]
    assert tol.tolerance_p[0, :2].tolist() == [0.1, 0.1]
    assert np.isnan(tol.tolerance_p[0, 2]) and np.isnan(tol.tolerance_p[0, 3])
    assert np.isnan(tol.tolerance_sparsity[0, 3])


def test_extended_search_continues_below_p_min_until_a_point_fails():
    """Issue 10 item 8: a curve crossing at p = 0.24 is found (to ±tol), not reported as the 0.5 floor."""
    curve = Curve(lambda p: 1.0 if p >= 0.24 else 0.9)
    res = find_critical(curve, extend=True)
    assert not res.at_bound and abs(res.critical_p - 0.24) <= 0.005 and res.critical_p >= 0.24
    assert curve.calls[:6] == [None, 0.9, 0.7, 0.5, 0.3, 0.1]  # flat: the fixed scan; 0.1 fails first
    assert 0.05 not in curve.calls  # below a failure: ruled out, never evaluated


def test_extended_search_that_passes_down_to_the_floor_reports_bound():
    curve = Curve(lambda p: 1.0)
    res = find_critical(curve, extend=True)
    assert res.at_bound and res.critical_p == 0.05 and res.failing_p is None
    assert sorted(p for p in curve.calls if p is not None) == [0.05, 0.1, 0.3, 0.5, 0.7, 0.9]

"""The schedule optimizer's uniform anchor, its fine grid near p = 1 and its KL layer probes at the operating point."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from moeprof.evaluate.task import TaskSplits
from moeprof.optimize import (DEFAULT_GRID, OptimizeConfig, expert_curves, optimize_schedule, uniform_anchor,
                              weight_layers_by_loss)
from moeprof.evaluate.point import EvalPoint
from moeprof.evaluate.runners import perplexity_evaluator

GRID = tuple(round(0.2 + 0.1 * k, 2) for k in range(8)) + (0.95,)  # coarse (test time), one step near 1


def test_default_grid_is_fine_near_one():
    grid = np.array(DEFAULT_GRID)
    assert np.all(np.diff(grid) > 0) and grid[0] == pytest.approx(0.2) and grid[-1] == pytest.approx(0.995)
    assert {0.9, 0.9125, 0.925, 0.9375, 0.95, 0.9625, 0.975, 0.98, 0.985, 0.99, 0.995} <= set(DEFAULT_GRID)
    assert np.diff(grid[grid >= 0.975]).max() <= 0.005 + 1e-12  # 0.005 steps above 0.975 (was: 0.975 → dense)
    assert np.diff(grid[grid >= 0.9]).max() <= 0.0125 + 1e-12  # where SmolLM2 operates (uniform p ~0.93-0.95)


def _linear(slope: float, calls: list):
    """An evaluator whose score ratio is 1 − slope·(1 − p) (dense score 1): crossing 0.99 at p = 1 − 0.01/slope."""

    def evaluate(p):
        calls.append(p)
        score = 1.0 if p is None else 1.0 - slope * (1.0 - float(p))
        return EvalPoint(p=p, score=score, sparsity_flop_overall=0.0 if p is None else 1.0 - float(p))

    return evaluate


@pytest.mark.parametrize("slope, want", [(0.2, 0.95), (0.5, 0.98), (0.025, 0.6), (10.0, None)])
def test_uniform_anchor_is_the_lowest_passing_grid_p(slope, want):
    calls: list = []
    evaluate = _linear(slope, calls)
    dense = evaluate(None)
    a = uniform_anchor(evaluate, DEFAULT_GRID, dense, target=0.99, budget=6, search="grid")
    # brute force over the grid: the lowest p whose ratio is ≥ 0.99 (the ratio falls as p falls)
    passing = [p for p in DEFAULT_GRID if 1.0 - slope * (1.0 - p) >= 0.99 - 1e-12]
    assert (min(passing) if passing else None) == want
    assert a.p == want and len(a.evaluations) == len(calls) - 1 <= 6  # ⌈log2(39 + 1)⌉ = 6 settle 39 points
    if want is not None:
        assert a.point.p == want and all(r["passed"] == (r["p"] >= want) for r in a.evaluations)


def test_uniform_anchor_within_a_small_budget_returns_the_best_seen_passing():
    calls: list = []
    evaluate = _linear(0.2, calls)
    a = uniform_anchor(evaluate, DEFAULT_GRID, evaluate(None), target=0.99, budget=2, search="grid")
    assert len(a.evaluations) == 2
    seen = [r["p"] for r in a.evaluations if r["passed"]]
    assert a.p == (min(seen) if seen else None) and (a.p is None or a.p >= 0.95)


@pytest.mark.parametrize("slope", [0.2, 0.5, 0.025])
def test_critical_anchor_is_the_uniform_baselines_own_search(slope):
    """search="critical" (the optimizer's default) returns exactly what `find_critical(extend=True)` finds with the
    same cached dense: the uniform baseline of benchmarks/schedule/gain.py, evaluation for evaluation."""
    from moeprof.critical.search import find_critical

    calls: list = []
    evaluate = _linear(slope, calls)
    dense = evaluate(None)
    a = uniform_anchor(evaluate, DEFAULT_GRID, dense, target=0.99, budget=20)
    ref = find_critical(_linear(slope, []), target=0.99, dense=dense, extend=True)
    assert a.p == ref.critical_p and abs(a.p - (1 - 0.01 / slope)) <= 0.005  # the crossing, to ±tol
    assert len(a.evaluations) == ref.num_evaluations == len(calls) - 1  # dense passed in: not counted
    assert a.point.score == pytest.approx(1 - slope * (1 - a.p))
    few = uniform_anchor(evaluate, DEFAULT_GRID, dense, target=0.99, budget=2)  # budget spent inside the search
    seen = [r["p"] for r in few.evaluations if r["passed"]]
    assert len(few.evaluations) == 2 and few.p == (min(seen) if seen else None)


@pytest.fixture(scope="module")
def tiny_moe():
    """A random tiny Qwen3-MoE (2 layers, 7 experts, top-3) and random token ids: calibration and held-out."""
    from families import tiny

    torch.manual_seed(0)
    model = tiny("qwen3_moe").eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 32))
    cal, held = ids[:4], ids[4:]
    splits = TaskSplits(perplexity_evaluator(model, cal, type="i"), perplexity_evaluator(model, held, type="i"),
                        cal, {"calibration": "random ids [0, 4)", "heldout": "random ids [4, 8)"})
    return model, splits


def _brute_kl(model, seqs, layer, p, shape) -> float:
    """Mean KL(dense ‖ only `layer` sparsified at p) per predicted token, from the logits (no moeprof proxy)."""
    from moeprof.capture import sparsify

    table = torch.full(shape, float("nan"), dtype=torch.float64)
    table[layer] = p
    with torch.no_grad():
        dense = torch.log_softmax(model(seqs).logits[:, :-1].double(), -1)
        with sparsify(model, type="i", p=table):
            sparse = torch.log_softmax(model(seqs).logits[:, :-1].double(), -1)
    return float((dense.exp() * (dense - sparse)).sum(-1).mean())


def test_kl_probe_factor_is_the_measured_kl_and_resolves_every_layer(tiny_moe):
    """measure="kl": factor = mean KL(dense ‖ only that layer sparsified) / predicted damage, the KL recomputed
    from the logits by brute force; KL is never negative, so no layer is left looking free."""
    from moeprof.evaluate.perplexity import DenseReference, perplexity

    model, splits = tiny_moe
    seqs = splits.calibration_tokens[:2]
    L, E = 2, 7
    curves = expert_curves(model, seqs, type="i", p_grid=GRID)
    c = copy.deepcopy(curves)
    factors = weight_layers_by_loss(model, seqs, c, type="i", probe_p=0.9, measure="kl")
    j = GRID.index(0.9)
    for layer in range(L):
        kl = _brute_kl(model, seqs, layer, 0.9, (L, E))
        assert kl > 0
        assert factors[layer] == pytest.approx(kl / np.nansum(curves.damage[layer, :, j]), rel=1e-3)
    ref = DenseReference(model, seqs)
    assert c.probe_unresolved == [] and perplexity(model, reference=ref).kl == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(c.damage, curves.damage * factors[:, None, None], rtol=1e-12)
    with pytest.raises(ValueError, match="measure must be"):
        weight_layers_by_loss(model, seqs, copy.deepcopy(curves), type="i", measure="mse")


def test_two_point_probe_interpolates_each_layers_factor_between_its_probes(tiny_moe):
    """probe_p_low: the factor measured at 0.5 applies at and below 0.5, the one at 0.9 at and above 0.9, and
    log-linear interpolation in p between (0.6, 0.7, 0.8); both are brute-force KL / predicted damage."""
    model, splits = tiny_moe
    seqs = splits.calibration_tokens[:2]
    L, E = 2, 7
    curves = expert_curves(model, seqs, type="i", p_grid=GRID)
    c = copy.deepcopy(curves)
    hi = weight_layers_by_loss(model, seqs, c, type="i", probe_p=0.9, probe_p_low=0.5, measure="kl")
    j, k = GRID.index(0.9), GRID.index(0.5)
    lo = np.array([_brute_kl(model, seqs, layer, 0.5, (L, E)) / np.nansum(curves.damage[layer, :, k])
                   for layer in range(L)])
    np.testing.assert_allclose(c.probe_factors_low, lo, rtol=1e-3)
    assert hi[0] == pytest.approx(_brute_kl(model, seqs, 0, 0.9, (L, E)) / np.nansum(curves.damage[0, :, j]),
                                  rel=1e-3)
    for g, p in enumerate(GRID):
        t = min(max((p - 0.5) / 0.4, 0.0), 1.0)
        np.testing.assert_allclose(c.layer_scale[:, g], lo ** (1 - t) * hi ** t, rtol=1e-3)
    np.testing.assert_allclose(c.damage, curves.damage * c.layer_scale[:, None, :], rtol=1e-12)


@pytest.fixture(scope="module")
def tiny_moe_text():
    """The embedded (trained) tiny-moe and 2 x 64 tokens of Wikipedia each for calibration and held-out: a
    random model gets BETTER at every p on random ids, so the target would never bind."""
    from conftest import wikipedia_splits

    from moeprof.models import load_model

    model, tok = load_model("tiny-moe")
    return model, wikipedia_splits(model, tok, seq_len=64, max_tokens=128)


def test_anchored_optimizer_probes_at_the_uniform_operating_point_and_never_loses_to_it(tiny_moe_text):
    from moeprof.critical.search import find_critical

    model, splits = tiny_moe_text
    run = optimize_schedule(model, None, OptimizeConfig(type="i", task="synthetic", target=0.99, min_tokens=2,
                                                        p_grid=GRID, layer_probe_sequences=2, max_evals=20),
                            splits=splits)
    prov = run.schedule.provenance
    # the anchor is the uniform critical p of the calibration split under the acceptance margin (the lower bound
    # of the ratio at confidence 0.9, `moeprof.optimize.margin`): checked with an independent search on it
    from dataclasses import replace

    from moeprof.optimize.margin import margin_ratio

    dense = run.search.dense

    def margined(p):
        pt = splits.calibration(p)
        return pt if p is None else replace(pt, score=margin_ratio(dense, pt, confidence=0.9) * dense.score)

    uniform = find_critical(margined, target=0.99, dense=dense, extend=True)
    p_u = prov["anchor_p"]
    assert p_u == uniform.critical_p and 0.2 < p_u < 1  # the target binds inside the grid
    assert prov["anchor_sparsity_flop"] == pytest.approx(uniform.critical_sparsity_flop, rel=1e-9)
    assert prov["layer_probe_p"] == p_u and prov["layer_probe_measure"] == "kl"  # probes at the operating point
    assert len(prov["anchor_search"]) == uniform.num_evaluations <= 9
    assert prov["evaluations"] == 1 + len(prov["anchor_search"]) + len(prov["search"]) <= 20
    # whichever candidate is returned, it passes on calibration and is at least as sparse as uniform p there
    assert prov["ratio"] >= 0.99 and prov["sparsity_flop"] >= uniform.critical_sparsity_flop - 1e-12
    if prov["chosen"].startswith("uniform"):  # the anchor won on calibration, or the verdict wrote it
        assert np.all(run.schedule.p == p_u)
    else:  # a Lagrangian table may use the anchor p, which joined the grid
        assert set(np.unique(run.schedule.p[~np.isnan(run.schedule.p)])) <= set(GRID) | {p_u}
    again = splits.calibration(torch.as_tensor(run.schedule.p))
    assert prov["score"] == pytest.approx(again.score, rel=1e-9)


def test_refinement_moves_part_of_a_bracket_that_jumps_many_layers_at_once():
    """Four identical layers switch from p 0.9 to 0.7 at the same multiplier, so the λ bisection alone ends at
    all-0.9 (damage 0.02) vs all-0.7 (0.08, fails). With a hand-computed score ratio 1 − Σ damage and target
    0.945, exactly two layers can move (0.02 + 2 · 0.015 = 0.05 passes, + 3 · 0.015 = 0.065 fails): the refinement finds that with the evaluations left."""
    from moeprof.optimize import ExpertCurves, search_schedule

    L = 4
    damage = np.tile([0.04, 0.02, 0.005], (L, 1, 1))  # [L, 1, P]: grid 0.5, 0.7, 0.9
    sparsity = np.tile([0.8, 0.6, 0.3], (L, 1, 1))
    curves = ExpertCurves(np.array([0.5, 0.7, 0.9]), damage, sparsity, np.ones((L, 1)), np.ones(L), np.ones(L, int))
    index = {0.5: 0, 0.7: 1, 0.9: 2}

    def evaluate(p):
        if p is None:
            return EvalPoint(p=None, score=1.0, sparsity_flop_overall=0.0)
        t = np.asarray(p)[:, 0]
        d = sum(damage[l, 0, index[round(float(x), 4)]] for l, x in enumerate(t) if not np.isnan(x))
        s = np.mean([0.0 if np.isnan(x) else sparsity[0, 0, index[round(float(x), 4)]] for x in t])
        return EvalPoint(p=None, score=1.0 - d, sparsity_flop_overall=float(s))

    plain = search_schedule(evaluate, curves, target=0.945, max_evals=20, min_tokens=0, refine=False)
    assert np.allclose(plain.p[:, 0], 0.9) and plain.point.score == pytest.approx(0.98)
    found = search_schedule(evaluate, curves, target=0.945, max_evals=20, min_tokens=0)
    assert sorted(found.p[:, 0].tolist()) == [0.7, 0.7, 0.9, 0.9]
    assert found.point.score == pytest.approx(0.95) and found.predicted_sparsity == pytest.approx(0.45)
    assert found.point.sparsity_flop_overall == pytest.approx(0.45)
    assert [r.get("refine") for r in found.evaluations[-2:]] == [[2, 4], [3, 4]]  # 2 passes, 3 fails
    assert found.num_evaluations == plain.num_evaluations + 2 <= 20
    tight = search_schedule(evaluate, curves, target=0.945, max_evals=plain.num_evaluations, min_tokens=0)
    assert np.allclose(tight.p[:, 0], 0.9)  # no evaluation left: the bisection's own answer


def test_joint_probe_is_the_marginal_kl_of_one_layer_moved_from_the_operating_point(tiny_moe):
    """context_p: every layer at 0.9, each probe moves one layer to 0.5; factor = (KL with that move − KL at the
    context) / (the proxy's increase 0.9 → 0.5), both KLs recomputed from the logits by brute force."""
    from moeprof.capture import sparsify

    model, splits = tiny_moe
    seqs = splits.calibration_tokens[:2]
    L, E = 2, 7
    curves = expert_curves(model, seqs, type="i", p_grid=GRID)
    c = copy.deepcopy(curves)
    factors = weight_layers_by_loss(model, seqs, c, type="i", probe_p=0.5, measure="kl", context_p=0.9)

    def kl(table):
        with torch.no_grad():
            dense = torch.log_softmax(model(seqs).logits[:, :-1].double(), -1)
            with sparsify(model, type="i", p=table):
                sparse = torch.log_softmax(model(seqs).logits[:, :-1].double(), -1)
        return float((dense.exp() * (dense - sparse)).sum(-1).mean())

    context = torch.full((L, E), 0.9, dtype=torch.float64)
    base = kl(context)
    j, k = GRID.index(0.5), GRID.index(0.9)
    for layer in range(L):
        moved = context.clone()
        moved[layer] = 0.5
        delta = kl(moved) - base
        proxy = np.nansum(curves.damage[layer, :, j]) - np.nansum(curves.damage[layer, :, k])
        assert proxy > 0
        assert factors[layer] == pytest.approx(max(delta, 1e-6) / proxy, rel=1e-3, abs=1e-9)
    np.testing.assert_allclose(c.damage, curves.damage * factors[:, None, None], rtol=1e-12)

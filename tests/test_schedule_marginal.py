"""The joint-marginal schedule method (`optimize_schedule(method="marginal")`): its parts against brute force and
closed forms, and a tiny MoE built so that the answer is known (half of its layers made insensitive)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from moeprof.optimize import (OptimizeConfig, fit_to_target, layer_groups, marginal_reallocation, optimize_schedule,
                              scaled, water_fill)
from moeprof.critical.search import find_critical
from moeprof.evaluate.point import EvalPoint


@pytest.mark.parametrize("L,G", [(1, 10), (4, 10), (30, 10), (7, 3), (48, 10)])
def test_layer_groups_partition_the_layers_in_order(L, G):
    groups = layer_groups(L, G)
    assert [layer for g in groups for layer in g] == list(range(L))
    assert len(groups) == min(L, G)
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1


def test_water_fill_matches_a_brute_force_grid():
    rng = np.random.default_rng(0)
    for _ in range(5):
        coef = np.column_stack([rng.uniform(0.5, 5, 3), rng.uniform(0.05, 1, 3), np.zeros(3)])
        lo, hi = -rng.uniform(0.05, 0.2, 3), rng.uniform(0.05, 0.2, 3)
        budget = rng.uniform(0.0, 0.05)
        x = water_fill(coef, lo, hi, budget, steps=200)
        q = lambda g, v, c=coef: np.polyval(c[g], v) - np.polyval(c[g], 0.0)  # noqa: E731
        assert sum(q(g, x[g]) for g in range(3)) <= budget + 1e-12
        assert np.all(x >= lo - 1e-12) and np.all(x <= hi + 1e-12)
        grids = [np.linspace(lo[g], hi[g], 61) for g in range(3)]
        best = max(sum(v) for v in itertools.product(*grids) if sum(q(g, v[g]) for g in range(3)) <= budget)
        assert sum(x) >= best - 1e-3  # the grid is coarser than the fill's steps: never better than the fill


def test_water_fill_retires_a_group_that_no_longer_fits_and_keeps_a_negative_budget_at_the_start():
    coef = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # linear, equal rates; the first group's steps are large
    x = water_fill(coef, np.zeros(2), np.array([1.0, 0.001]), 5e-4, steps=4)
    np.testing.assert_allclose(x, [0.0, 0.0005], atol=1e-12)  # the big step does not fit, the small ones do
    x = water_fill(np.array([[1.0, 0.1, 0.0]]), np.array([-0.1]), np.array([0.1]), -1.0)
    np.testing.assert_allclose(x, [-0.05])  # the vertex −b/2a: the least KL the bounds allow


def synthetic_kl(c: np.ndarray, alpha: float = 4.0):
    """KL = Σ_l c_l s_l², s_l = min(1, alpha·(1 − p_l)) per layer; the overall sparsity is the mean of s_l."""
    def kl_eval(table: torch.Tensor) -> tuple[float, float]:
        p = table.numpy()[:, 0]
        s = np.clip(alpha * (1 - p), 0, 1)
        return float((c * s * s).sum()), float(s.mean())
    return kl_eval


def test_marginal_reallocation_moves_sparsity_to_the_cheap_layers_at_equal_kl():
    c = np.array([8.0, 1.0, 1.0, 4.0])
    kl_eval = synthetic_kl(c)
    start = np.full((4, 1), 0.9)
    kl0, s0 = kl_eval(torch.as_tensor(start))
    table, rounds = marginal_reallocation(kl_eval, start, layer_groups(4), rounds=3)
    kl, s = kl_eval(torch.as_tensor(table))
    assert kl <= kl0 * 1.02 and s > s0 + 0.02 and rounds[0].accepted
    p = table[:, 0]
    assert p[0] > p[3] > p[1] and abs(p[1] - p[2]) < 0.005  # costlier layers stay denser; equal ones ~equal (fill steps)
    # the closed form: max Σ s_l subject to Σ c_l s_l² = KL0 puts s_l ∝ 1/c_l
    s_opt = (1 / c) * np.sqrt(kl0 / (1 / c).sum())
    assert s_opt.mean() - s > -1e-9 and s > s0 + 0.5 * (s_opt.mean() - s0)  # at least half of the headroom


def test_a_layer_at_p_1_can_still_move_sparser():
    kl_eval = synthetic_kl(np.array([8.0, 0.5, 1.0, 4.0]))
    start = np.array([[0.9], [1.0], [0.9], [0.9]])  # layer 1 at p = 1: its denser move is clipped to nothing
    table, rounds = marginal_reallocation(kl_eval, start, layer_groups(4), rounds=2)
    assert rounds[0].accepted and table[1, 0] < 1.0 and rounds[0].moves[1] < 0
    assert np.isfinite(rounds[0].marginal[1]) and rounds[0].curvature[1] == 0.0  # the chord, sparser side only


def test_a_dense_layer_group_is_left_alone():
    c = np.array([8.0, 1.0, 1.0, 4.0])
    start = np.full((4, 2), 0.9)
    start[2] = np.nan  # layer 2 dense (e.g. every expert below --min-tokens)

    def kl_eval(table: torch.Tensor) -> tuple[float, float]:
        p = np.nan_to_num(table.numpy()[:, 0], nan=1.0)
        s = np.clip(4.0 * (1 - p), 0, 1)
        return float((c * s * s).sum()), float(s.mean())
    table, rounds = marginal_reallocation(kl_eval, start, layer_groups(4), rounds=2)
    assert np.isnan(table[2]).all() and np.isnan(rounds[0].marginal[2]) and rounds[0].moves[2] == 0.0
    assert rounds[0].accepted and table[0, 0] > table[1, 0]
    all_dense, none = marginal_reallocation(kl_eval, np.full((4, 2), np.nan), layer_groups(4), rounds=2)
    assert np.isnan(all_dense).all() and none == []


def test_fit_to_target_finds_the_crossing_of_a_synthetic_ratio():
    dense = EvalPoint(p=None, score=1.0)
    table = np.full((2, 3), 0.8)
    table[1, 2] = np.nan

    def evaluate(t: torch.Tensor) -> EvalPoint:
        p = t.numpy()
        assert np.isnan(p[1, 2])  # a dense entry stays dense whatever the scale
        dist = np.nanmean(1 - p)  # 0.2 · t
        return EvalPoint(p=None, score=1.0 - 0.05 * dist, sparsity_flop_overall=dist)
    t, point, rows = fit_to_target(evaluate, table, dense, target=0.99, budget=12)
    assert abs(t - 1.0) <= 0.011 and point.score >= 0.99 and len(rows) <= 12  # ratio 0.99 at dist 0.2: t = 1
    t2, _, rows2 = fit_to_target(evaluate, table, dense, target=0.995, budget=12)
    assert 0.5 - 0.011 <= t2 <= 0.5 and all(r["passed"] == (r["t"] <= 0.5 + 1e-9) for r in rows2)
    assert fit_to_target(evaluate, table, dense, target=0.999999, budget=1)[0] is None
    np.testing.assert_allclose(scaled(np.array([0.9, np.nan]), 2.0), [0.8, np.nan])


@pytest.fixture(scope="module")
def quiet_layers():
    """tiny-moe with layers 1 and 3 made insensitive (every expert's down_proj × 1e-3); 2,048 tokens per split."""
    from conftest import wikipedia_splits

    from moeprof.models import load_model

    model, tok = load_model("tiny-moe")
    with torch.no_grad():
        for layer in (1, 3):
            model.model.layers[layer].mlp.experts.down_proj *= 1e-3
    return model, wikipedia_splits(model, tok, seq_len=256, max_tokens=2048)


def test_marginal_method_gives_the_insensitive_layers_lower_p_and_beats_uniform(quiet_layers):
    model, splits = quiet_layers
    calls = []
    run = optimize_schedule(model, None, OptimizeConfig(type="i", task="synthetic", target=0.99, min_tokens=4,
                                                        max_evals=14, method="marginal", marginal_rounds=3),
                            splits=splits, on_eval=calls.append)
    s, prov = run.schedule, run.schedule.provenance
    assert prov["chosen"] == "marginal" and prov["method"].startswith("marginal")
    assert prov["evaluations"] <= 14 and len(calls) == prov["evaluations"]  # dense is reported as evaluation 1
    rounds = prov["marginal_rounds"]
    assert prov["marginal_probes"] == 1 + sum(2 * 4 + r["candidates"] for r in rounds)
    p = np.nanmax(s.p, axis=1)
    assert max(p[1], p[3]) < min(p[0], p[2]), s.p
    # the schedule passes on calibration when evaluated again, and is sparser than the uniform critical p there
    again = splits.calibration(torch.as_tensor(s.p))
    dense = splits.calibration(None)
    assert again.score / dense.score >= 0.99 - 1e-9
    assert abs(again.sparsity_flop_overall - prov["sparsity_flop"]) < 1e-6
    uniform = find_critical(splits.calibration, target=0.99, dense=dense, extend=True)
    assert prov["sparsity_flop"] > uniform.critical_sparsity_flop + 0.02


def test_schedule_command_with_the_marginal_method(tmp_path, capsys):
    from conftest import save_tiny_moe_and_text

    from moeprof.cli import main
    from moeprof.schedule import Schedule

    ckpt, data = save_tiny_moe_and_text(tmp_path)
    out = tmp_path / "m.json"
    argv = ["schedule", str(ckpt), "--task", f"ppl:{data}", "--seq-len", "32", "--max-tokens", "512",
            "--batch-size", "4", "--max-evals", "10", "--min-tokens", "4", "--method", "marginal",
            "--marginal-rounds", "1", "--confidence", "0.5", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    text = " ".join(capsys.readouterr().out.split())
    prov = Schedule.load(out).provenance
    assert prov["evaluations"] <= 10 and prov["marginal_probes"] >= 1 + 2 * 2 + 1
    assert f"{prov['marginal_probes']} KL probes (each a forward over {prov['marginal_probe_tokens']}" in text
    assert f"method {prov['chosen']}" in text
    assert prov["chosen"] in ("marginal", "uniform anchor", "uniform (no held-out gain over uniform p)")
    assert len(prov["marginal_rounds"]) == 1
    for flag in ("--marginal-groups", "--marginal-rounds", "--marginal-sequences"):
        bad = tmp_path / "bad.json"
        code = main([*argv[:-2], flag, "0", "--out", str(bad)])
        assert code == 2 and f"{flag} must be at least 1" in capsys.readouterr().err and not bad.exists()

"""Schedules you can trust (issue 27): the acceptance margin, the held-out verdict against the target and against
uniform p at the same score, and the uniform table written when the schedule buys nothing.

The evaluators are synthetic and their answers known: expert e of every layer loses k_e · (1 − p) of the score
(averaged over experts) and realizes sparsity √(1 − p) (FLOP-weighted = the mean over experts). With equal k
(alike experts) uniform p is the best table (Jensen: √ is concave); with some k ≈ 0 (insensitive experts) the best
table sparsifies those.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moeprof.evaluate.point import EvalPoint
from moeprof.evaluate.task import TaskSplits
from moeprof.optimize import OptimizeConfig, optimize_schedule
from moeprof.optimize.curves import ExpertCurves
from moeprof.optimize.margin import accept_table, margin_ratio, part_ratios, tokens_to_resolve
from moeprof.optimize.verdict import Verdict, judge, verdict_lines

pytestmark = pytest.mark.filterwarnings("ignore:one example moves the score ratio")  # 64 synthetic examples

L, E, N = 2, 8, 64
GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
QUIET = np.array([0.002] * 4 + [0.2] * 4)  # experts 0-3 insensitive
ALIKE = np.full(E, QUIET.mean())  # the same mean sensitivity, spread evenly


def _x(p) -> np.ndarray:
    """1 − p per (layer, expert) [L, E] (0 where dense)."""
    if p is None:
        return np.zeros((L, E))
    t = torch.as_tensor(p, dtype=torch.float64)
    t = t.expand(L, E) if t.dim() == 0 else t
    return np.nan_to_num(1.0 - t.numpy(), nan=0.0)


def synthetic(k: np.ndarray, seed: int):
    """An evaluator: score = mean_i a_i · (1 − loss · j_i), loss = mean_{l,e} k_e · x_le; sparsity mean √x."""
    rng = np.random.default_rng(seed)
    a = 1.0 + 0.1 * rng.standard_normal(N)
    j = 1.0 + 0.5 * rng.standard_normal(N)  # the examples feel the damage unequally: the bootstrap has noise

    def evaluate(p):
        x = _x(p)
        loss = float((k[None, :] * x).mean())
        v = a * (1.0 - loss * j)
        return EvalPoint(p=None if p is None else 0.0, score=float(v.mean()), example_values=v,
                         sparsity_flop_overall=float(np.sqrt(x).mean()), sparsity_token=float(np.sqrt(x).mean()))

    return evaluate


def curves_of(k: np.ndarray) -> ExpertCurves:
    g = np.asarray(GRID)
    damage = np.broadcast_to(k[None, :, None] * (1.0 - g)[None, None, :], (L, E, len(g))).copy()
    sparsity = np.broadcast_to(np.sqrt(1.0 - g), (L, E, len(g))).copy()
    return ExpertCurves(g, damage, sparsity, np.full((L, E), 100.0), np.ones(L), np.full(L, E))


@pytest.fixture(scope="module")
def model():
    """A tiny Qwen3-MoE (2 layers, 8 experts): only its shape is read (the evaluations are synthetic)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=L, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            num_experts=E, num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def run_on(model, k_curves, k_cal, k_held, **kw):
    splits = TaskSplits(synthetic(k_cal, 1), synthetic(k_held, 2), torch.zeros(2, 4, dtype=torch.long),
                        {"calibration": "synthetic:cal", "heldout": "synthetic:heldout"})
    config = OptimizeConfig(type="i", task="synthetic", target=0.99, min_tokens=4, max_evals=14, p_grid=GRID,
                            anchor=True, **kw)
    return optimize_schedule(model, None, config, splits=splits, curves=curves_of(k_curves))


# -- the margin ----------------------------------------------------------------------------------------------


def test_margin_ratio_is_the_bootstrap_lower_bound_below_the_point_ratio():
    ev = synthetic(ALIKE, 3)
    dense, pt = ev(None), ev(0.9)
    point = pt.score / dense.score
    low = margin_ratio(dense, pt, confidence=0.9)
    # an independent reference: the 10% quantile of a paired bootstrap with numpy
    rng = np.random.default_rng(7)
    idx = rng.integers(0, N, size=(4000, N))
    ref = np.quantile(pt.example_values[idx].mean(1) / dense.example_values[idx].mean(1), 0.1)
    assert low < point and low == pytest.approx(ref, abs=3e-4)
    assert margin_ratio(dense, pt, confidence=0.5) == pytest.approx(point, rel=1e-12)
    assert accept_table(dense, pt, target=point, confidence=0.5).accepted
    refused = accept_table(dense, pt, target=point, confidence=0.9)
    assert not refused.accepted and refused.bound == pytest.approx(ref, abs=3e-4)


def test_each_part_of_a_task_must_clear_the_target():
    ev = synthetic(ALIKE, 3)
    dense, pt = ev(None), ev(0.9)
    v = pt.example_values.copy()
    v[N // 2:] *= 0.97  # the second corpus loses 3 % more
    worse = EvalPoint(p=0.9, score=float(v.mean()), example_values=v,
                      extra={"parts": [("wikipedia", 0, N // 2), ("code", N // 2, N)]})
    parts = part_ratios(dense, worse, confidence=0.5)
    ref_code = v[N // 2:].mean() / dense.example_values[N // 2:].mean()
    assert parts["code"] == pytest.approx(ref_code) and parts["wikipedia"] > parts["code"]
    assert margin_ratio(dense, worse, confidence=0.5) == pytest.approx(ref_code)
    assert worse.score / dense.score > ref_code  # the mix alone would pass where a part fails


def test_tokens_to_resolve_scales_with_the_square_of_the_ci_width():
    assert tokens_to_resolve((0.98, 1.0), 4096, 0.99) == 4 * 4096  # half-width 0.01 = 2 × (budget / 2)
    assert tokens_to_resolve(None, 4096, 0.99) is None


# -- the verdict ---------------------------------------------------------------------------------------------


def test_verdict_finds_the_uniform_p_of_equal_score_and_the_gain():
    ev = synthetic(ALIKE, 4)
    dense = ev(None)
    table = np.full((L, E), 0.5)
    table[:, 4:] = 0.95  # x = 0.5 on half the experts, 0.05 on the others
    sched = ev(torch.as_tensor(table))
    v = judge(ev, dense, sched, target=0.99, task="t", start_p=0.9, budget=8)
    # reference: uniform loss k̄·x equals the table's, so x_u = mean x = 0.275 and sparsity √0.275
    x_u = 0.275
    assert v.uniform_p == pytest.approx(1 - x_u, abs=0.01)
    assert v.uniform_sparsity_flop == pytest.approx(math.sqrt(x_u), abs=0.01)
    want = 100 * ((math.sqrt(0.5) + math.sqrt(0.05)) / 2 - math.sqrt(x_u))
    assert v.gain_points == pytest.approx(want, abs=1.0) and want < -3
    assert v.noise_points is not None and v.noise_points >= 0 and v.uniform_evaluations <= 8
    assert not v.beats_uniform and any("no gain over uniform p" in line for line in v.lines())


def test_heldout_miss_prints_the_warning_with_the_ci():
    ev = synthetic(ALIKE, 5)
    dense, sched = ev(None), ev(0.8)  # loses ~2 %
    v = judge(ev, dense, sched, target=0.99, task="ppl:t", budget=0)
    assert not v.meets_target
    warn = [line for line in v.lines() if line.startswith("warning:")]
    lo, hi = v.heldout_ratio_ci
    assert warn and "MISSES the target 0.99" in warn[0] and f"[{lo:.4f}, {hi:.4f}]" in warn[0]
    ok = judge(ev, dense, ev(0.99), target=0.99, task="ppl:t", budget=0)
    assert ok.meets_target and not any(line.startswith("warning: held-out") for line in ok.lines())


def test_verdict_round_trips_through_the_provenance():
    ev = synthetic(ALIKE, 6)
    v = judge(ev, ev(None), ev(0.9), target=0.99, task="t", start_p=0.9, budget=4)
    d = v.to_dict()
    assert Verdict.from_dict(d).lines() == v.lines() == verdict_lines({"verdict": d})
    assert d["text"].splitlines() == v.lines()


def test_the_verdicts_uniform_table_and_the_optimizers_tables_obey_one_acceptance_rule():
    """A uniform table whose calibration ratio is exactly the target passes the point rule (confidence 0.5) and
    fails the margin (0.9): the uniform anchor search and the verdict's uniform substitution decide alike."""
    from moeprof.optimize.anchor import uniform_anchor
    from moeprof.optimize.multiplier import ScheduleSearch
    from moeprof.optimize.optimizer import ScheduleResult, _verdict

    cal_ev, held_ev = synthetic(ALIKE, 1), synthetic(ALIKE, 2)
    cal_dense, held_dense = cal_ev(None), held_ev(None)
    table = np.full((L, E), 0.5)
    table[:, 4:] = 0.95  # alike experts: a non-uniform table loses to uniform p on held-out
    splits = TaskSplits(cal_ev, held_ev, torch.zeros(2, 4, dtype=torch.long), {})

    def verdict_writes(target: float, confidence: float) -> tuple[str, float | None]:
        """(what the verdict wrote, the uniform p it wrote) on the no-anchor path (no anchor search ran)."""
        cfg = OptimizeConfig(type="i", task="synthetic", target=target, confidence=confidence, anchor=False)
        found = ScheduleSearch(table.copy(), 0.0, 0.0, cal_dense, cal_ev(torch.as_tensor(table)), [], [])
        result = ScheduleResult(None, found, held_dense, held_ev(torch.as_tensor(table)), None, config=cfg)
        out = _verdict(result, splits, found, curves_of(ALIKE), cfg, lambda s: None)
        assert result.verdict.beats_uniform is False
        written = np.unique(out.p)
        return result.verdict.written, (float(written[0]) if written.size == 1 else None)

    written, p_u = verdict_writes(0.5, 0.5)  # a target every uniform p passes: learn which p the verdict writes
    assert written.startswith("uniform p") and p_u is not None
    cal_u = cal_ev(p_u)
    target = cal_u.score / cal_dense.score  # its calibration ratio, exactly: the point passes, the margin does not
    for confidence, passes in ((0.5, True), (0.9, False)):
        assert accept_table(cal_dense, cal_u, target=target, confidence=confidence).accepted is passes
        anchor = uniform_anchor(cal_ev, (p_u,), cal_dense, target=target, budget=2, search="grid",
                                confidence=confidence)
        assert (anchor.p == pytest.approx(p_u)) if passes else anchor.p is None
        written, wrote_p = verdict_writes(target, confidence)
        if passes:
            assert written == f"uniform p {p_u:.4f}" and wrote_p == pytest.approx(p_u)
        else:  # refused: the optimized table stays, and the verdict still says it did not beat uniform p
            assert written == "optimized" and wrote_p is None


# -- the optimizer's verdict, end to end ----------------------------------------------------------------------


def test_insensitive_experts_still_gain_over_uniform_on_heldout(model):
    run = run_on(model, QUIET, QUIET, QUIET)
    v = run.verdict
    assert run.chosen == "lagrangian" and v.beats_uniform and v.gain_points > 5, v.lines()
    assert v.written == "optimized" and run.optimized_p is None
    p = run.schedule.p
    assert np.nanmax(p[:, :4]) < np.nanmin(p[:, 4:])
    assert run.schedule.provenance["verdict"]["gain_points"] == pytest.approx(v.gain_points)
    # the accepted table clears the target by the margin on calibration
    assert margin_ratio(run.search.dense, run.calibration, confidence=0.9) >= 0.99


def test_alike_experts_get_no_gain_and_the_uniform_table(model):
    run = run_on(model, ALIKE, ALIKE, ALIKE)
    text = "\n".join(run.verdict.lines())
    assert "no gain over uniform p" in text
    p = run.schedule.p
    assert np.all(np.isfinite(p)) and np.ptp(p) == 0.0  # one p everywhere


def test_a_schedule_losing_to_uniform_on_heldout_writes_the_uniform_table(model):
    """Curves and calibration say experts 0-3 are insensitive; held-out text says all experts are alike."""
    run = run_on(model, QUIET, QUIET, ALIKE)
    v, prov = run.verdict, run.schedule.provenance
    assert v.gain_points < 0 and not v.beats_uniform
    assert not v.meets_target and v.lines()[0].startswith("warning:")
    assert v.written.startswith("uniform p") and run.chosen.startswith("uniform")
    p = run.schedule.p
    assert np.ptp(p) == 0.0 and p[0, 0] == pytest.approx(run.anchor_p)
    kept = np.array(prov["optimized_p"], dtype=float)
    assert np.nanmax(kept[:, :4]) < np.nanmin(kept[:, 4:])  # the optimized table is kept in the provenance
    assert "wrote uniform p" in prov["verdict"]["text"]


# -- tasks of several corpora --------------------------------------------------------------------------------


def test_a_task_of_several_corpora_tags_each_part_and_scores_it_alone():
    from moeprof import corpora
    from moeprof.evaluate.perplexity import sequences_from_file
    from moeprof.evaluate.task import resolve_task, task_evaluator, task_splits
    from moeprof.models import load_model

    model, tok = load_model("tiny-moe")
    splits = task_splits(model, tok, task="ppl:wikipedia,ppl:code", type="i", seq_len=64, max_tokens=256)
    assert splits.describe["parts"] == ["wikipedia", "code"]
    dense, sparse = splits.calibration(None), splits.calibration(0.7)
    ratios = part_ratios(dense, sparse, confidence=0.5)
    code = sequences_from_file(tok, corpora.text_file("code", "train"), seq_len=64, max_tokens=256)
    alone = task_evaluator(model, tok, "ppl:code", type="i", sequences=code).evaluate
    assert ratios["code"] == pytest.approx(alone(0.7).score / alone(None).score, rel=1e-6)
    assert margin_ratio(dense, sparse, confidence=0.5) == pytest.approx(min(ratios.values()))
    assert [q.name for q in resolve_task("ppl:domains").part_tasks()] == ["ppl:wikipedia", "ppl:owt", "ppl:code"]


def test_a_list_task_with_a_non_perplexity_part_is_one_clear_error():
    from moeprof.evaluate.task import resolve_task
    from moeprof.errors import UsageError

    with pytest.raises(UsageError, match="ppl:nosuchfile"):
        resolve_task("ppl:wikipedia,ppl:nosuchfile")

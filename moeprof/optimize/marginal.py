"""The joint-marginal method: layer groups moved both ways in the joint model, KL as the smooth loss.

After the uniform anchor, no multiplier: the anchor's uniform table is reallocated across consecutive layer groups
(`marginal_reallocation`: two KL probes per group per round, a convex quadratic per group, water-filling at the
anchor's KL), then `fit_to_target` scales its distance from dense with real calibration evaluations.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from moeprof.evaluate.point import EvalPoint, Evaluate
from moeprof.evaluate.task import TaskSplits
from moeprof.optimize.anchor import UniformAnchor
from moeprof.optimize.config import (DEFAULT_MARGINAL_DELTA, DEFAULT_MARGINAL_GROUPS, DEFAULT_MARGINAL_ROUNDS,
                                     DEFAULT_MARGINAL_TRUST, OptimizeConfig)
from moeprof.optimize.curves import ExpertCurves
from moeprof.optimize.margin import DEFAULT_CONFIDENCE, accept_table
from moeprof.optimize.multiplier import ScheduleSearch


KLEvaluate = Callable[[torch.Tensor], tuple[float, float]]  # table [L, E] -> (mean KL per token, FLOP sparsity)


def layer_groups(num_layers: int, max_groups: int = DEFAULT_MARGINAL_GROUPS) -> list[list[int]]:
    """Return consecutive layer groups, at most `max_groups` of them, sizes differing by at most one."""
    g = max(1, min(num_layers, max_groups))
    bounds = np.linspace(0, num_layers, g + 1).round().astype(int)
    return [list(range(bounds[k], bounds[k + 1])) for k in range(g) if bounds[k + 1] > bounds[k]]


def _quadratic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(a, b, c) of y = a·x² + b·x + c through three points; when the three are not convex (a ≤ 0), the
    least-squares line through them (a = 0)."""
    with warnings.catch_warnings():  # two coincident points (a move clipped at p = 1) make the fit rank-deficient
        warnings.simplefilter("ignore", np.exceptions.RankWarning)
        a, b, c = np.polyfit(x, y, 2)
        if not a > 0:
            b, c = np.polyfit(x, y, 1)
            a = 0.0
    return np.array([a, b, c])


def water_fill(coef: np.ndarray, lo: np.ndarray, hi: np.ndarray, budget: float, steps: int = 400) -> np.ndarray:
    """Return x maximizing Σ x subject to Σ q_g(x_g) − q_g(0) ≤ budget and lo ≤ x ≤ hi (lo ≤ 0 ≤ hi).

    The q_g (rows of `coef`: a, b, c; a ≥ 0) are convex, so water-filling is optimal to the step: every group
    starts at lo (or at its parabola's vertex, when that is above lo: a denser group would not lower the KL), then
    the next step goes to the group whose step adds the least KL; a group whose next step no longer fits the
    budget is retired, and the others go on. When even that start exceeds the budget (a negative budget), the
    start is returned: the least KL the bounds allow."""
    q = [np.poly1d(c) for c in coef]
    lo = np.asarray(lo, dtype=float).copy()
    hi = np.asarray(hi, dtype=float)
    for g, (a, b, _c) in enumerate(coef):  # denser than a parabola's vertex buys no KL: start there
        if a > 0:
            lo[g] = min(max(lo[g], -b / (2 * a)), hi[g])
    x = lo.copy()
    step = (hi - x) / steps
    used = sum(qg(v) - qg(0.0) for qg, v in zip(q, x))
    active = np.array([step[g] > 0 for g in range(len(q))])
    taken = np.zeros(len(q), dtype=int)
    while active.any():
        inc = np.array([q[g](x[g] + step[g]) - q[g](x[g]) if active[g] else np.inf for g in range(len(q))])
        rate = inc / np.where(step > 0, step, 1.0)
        g = int(np.argmin(rate))
        if used + inc[g] > budget:
            active[g] = False  # its next step does not fit; a cheaper-per-step group may still
            continue
        x[g] += step[g]
        used += inc[g]
        taken[g] += 1
        if taken[g] >= steps:
            active[g] = False
    return x


def _shift(table: np.ndarray, rows: list[int], dp: float) -> np.ndarray:
    """Return table with the p of `rows` moved by dp (kept in [0.01, 1]; dense entries stay dense)."""
    out = table.copy()
    out[rows] = np.clip(out[rows] + dp, 0.01, 1.0)
    return out


@dataclass
class MarginalRound:
    """One round of `marginal_reallocation`: the probes, the local model, the move and its KL."""

    base_kl: float
    base_sparsity: float
    marginal: list  # dKL / d(overall sparsity) of each group at the round's table
    moves: list  # the p move of each group (the last candidate tried)
    kl: float  # of the last candidate tried
    sparsity: float
    accepted: bool
    trust: float  # of the last candidate, in units of delta
    candidates: int  # candidates probed (each one KL probe)
    predicted: float = float("nan")  # the local model's gain in overall sparsity for the last candidate
    curvature: list = field(default_factory=list)  # a of each group's fitted KL = a·x² + b·x (b: `marginal`)


def marginal_reallocation(kl_eval: KLEvaluate, table: np.ndarray, groups: list[list[int]], *,
                          budget_kl: float | None = None, delta: float = DEFAULT_MARGINAL_DELTA,
                          trust: float = DEFAULT_MARGINAL_TRUST, rounds: int = DEFAULT_MARGINAL_ROUNDS,
                          max_trust: float = 8.0, on_probe: Callable[[dict], None] | None = None
                          ) -> tuple[np.ndarray, list[MarginalRound]]:
    """Return (table, rounds): `table` [L, E] reallocated across layer groups at (at most) the KL of the start.

    Each round: every group is moved to p − delta and p + delta with the rest at the round's table (2 probes per
    group, in the JOINT model: the marginal rate where the allocation decides, not a layer alone); KL per group
    is fitted by a convex quadratic in the group's share of the overall FLOP-weighted sparsity; water-filling
    (`water_fill`) gives the shares maximizing the overall sparsity at KL ≤ budget_kl (default: the start's),
    each group within trust · delta of p. One more probe measures the moved table: it is kept when its KL is
    within 2 % of the budget and it is sparser, and the trust then doubles (at most max_trust); else the trust
    halves and the same local model is solved again (at most 3 candidates a round; a round without a kept
    candidate ends the search). Probes are `kl_eval` calls on the probe sequences, not full evaluations."""
    table = np.asarray(table, dtype=float).copy()
    done: list[MarginalRound] = []

    def probe(t: np.ndarray, label: str) -> tuple[float, float]:
        kl, s = kl_eval(torch.as_tensor(t, dtype=torch.float64))
        if on_probe is not None:
            on_probe({"label": label, "kl": kl, "sparsity_flop": s})
        return kl, s

    base_kl, base_s = probe(table, "start")
    budget = base_kl if budget_kl is None else budget_kl
    for r in range(rounds):
        xs, ks = [], []
        for idx in groups:
            k_lo, s_lo = probe(_shift(table, idx, -delta), f"round {r + 1}: layers {idx[0]}-{idx[-1]} −{delta:g}")
            k_hi, s_hi = probe(_shift(table, idx, +delta), f"round {r + 1}: layers {idx[0]}-{idx[-1]} +{delta:g}")
            xs.append(np.array([s_lo - base_s, 0.0, s_hi - base_s]))
            ks.append(np.array([k_lo - base_kl, 0.0, k_hi - base_kl]))
        ok = np.array([x[0] > 0 for x in xs])  # a group whose sparser move changes nothing (dense) stays
        if not ok.any():
            break
        # both sides measured: the quadratic; at p = 1 (the denser move clipped to nothing): the chord, sparser only
        coef = np.array([(_quadratic(x, k) if x[2] < 0 else np.array([0.0, k[0] / x[0], 0.0])) if good
                         else np.zeros(3) for x, k, good in zip(xs, ks, ok)])
        accepted = False
        for attempt in range(3):
            lo = np.where(ok, [trust * x[2] for x in xs], 0.0)
            hi = np.where(ok, [trust * x[0] for x in xs], 0.0)
            x_opt = water_fill(coef, lo, hi, budget - base_kl)
            moves, cand = [], table.copy()
            for g, idx in enumerate(groups):  # linear in p along the measured move of that side
                side = 0 if x_opt[g] >= 0 else 2
                move = (-delta if side == 0 else delta) * x_opt[g] / xs[g][side] if ok[g] else 0.0
                moves.append(float(move))
                cand = _shift(cand, idx, move)
            kl, s = probe(cand, f"round {r + 1}: the reallocated table (trust {trust:g}·{delta:g})")
            accepted = kl <= budget * 1.02 + 1e-12 and s > base_s
            done_round = MarginalRound(base_kl, base_s, [float(c[1]) if good else float("nan")
                                                         for c, good in zip(coef, ok)],
                                       moves, kl, s, accepted, float(trust), attempt + 1, float(x_opt.sum()),
                                       [float(c[0]) if good else float("nan") for c, good in zip(coef, ok)])
            if accepted:
                table, base_kl, base_s = cand, kl, s
                trust = min(trust * 2, max_trust)
                break
            trust /= 2
        done.append(done_round)
        if not accepted:
            break
    return table, done


def scaled(table: np.ndarray, t: float) -> np.ndarray:
    """Return the table with every sparsified entry's distance from dense scaled by t: 1 − (1 − p)·t in [0.01, 1]."""
    return np.clip(1.0 - (1.0 - np.asarray(table, dtype=float)) * t, 0.01, 1.0)


def fit_to_target(evaluate: Evaluate, table: np.ndarray, dense: EvalPoint, *, target: float, budget: int,
                  step: float = 0.05, on_eval: Callable[[dict], None] | None = None,
                  confidence: float = DEFAULT_CONFIDENCE) -> tuple[float | None, EvalPoint | None, list[dict]]:
    """Return (t, point, rows): the largest t found with `scaled(table, t)` keeping the calibration score ≥ target ×
    dense, with at most `budget` real evaluations: t = 1 first, then outward (up when it passes, down when it
    fails) by `step`, doubling each time, until the other side is met; then bisection to 0.01 in t. (None, None,
    rows) when nothing evaluated passed. Dense entries (NaN) stay dense at every t."""
    rows: list[dict] = []
    best: tuple[float | None, EvalPoint | None] = (None, None)

    def run(t: float) -> bool:
        nonlocal best
        pt = evaluate(torch.as_tensor(scaled(table, t), dtype=torch.float64))
        rule = accept_table(dense, pt, target=target, confidence=confidence)  # the acceptance rule
        passed = rule.accepted
        row = {"t": float(t), "score": pt.score, "ratio": pt.score / dense.score, "margin_ratio": rule.bound,
               "passed": passed,
               "sparsity_flop": pt.sparsity_flop_overall, "sparsity_token": pt.sparsity_token,
               "label": f"reallocated table, scaled by t {t:.4f}"}
        rows.append(row)
        if on_eval is not None:
            on_eval(row)
        if passed and (best[0] is None or t > best[0]):
            best = (t, pt)
        return passed

    if budget < 1:
        return None, None, rows
    t = 1.0
    up = run(t)
    while len(rows) < budget:  # walk outward, doubling the step, until the other side is met
        nxt = round(t + step if up else max(t - step, 0.0), 6)
        if nxt <= 0 or nxt == t:
            break
        if run(nxt) != up:
            lo, hi = (t, nxt) if up else (nxt, t)  # lo passes, hi fails
            while len(rows) < budget and hi - lo > 0.01:
                mid = round((lo + hi) / 2, 6)
                lo, hi = (mid, hi) if run(mid) else (lo, mid)
            break
        t, step = nxt, step * 2
    return best[0], best[1], rows


def marginal_search(model, splits: TaskSplits, curves: ExpertCurves, anchor: UniformAnchor, dense: EvalPoint,
                    config: OptimizeConfig, *, budget: int, say: Callable[[str], None],
                    on_eval: Callable[[dict], None]) -> tuple[ScheduleSearch, list[MarginalRound], int, int]:
    """Return (the search, its rounds, KL probes made, tokens per probe): `optimize_schedule`'s method "marginal"
    after the anchor (reallocate at the anchor's KL, then fit to the target with at most `budget` evaluations)."""
    from moeprof.evaluate.runners import perplexity_evaluator

    type, rule, target, min_tokens = config.type, config.rule, config.target, config.min_tokens
    batch_size, groups, rounds, sequences = (config.batch_size, config.marginal_groups, config.marginal_rounds,
                                             config.marginal_sequences)

    L, E = curves.tokens.shape
    real = np.arange(E)[None, :] < curves.num_experts[:, None]
    safe_mask = real & (curves.tokens < min_tokens)
    start = np.where(real & ~safe_mask, float(anchor.p), np.nan)
    safe = [[int(l), int(e)] for l, e in zip(*np.nonzero(safe_mask))]
    tokens = splits.calibration_tokens if sequences is None else splits.calibration_tokens[:sequences]
    kl_of = perplexity_evaluator(model, tokens, type=type, rule=rule, batch_size=batch_size, proxies=True)
    probes = 0

    def kl_eval(table: torch.Tensor) -> tuple[float, float]:
        nonlocal probes
        probes += 1
        pt = kl_of(table)
        return float(pt.extra["kl"]), float(pt.sparsity_flop_overall)

    grouping = layer_groups(L, groups)
    say(f"reallocating {len(grouping)} layer group(s) at the anchor's KL ({rounds} round(s) of "
        f"{2 * len(grouping) + 1} KL probes on {tokens.numel()} calibration tokens)")
    table, done = marginal_reallocation(kl_eval, start, grouping, rounds=rounds)
    evaluations: list[dict] = []

    def fit_eval(row: dict) -> None:
        evaluations.append(row)
        on_eval({**row, "lam": float("nan"), "evaluation": len(evaluations) + 1, "max_evaluations": budget + 1,
                 "dense_score": dense.score})

    say("scaling the reallocated table to the target with real calibration evaluations")
    t, point, _rows = fit_to_target(splits.calibration, table, dense, target=target, budget=budget, on_eval=fit_eval,
                                    confidence=config.confidence)
    if t is None:
        found = ScheduleSearch(np.full((L, E), np.nan), float("nan"), 0.0, dense, None, safe, evaluations)
    else:
        found = ScheduleSearch(scaled(table, t), float("nan"), float("nan"), dense, point, safe,
                               evaluations)
    return found, done, probes, int(tokens.numel())


"""The multiplier (Lagrangian) method: every expert takes the grid p minimizing damage − λ·gain, and a bisection
over a log-spaced λ ladder with real calibration evaluations finds the largest λ that keeps the target.

Gain = Σ_e n_e F_l s_e(p_e) / Σ_e n_e F_l (the FLOP-weighted sparsity; n_e = calibration tokens of expert e, F_l =
multiply-adds of one token through one expert of layer l). Separable by expert, so each λ is solved exactly; the
predicted sparsity grows with λ. Layers of like sensitivity switch at the same λ, so adjacent rungs can differ by
several layers at once: the evaluations left then bisect on how many of those changes (cheapest predicted damage
per sparsity first) still keep the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from moeprof.critical.search import check_dense
from moeprof.evaluate.point import EvalPoint, Evaluate
from moeprof.optimize.config import DEFAULT_MAX_EVALS, DEFAULT_MIN_TOKENS, LAMBDA_RUNGS
from moeprof.optimize.curves import ExpertCurves
from moeprof.optimize.margin import DEFAULT_CONFIDENCE, accept_table


def allocate(curves: ExpertCurves, lam: float, *, min_tokens: int = DEFAULT_MIN_TOKENS
             ) -> tuple[np.ndarray, float, list[list[int]]]:
    """Return (p table [L, E] with NaN = dense, predicted FLOP-weighted sparsity, safe experts) at multiplier lam.

    Every expert independently takes the grid p (or dense: damage 0, gain 0) minimizing damage − lam·gain.
    """
    L, E, _ = curves.damage.shape
    weight = curves.tokens * curves.flops_per_token[:, None]  # [L, E]
    total = weight.sum()
    gain = curves.sparsity * (weight / total)[..., None]  # [L, E, P]
    cost = curves.damage - lam * gain
    cost = np.where(np.isnan(cost), np.inf, cost)
    best = np.argmin(cost, axis=-1)  # [L, E]
    best_cost = np.take_along_axis(cost, best[..., None], -1)[..., 0]
    table = np.where(best_cost < 0, curves.p_grid[best], np.nan)
    safe = []
    for l in range(L):
        for e in range(E):
            if e >= curves.num_experts[l]:
                table[l, e] = np.nan
            elif curves.tokens[l, e] < min_tokens:
                table[l, e] = np.nan
                safe.append([l, e])
    chosen = ~np.isnan(table)
    s = np.where(chosen, np.take_along_axis(curves.sparsity, best[..., None], -1)[..., 0], 0.0)
    predicted = float((np.nan_to_num(s) * weight).sum() / total) if total else 0.0
    return table, predicted, safe


def lambda_ladder(curves: ExpertCurves, rungs: int = LAMBDA_RUNGS) -> np.ndarray:
    """Return log-spaced multipliers from where the first expert leaves dense to where all take the lowest p."""
    weight = curves.tokens * curves.flops_per_token[:, None]
    gain = curves.sparsity * (weight / max(weight.sum(), 1e-300))[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = curves.damage / gain
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    if ratio.size == 0:
        return np.array([1.0])
    lo, hi = float(ratio.min()) * 0.5, float(ratio.max()) * 4.0
    return np.exp(np.linspace(math.log(lo), math.log(hi), rungs))


@dataclass
class ScheduleSearch:
    """What `search_schedule` found: the table, its calibration evaluation, every evaluation made."""

    p: np.ndarray  # [L, E] NaN = dense
    lam: float
    predicted_sparsity: float
    dense: EvalPoint
    point: EvalPoint | None  # the calibration evaluation of the chosen table (None: nothing passed, all dense)
    safe_experts: list
    evaluations: list[dict] = field(default_factory=list)  # {lam, predicted, score, ratio, sparsity_flop, passed}

    @property
    def num_evaluations(self) -> int:
        return len(self.evaluations) + 1  # + dense


def search_schedule(evaluate: Evaluate, curves: ExpertCurves, *, target: float = 0.99,
                    max_evals: int = DEFAULT_MAX_EVALS, min_tokens: int = DEFAULT_MIN_TOKENS,
                    chance: float | None = None, dense: EvalPoint | None = None,
                    on_eval: Callable[[dict], None] | None = None, refine: bool = True,
                    confidence: float = DEFAULT_CONFIDENCE) -> ScheduleSearch:
    """Return the schedule of the largest multiplier whose real calibration score is ≥ target × dense.

    evaluate(p) is a `moeprof.evaluate.runners` evaluator (p: None for dense, or the [L, E] table). Bisection
    over `lambda_ladder`: the predicted sparsity is monotone in λ, so the passing region is taken to be the rungs
    below the first failing one. At most `max_evals` full evaluations, dense included. `refine`: the evaluations
    left then bisect on how many of the entries that differ between the last passing and the first failing
    table to change (cheapest predicted damage per sparsity first). `target` and `max_evals` are as
    `OptimizeConfig` validates them (target in (0, 1], max_evals ≥ 2). A table passes by the acceptance rule
    (`moeprof.optimize.margin.accept_table`: the lower confidence bound of its ratio at `confidence`, on each
    part).
    """
    dense = dense if dense is not None else evaluate(None)
    check_dense(dense, chance, target)
    ladder = lambda_ladder(curves)
    tables = [allocate(curves, lam, min_tokens=min_tokens) for lam in ladder]
    # drop rungs that give the same table as the rung before (they would cost an evaluation for nothing)
    keep = [0] + [k for k in range(1, len(tables)) if not np.array_equal(tables[k][0], tables[k - 1][0],
                                                                           equal_nan=True)]
    ladder, tables = ladder[keep], [tables[k] for k in keep]
    evaluations: list[dict] = []
    cache: dict[int, EvalPoint] = {}
    # most evaluations, dense included: the sparsest rung, then bisection over the rest (for "k/N" progress)
    most = min(max_evals, 2 + math.ceil(math.log2(max(len(tables), 1)))
               + (math.ceil(math.log2(max(curves.tokens.size, 2))) if refine else 0))

    def measure(table: np.ndarray, lam: float, predicted: float, **extra) -> tuple[bool, EvalPoint]:
        pt = evaluate(torch.as_tensor(table, dtype=torch.float64))
        rule = accept_table(dense, pt, target=target, confidence=confidence)
        row = {"lam": lam, "predicted": predicted, "score": pt.score,
               "ratio": pt.score / dense.score, "margin_ratio": rule.bound, "sparsity_flop": pt.sparsity_flop_overall,
               "sparsity_token": pt.sparsity_token, "passed": rule.accepted, **extra}
        evaluations.append(row)
        if on_eval is not None:
            on_eval({**row, "evaluation": len(evaluations) + 1, "max_evaluations": most,
                     "dense_score": dense.score})
        return row["passed"], pt

    def run(k: int) -> bool:
        passed, cache[k] = measure(tables[k][0], float(ladder[k]), tables[k][1])
        return passed

    lo, hi = -1, len(tables)  # lo: largest known passing rung (-1 = dense), hi: smallest known failing rung
    # first try the sparsest rung: a robust model may pass everything
    while hi - lo > 1 and len(evaluations) + 1 < max_evals:
        mid = hi - 1 if lo == -1 and hi == len(tables) else (lo + hi) // 2
        if run(mid):
            lo = mid
        else:
            hi = mid
    L, E = curves.tokens.shape
    if lo >= 0:
        table, predicted, safe = tables[lo]
        found = ScheduleSearch(table, float(ladder[lo]), predicted, dense, cache[lo], safe, evaluations)
    else:
        found = ScheduleSearch(np.full((L, E), np.nan), 0.0, 0.0, dense, None, tables[0][2], evaluations)
    if refine and hi < len(tables) and len(evaluations) + 1 < max_evals:
        # the rungs lo and hi can differ in many entries at once (layers of like sensitivity cross together):
        # apply the changes from lo's table toward hi's one at a time, cheapest predicted damage per sparsity
        # first, and bisect on how many of them keep the target, with the evaluations left
        changes = _changes(curves, found.p, tables[hi][0], min_tokens)
        k_ok, k_bad = 0, len(changes)
        while k_bad - k_ok > 1 and len(evaluations) + 1 < max_evals:
            mid = (k_ok + k_bad) // 2
            table = _apply(found.p, changes[:mid])
            passed, pt = measure(table, float(ladder[hi]), _predicted(curves, table), refine=[mid, len(changes)],
                                 label=f"λ {ladder[hi]:.4g}, {mid} of its {len(changes)} changes")
            if passed:
                k_ok = mid
                found = ScheduleSearch(table, float(ladder[hi]), _predicted(curves, table), dense, pt,
                                       tables[hi][2], evaluations)
            else:
                k_bad = mid
    return found


def _changes(curves: ExpertCurves, base: np.ndarray, top: np.ndarray, min_tokens: int) -> list:
    """Return [(l, e, p)] where `top` differs from `base`, cheapest Δdamage / Δ(FLOP-weighted sparsity) first."""
    weight = curves.tokens * curves.flops_per_token[:, None]
    weight = weight / max(weight.sum(), 1e-300)
    grid = np.asarray(curves.p_grid, dtype=float)

    def cost(l, e, p):  # (damage, gain) of expert (l, e) at p (NaN: dense)
        if np.isnan(p):
            return 0.0, 0.0
        j = int(np.argmin(np.abs(grid - p)))
        return float(curves.damage[l, e, j]), float(curves.sparsity[l, e, j] * weight[l, e])

    rows = []
    for l, e in zip(*np.nonzero(~((base == top) | (np.isnan(base) & np.isnan(top))))):
        (d0, g0), (d1, g1) = cost(l, e, base[l, e]), cost(l, e, top[l, e])
        rate = (d1 - d0) / (g1 - g0) if g1 > g0 else math.inf
        rows.append((rate, int(l), int(e), float(top[l, e])))
    return [(l, e, p) for _, l, e, p in sorted(rows)]


def _apply(base: np.ndarray, changes: list) -> np.ndarray:
    table = base.copy()
    for l, e, p in changes:
        table[l, e] = p
    return table


def _predicted(curves: ExpertCurves, table: np.ndarray) -> float:
    """Predicted FLOP-weighted sparsity of a table (NaN: dense, counting 0)."""
    weight = curves.tokens * curves.flops_per_token[:, None]
    grid = np.asarray(curves.p_grid, dtype=float)
    s = 0.0
    for l, e in zip(*np.nonzero(~np.isnan(table))):
        s += float(np.nan_to_num(curves.sparsity[l, e, int(np.argmin(np.abs(grid - table[l, e])))])) * weight[l, e]
    return s / max(weight.sum(), 1e-300)


"""The uniform anchor: the largest uniform p that keeps the target on the calibration split, within a budget.

It is the operating point of the layer probes and of the marginal method, and a candidate schedule itself (the
optimizer returns the uniform table when it is sparser on calibration than what the method found).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from moeprof.critical.search import DEFAULT_COARSE, find_critical
from moeprof.evaluate.point import EvalPoint, Evaluate
from moeprof.optimize.margin import DEFAULT_CONFIDENCE, accept_table


@dataclass
class UniformAnchor:
    """The largest uniform grid p known to pass on the calibration split (`uniform_anchor`)."""

    p: float | None  # None: no grid p was seen passing (dense)
    point: EvalPoint | None  # its calibration evaluation
    evaluations: list[dict] = field(default_factory=list)  # {p, score, ratio, sparsity_flop, passed}


class _BudgetSpent(Exception):
    pass


def uniform_anchor(evaluate: Evaluate, p_grid, dense: EvalPoint, *, target: float, budget: int,
                   on_eval: Callable[[dict], None] | None = None, search: str = "critical",
                   start: float | None = None, confidence: float = DEFAULT_CONFIDENCE) -> UniformAnchor:
    """Return the uniform p that keeps score ≥ target × dense on the calibration split, within `budget` evaluations.

    search="critical": `find_critical(extend=True)` with the cached dense, i.e. the very search that gives the
    uniform baseline (continuous p to ±0.005; 5-8 evaluations on SmolLM2 and tiny-moe). search="grid":
    bisection over the ascending `p_grid` for its lowest passing p (⌈log2(P + 1)⌉ evaluations settle it).
    When the budget runs out first, the sparsest p seen passing is returned (or None: dense).

    start: a uniform p known from elsewhere (a profile store's critical search, on other data): it is evaluated
    first and, when it passes, it is the anchor (one evaluation). When it fails, the same search runs on the
    denser side of it only: "critical" = `find_critical` with its coarse scan points above `start` and `start`
    as the last (failing, already evaluated) one, then its ITP refinement; "grid" = the bisection over the grid
    p above `start`.

    A p passes by the optimizer's acceptance rule (`moeprof.optimize.margin.accept_table` at `confidence`): the
    same rule as every table, so the comparison with the schedule stays fair. The searches see the rule's bound
    (`Acceptance.bound`) as the score ratio; the anchor's `point` and rows keep the real evaluation.
    """
    if search not in ("critical", "grid"):
        raise ValueError(f"search must be 'critical' or 'grid', got {search!r}")
    if start is not None and not 0.0 <= start < 1.0:
        raise ValueError(f"start must be a sparse uniform p in [0, 1), got {start}")
    rows: list[dict] = []
    points: list[EvalPoint] = []

    seen: dict[float, EvalPoint] = {}
    passed_at: dict[float, bool] = {}  # the rule's decision at each p evaluated

    def counted(p) -> EvalPoint:
        """The evaluation at p as the searches see it: its score is dense × the margin ratio."""
        if round(float(p), 10) in seen:  # `start`, met again by the search: evaluated once, counted once
            return seen[round(float(p), 10)]
        if len(rows) >= budget:
            raise _BudgetSpent
        pt = evaluate(p)
        rule = accept_table(dense, pt, target=target, confidence=confidence)
        row = {"p": float(p), "score": pt.score, "ratio": pt.score / dense.score, "margin_ratio": rule.bound,
               "sparsity_flop": pt.sparsity_flop_overall, "sparsity_token": pt.sparsity_token,
               "passed": rule.accepted}
        rows.append(row)
        points.append(pt)
        passed_at[round(float(p), 10)] = rule.accepted
        seen[round(float(p), 10)] = seen_pt = replace(pt, score=rule.bound * dense.score, extra=dict(pt.extra))
        if on_eval is not None:
            on_eval(row)
        return seen_pt

    def passes(p) -> bool:
        """Evaluate p (once) and return the acceptance rule's decision on it."""
        counted(p)
        return passed_at[round(float(p), 10)]

    def best_seen() -> UniformAnchor:
        ok = [(r["p"], pt) for r, pt in zip(rows, points) if r["passed"]]
        if not ok:
            return UniformAnchor(None, None, rows)
        p, pt = min(ok, key=lambda t: t[0])
        return UniformAnchor(p, pt, rows)

    if start is not None:
        try:
            if passes(start):
                return best_seen()
        except _BudgetSpent:
            return best_seen()
    if search == "critical":
        scan = {} if start is None else {"coarse": tuple(c for c in DEFAULT_COARSE if c > start),
                                         "p_min": float(start), "check": False}
        try:
            res = find_critical(counted, target=target, dense=dense, extend=start is None, **scan)
        except _BudgetSpent:
            return best_seen()
        at = [pt for r, pt in zip(rows, points) if abs(r["p"] - res.critical_p) < 1e-9 and r["passed"]]
        return UniformAnchor(float(res.critical_p), at[0], rows) if at else UniformAnchor(None, None, rows)
    grid = [float(p) for p in p_grid]
    fail, ok = -1, len(grid)  # highest index known to fail, lowest known to pass (len: dense)
    if start is not None:  # `start` failed: so does every grid p at or below it
        fail = max((k for k, p in enumerate(grid) if p <= start + 1e-12), default=-1)
    try:
        while ok - fail > 1:
            mid = (fail + ok) // 2
            if passes(grid[mid]):
                ok = mid
            else:
                fail = mid
    except _BudgetSpent:
        pass
    return best_seen()


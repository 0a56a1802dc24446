"""Critical sparsity: the largest realized sparsity whose score stays ≥ target × dense (arXiv 2509.00454).

The search looks for the critical p — the p furthest from dense whose score ratio to the dense score is still
≥ target (0.99 by default) — to ±`tol` (0.005) in p, in few full evaluations. An evaluation is a callable
`evaluate(p) -> EvalPoint` (p=None means dense: sparsification off); `moeprof.evaluate` builds them for
perplexity and for lm-eval tasks, and tests use synthetic score curves.

The search, for top-p / top-k (dense at p = 1; for max-p, dense at p = 0 and everything below is mirrored):

1. Dense: one evaluation, cached (ratio 1 at p = 1 by construction, so p = 1 is never evaluated).
2. Scan from the dense end down, stopping at the first failing point: p = 0.9 first, then each point aimed by
   the secant of the score ratios seen so far a little past the predicted crossing (at most twice the last
   step away; a flat step falls back to the fixed points 0.7, then `p_min`). The answer is the edge of the
   *passing region connected to dense*: a lucky pass at a low p below a failing p is never taken, and nothing
   below a failure is evaluated.
3. Check (opt-in, `check=True`): the next fixed scan point below the first failure is evaluated too. A pass
   there, or any evaluated pass below an evaluated failure, flags the result (`monotone=False`) with a
   NonMonotoneScoreWarning; the answer stays the conservative one.
4. Refine inside the failing step by ITP (interpolate–truncate–project): regula falsi, kept close
   enough to the midpoint that it never needs more than one evaluation beyond bisection, and superlinear on
   smooth curves. It stops when the bracket is ≤ tol wide, so the true crossing lies within tol of the answer.

The critical point is the passing end of the final bracket. Every evaluated point is kept.
Critical *sparsity* is the sparsity realized at the critical point (token-weighted and FLOP-weighted), never p.

Evaluations per search (`python -m moeprof.critical`, synthetic curves with the crossing at 97 places in
[0.505, 0.985], target 0.99, tol 0.005, dense included): linear / quadratic / cubic / logistic curves
6.00 / 6.67 / 6.79 / 6.97 on average (max 7–8), a step curve 9.74 (max 11); with check=True 7.0–7.6 (max 9).
The fixed scan with the check took 7.35–7.66 (docs/performance.md). A uniform grid with the same resolution on
[0.5, 1] needs 101; the paper's grid had 26 points.

Per-example scores (accuracy per document, or NLL and token count per sequence) give a paired bootstrap
confidence interval of the score ratio at the critical point.

Nothing here knows models or the store: `moeprof.critical.pipeline` wires evaluators and the store to it.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from moeprof import rules
from moeprof.errors import MoeprofError
from moeprof.evaluate.point import EvalPoint, Evaluate
from moeprof.rules import SEARCHABLE_RULES

DEFAULT_TARGET = 0.99
DEFAULT_TOL = 0.005
DEFAULT_P_MIN = 0.5
DEFAULT_COARSE = (0.9, 0.7)
EXTEND_STEP = 0.2  # scan step below p_min when the search is asked to extend (0.3, 0.1, then EXTEND_FLOOR)
EXTEND_FLOOR = 0.05  # the last point of an extended scan (p = 0 keeps nothing: the FFN removed, not sparsified)  # scan points between dense and p_min (p_min itself is the last one)
ITP_N0 = 1  # ITP's slack: at most this many evaluations beyond bisection's count
ITP_KAPPA1 = 0.2


class CriticalSearchError(MoeprofError, ValueError):
    """The critical-sparsity search cannot run on this input (message says what to change)."""


class MeaninglessCriticalWarning(UserWarning):
    """The dense score is at chance level, so a ratio to it says nothing about the model."""


class CoarseScoreWarning(UserWarning):
    """One example moves the score ratio by more than 1 − target: the eval set is too small for the target."""


class NonMonotoneScoreWarning(UserWarning):
    """A sparser setting scored above the target below a failing one: the score curve is not monotone."""


# ----------------------------------------------------------------------------------------------------------
# Result


@dataclass
class CriticalResult:
    """The outcome of one critical-sparsity search (plain data: `to_dict()` for JSON; the store's record is
    `moeprof.critical.critical_record`)."""

    target: float
    rule: str
    type: str | None
    task: str | None
    critical_p: float  # the passing p furthest from dense, within ±tol of the crossing
    critical_sparsity_token: float  # realized at critical_p, token-weighted
    critical_sparsity_flop: float  # realized at critical_p, FLOP-weighted
    dense_score: float
    critical_score: float
    critical_ratio: float  # critical_score / dense_score
    ratio_ci: tuple[float, float] | None  # paired bootstrap CI of the ratio at critical_p
    ci_level: float
    failing_p: float | None  # the nearest evaluated failing p below (above, for max-p) critical_p
    num_evaluations: int  # full evaluations made by the search (dense included unless it was passed in cached)
    monotone: bool  # False when a point beyond a failing one passed again
    at_bound: bool  # True when even p_min passed (the true critical p may lie further)
    tol: float
    points: list[EvalPoint]  # every evaluation, in the order made (dense first)
    dense: EvalPoint
    critical: EvalPoint
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the run warned about (`run_critical` fills it)
    settings: dict = field(default_factory=dict)  # what the evaluations ran on: limit, seq_len, max_tokens, examples

    @property
    def per_expert_sparsity(self) -> np.ndarray | None:
        """Realized sparsity [L, E] of each expert at the critical p (the tokens routed to it)."""
        return self.critical.per_expert_sparsity

    def to_dict(self) -> dict:
        """Return the result as plain Python data; `points` as a list of dicts in evaluation order."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("points", "dense", "critical")}
        d["ratio_ci"] = None if self.ratio_ci is None else [float(self.ratio_ci[0]), float(self.ratio_ci[1])]
        d["points"] = [pt.to_dict() for pt in self.points]
        d["per_expert_sparsity"] = (None if self.per_expert_sparsity is None
                                    else np.asarray(self.per_expert_sparsity).tolist())
        return d

    def points_table(self) -> dict[str, np.ndarray]:
        """Return the evaluated points as columns (p, score, ratio, sparsity_token, sparsity_flop, passed),
        sparse points only, in evaluation order (the store keeps them as the record's `points`)."""
        sparse = [pt for pt in self.points if pt.p is not None]
        ratio = np.array([pt.score / self.dense_score for pt in sparse], dtype=np.float64)
        return {
            "p": np.array([pt.p for pt in sparse], dtype=np.float64),
            "score": np.array([pt.score for pt in sparse], dtype=np.float64),
            "ratio": ratio,
            "sparsity_token": np.array([pt.sparsity_token for pt in sparse], dtype=np.float64),
            "sparsity_flop": np.array([pt.sparsity_flop for pt in sparse], dtype=np.float64),
            "passed": ratio >= self.target,
        }


@contextmanager
def kept_warnings(kept: list[str], on_warning: Callable[[str], None] | None):
    """Within: each UserWarning's message is appended to `kept` (once) and, as it happens, passed to
    `on_warning`, or shown as Python shows it when there is none; other warnings are shown as usual. The
    warnings machinery (filters, showwarning) is restored on exit."""
    with warnings.catch_warnings():
        show = warnings.showwarning
        warnings.simplefilter("always", UserWarning)

        def collect(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, UserWarning):
                if str(message) in kept:
                    return
                kept.append(str(message))
                if on_warning is not None:
                    on_warning(str(message))
                    return
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = collect
        yield


# ----------------------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_ratio_ci(dense: EvalPoint, sparse: EvalPoint, *, n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float] | None:
    """Return a paired percentile-bootstrap CI of score(sparse) / score(dense), or None without per-example data.

    Examples are resampled with replacement, the same indices for both (the examples are shared, so the
    pairing removes most of the between-example variance). For perplexity, whole sequences are resampled.
    """
    if dense.example_values is None or sparse.example_values is None:
        return None
    n = dense.example_values.size
    if sparse.example_values.size != n:
        raise ValueError(f"dense and sparse evaluations cover different examples ({n} vs {sparse.example_values.size})")
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = sparse.score_of(idx) / dense.score_of(idx)
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size == 0:
        return None
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------------------
# Search


def _check_inputs(target: float, tol: float, p_min: float, rule: str) -> None:
    if not (isinstance(target, (int, float)) and 0.0 < target <= 1.0) or math.isnan(target):
        raise CriticalSearchError(f"target must lie in (0, 1] (a fraction of the dense score, e.g. 0.99), got {target}")
    if not 0.0 < tol < 0.5:
        raise CriticalSearchError(f"tol must lie in (0, 0.5), got {tol}")
    if not 0.0 <= p_min < 1.0:
        raise CriticalSearchError(f"p_min must lie in [0, 1), got {p_min}")
    if rule not in SEARCHABLE_RULES:
        raise CriticalSearchError(f"unknown rule {rule!r}; choose one of {', '.join(SEARCHABLE_RULES)}")


def check_dense(dense: EvalPoint, chance: float | None, target: float | None = None) -> None:
    """Raise on a dense score that makes ratios undefined; warn when it is at chance level, or when one example
    moves the ratio by more than 1 − target (for a mean score: 1 / (N · dense score), e.g. 100 documents at
    accuracy 0.36 → 2.8 % per document, so a 99 % target means "no document may flip")."""
    if not math.isfinite(dense.score) or dense.score <= 0:
        raise CriticalSearchError(
            f"the dense score is {dense.score}; a score ratio to it is undefined (is the task's metric "
            f"always zero for this model, e.g. a generation task on a tiny model?)")
    if chance is not None and chance > 0:
        margin = 0.0
        if dense.example_values is not None and dense.score_kind == "mean" and dense.example_values.size > 1:
            frac = dense.example_values / dense.example_weights
            margin = 2.0 * float(np.std(frac, ddof=1)) / math.sqrt(frac.size)  # two standard errors
        if dense.score <= chance + margin:
            warnings.warn(
                f"the dense score {dense.score:.4f} is at chance level ({chance:.4f}"
                + (f" + 2 s.e. {margin:.4f}" if margin else "") + "): the critical sparsity is meaningless for "
                "this model and task (use a larger model, an easier task, or perplexity)",
                MeaninglessCriticalWarning, stacklevel=3)
    if target is not None and target < 1 and dense.example_values is not None and dense.score_kind == "mean":
        step = float(np.max(np.abs(dense.example_values))) / float(np.sum(dense.example_weights)) / dense.score
        if step > 1 - target:
            warnings.warn(
                f"one example moves the score ratio by {step:.1%}, more than 1 − target = {1 - target:.1%}: with "
                f"{dense.example_values.size} examples the search finds where no example flips, not a "
                f"{target:.0%} point; evaluate more examples (raise --limit) or use perplexity",
                CoarseScoreWarning, stacklevel=3)


def find_critical(evaluate: Evaluate, *, target: float = DEFAULT_TARGET, tol: float = DEFAULT_TOL,
                  p_min: float = DEFAULT_P_MIN, coarse: Sequence[float] = DEFAULT_COARSE, rule: str = "topp",
                  chance: float | None = None, check: bool = False, type: str | None = None,
                  task: str | None = None, dense: EvalPoint | None = None, n_boot: int = 2000,
                  ci_level: float = 0.95, seed: int = 0,
                  on_point: Callable[[EvalPoint], None] | None = None, extend: bool = False) -> CriticalResult:
    """Return the CriticalResult: the critical p (to ±tol), its realized sparsity, scores and every evaluated point.

    evaluate(p) runs one full evaluation with the rule's parameter p (None = dense). For top-p / top-k the
    search covers p in [p_min, 1] (dense at 1); for max-p, p in [0, 1 - p_min] (dense at 0). `dense` reuses a
    cached dense evaluation (it then does not count). `chance` is the task's chance score (warn at or below it).
    `check=True` spends one evaluation one scan step below the first failure (a point a monotone curve already
    fails), to catch a non-monotone curve the other points would not show. `on_point` is
    called after each evaluation (progress display). `extend=True`: when even p_min passes, the scan goes on
    below it (`EXTEND_STEP` at a time, down to `EXTEND_FLOOR` = 0.05) until a point fails, so a robust model gets its critical
    point rather than the floor (`moeprof critical` and the pipeline pass it; the bare default keeps p_min).

    Worked example (ratio(p) = 1 - 0.1·(1 - p), target 0.99, so the crossing is at p = 0.9): dense; scan
    0.9 → ratio 0.99, passes; 0.7 → 0.97, fails; check 0.5 → fails; ITP in [0.7, 0.9] → 0.86 fails,
    0.8984 fails: bracket [0.8984, 0.9], critical_p = 0.9 after 6 evaluations.
    """
    _check_inputs(target, tol, p_min, rule)
    warned: list[str] = []
    with kept_warnings(warned, None):  # kept in the result (and the store), shown as usual
        result = _search(evaluate, target=target, tol=tol, p_min=p_min, coarse=coarse, rule=rule, chance=chance,
                         check=check, type=type, task=task, dense=dense, n_boot=n_boot, ci_level=ci_level,
                         seed=seed, on_point=on_point, extend=extend)
    result.warnings = warned
    return result


def _search(evaluate, *, target, tol, p_min, coarse, rule, chance, check, type, task, dense, n_boot, ci_level,
            seed, on_point, extend) -> CriticalResult:
    mirrored = rules.rule(rule).mirrored  # e.g. max-p keeps entries >= p·max: larger p = sparser, dense at p = 0

    def to_p(t: float) -> float:  # search coordinate t (dense at t = 1, sparser as t falls) -> rule's p
        return round(1.0 - t if mirrored else t, 10)

    points: list[EvalPoint] = []
    by_t: dict[float, EvalPoint] = {}

    def run(t: float) -> EvalPoint:
        t = round(t, 10)
        if t in by_t:
            return by_t[t]
        pt = evaluate(to_p(t))
        if pt.p is None or abs(pt.p - to_p(t)) > 1e-9:
            pt.p = to_p(t)
        points.append(pt)
        by_t[t] = pt
        if on_point is not None:
            on_point(pt)
        return pt

    dense_cached = dense is not None
    if dense is None:
        dense = evaluate(None)
        dense.p = None
        if on_point is not None:
            on_point(dense)
    points.append(dense)
    check_dense(dense, chance, target)

    def passes(pt: EvalPoint) -> bool:
        return pt.score / dense.score >= target - 1e-12

    notes: list[str] = []
    # 2. Coarse scan from the dense end down, each step aimed by the ratios seen so far.
    coarse = _scan(coarse, p_min, extend)
    hi_t, hi_pt = 1.0, None  # passing end (t = 1 is dense: ratio 1)
    lo_t = None
    seen = [(1.0, 1.0)]  # (t, ratio) of the passing points, dense first
    t = coarse[0]
    while t is not None:
        pt = run(t)
        if not passes(pt):
            lo_t = t
            break
        hi_t, hi_pt = t, pt
        seen.append((t, pt.score / dense.score))
        t = _next_scan_point(seen, coarse, target, tol)

    monotone = True
    at_bound = lo_t is None
    if lo_t is not None:
        # 3. Check one coarse step further (opt-in: on a monotone curve the failure above already rules it out).
        if check:
            below = [t for t in coarse if t < lo_t - 1e-9]
            if below:
                run(below[0])
        # 4. Refine in [lo_t, hi_t].
        hi_t, hi_pt, lo_t = _refine(run, passes, dense.score, target, tol, lo_t, by_t[lo_t], hi_t, hi_pt)
    # Any pass below a failure among the points evaluated anyway says the curve is not monotone (no extra cost).
    fails = [t for t, pt in by_t.items() if not passes(pt)]
    higher_fail = max(fails) if fails else None
    beyond = sorted((t for t, pt in by_t.items() if passes(pt) and higher_fail is not None and t < higher_fail),
                    reverse=True)
    if beyond:
        monotone = False
        notes.append(f"p={to_p(beyond[0])} passes below the failing p={to_p(higher_fail)}: the score curve is "
                     "not monotone; the critical p is the edge of the passing region next to dense")
        warnings.warn(notes[-1], NonMonotoneScoreWarning, stacklevel=2)

    if hi_pt is None:  # even the first coarse point failed and refinement closed on the dense end
        crit = EvalPoint(p=to_p(1.0), score=dense.score, sparsity_token=0.0, sparsity_flop=0.0,
                         score_kind=dense.score_kind, example_values=dense.example_values,
                         example_weights=dense.example_weights)
        notes.append("no sparse setting reached the target; critical p is the dense end")
    else:
        crit = hi_pt
    ci = bootstrap_ratio_ci(dense, crit, n_boot=n_boot, level=ci_level, seed=seed)
    if at_bound:
        notes.append(f"even p={to_p(coarse[-1])} passed: the critical p lies at or beyond the search bound"
                     + ("" if extend else "; lower p_min"))
    return CriticalResult(
        target=float(target), rule=rule, type=type, task=task, critical_p=float(to_p(hi_t)),
        critical_sparsity_token=float(crit.sparsity_token), critical_sparsity_flop=float(crit.sparsity_flop),
        dense_score=float(dense.score), critical_score=float(crit.score),
        critical_ratio=float(crit.score / dense.score), ratio_ci=ci, ci_level=ci_level,
        failing_p=None if lo_t is None else float(to_p(lo_t)),
        num_evaluations=len(points) - int(dense_cached),
        monotone=monotone, at_bound=at_bound, tol=tol, points=points, dense=dense, critical=crit, notes=notes)


def _scan(coarse: Sequence[float], p_min: float, extend: bool) -> list[float]:
    """Return the coarse scan's points in search coordinates (dense at 1), from the dense end down."""
    scan = sorted({float(c) for c in coarse if p_min < c < 1.0}, reverse=True) + [p_min]
    if extend:  # below p_min toward 0 (search coordinate t: dense at 1), until a point fails
        scan += [round(float(t), 10) for t in np.arange(p_min - EXTEND_STEP, EXTEND_FLOOR, -EXTEND_STEP)
                 if t > EXTEND_FLOOR + 1e-9] + [EXTEND_FLOOR]
        scan = sorted(set(scan), reverse=True)
    return scan


MAX_AIMED_STEPS = 4  # passing aimed scan points before the scan falls back to its fixed points
AIM_PAST = 0.1  # aim this fraction of the estimated distance past the estimated crossing (a failure brackets it)


def _next_scan_point(seen: list[tuple[float, float]], scan: Sequence[float], target: float,
                     tol: float) -> float | None:
    """Return the next scan point below the last passing one (None: the bound passed), aimed by the ratios seen.

    seen: (t, ratio) of dense and the passing points, in scan order. The secant through the last two predicts
    where the ratio reaches the target; the next point goes a little past it, so that it most likely fails and
    brackets the crossing tightly (ITP then needs few steps), but never more than twice the last step away
    (a curve flat near dense says little about how far it stays flat) nor past the scan's bound. A flat last step
    (no drop), or more than MAX_AIMED_STEPS aimed passes, falls back to the fixed scan points.
    Worked example (target 0.99): dense (1, 1.0), 0.9 passes at 0.996 → the secant reaches 0.99 at t = 0.75;
    aim 0.1 · 0.15 past it: t = 0.735.
    """
    (t_a, r_a), (t_b, r_b) = seen[-2], seen[-1]
    bound = scan[-1]
    fixed = next((t for t in scan if t < t_b - 1e-9), None)
    if t_b <= bound + 1e-9:
        return None
    if r_b >= r_a or len(seen) - 1 > MAX_AIMED_STEPS:
        return fixed
    t_star = t_b - (r_b - target) * (t_a - t_b) / (r_a - r_b)  # secant estimate of the crossing
    t_aim = t_star - AIM_PAST * (t_b - t_star)
    t_next = max(t_aim, t_b - 2 * (t_a - t_b), bound)
    return round(min(t_next, t_b - tol), 10)


def max_evaluations(*, tol: float = DEFAULT_TOL, p_min: float = DEFAULT_P_MIN,
                    coarse: Sequence[float] = DEFAULT_COARSE, check: bool = False, extend: bool = False) -> int:
    """Return the most evaluations `find_critical` can make with these settings, dense included (the N of the
    "k/N" progress lines; searches usually need fewer: 7–9 on smooth curves).

    Dense + the scan (its fixed points, and the aimed ones before them) + the check + ITP's bound in the widest
    step the scan can take (bisection's count + ITP_N0)."""
    scan = _scan(coarse, p_min, extend)
    widest = max([a - b for a, b in zip([1.0] + scan, scan)] + [min(0.4, 1.0 - scan[-1])])
    refine = max(0, math.ceil(math.log2(widest / tol - 1e-12))) + ITP_N0
    return 1 + len(scan) + MAX_AIMED_STEPS + int(check) + refine


def _refine(run, passes, dense_score, target, tol, lo_t, lo_pt, hi_t, hi_pt):
    """Shrink the bracket (lo_t fails, hi_t passes) to width ≤ tol by ITP; return (hi_t, hi_pt, lo_t).

    ITP (Oliveira & Takahashi, ACM TOMS 2020): a regula-falsi step truncated towards the midpoint and projected
    into a shrinking window around it. It never needs more than one evaluation beyond bisection's count and
    converges superlinearly on smooth score curves.
    """
    eps = tol / 2  # ITP stops at width 2·eps
    f_lo = lo_pt.score / dense_score - target  # < 0
    f_hi = (1.0 if hi_pt is None else hi_pt.score / dense_score) - target  # >= 0
    a, b = lo_t, hi_t
    n_max = max(0, math.ceil(math.log2((b - a) / (2 * eps) - 1e-12))) + ITP_N0
    kappa1, kappa2 = ITP_KAPPA1 / (b - a), 2.0
    j = 0
    while b - a > 2 * eps + 1e-9:
        mid = 0.5 * (a + b)
        r = eps * 2 ** (n_max - j) - 0.5 * (b - a)  # how far from the midpoint this step may go
        delta = kappa1 * (b - a) ** kappa2
        x_f = (b * f_lo - a * f_hi) / (f_lo - f_hi) if f_hi > f_lo else mid  # regula falsi
        sigma = math.copysign(1.0, mid - x_f)
        x_t = x_f + sigma * delta if delta <= abs(mid - x_f) else mid
        x = x_t if abs(x_t - mid) <= r else mid - sigma * r
        x = min(max(x, a + 1e-6), b - 1e-6)
        pt = run(x)
        f_x = pt.score / dense_score - target
        if passes(pt):
            b, hi_pt, f_hi = round(x, 10), pt, f_x
        else:
            a, lo_pt, f_lo = round(x, 10), pt, f_x
        j += 1
    return b, hi_pt, a

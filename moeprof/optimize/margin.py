"""The acceptance rule of the schedule optimizer: a margin against the winner's curse.

The optimizer evaluates many tables on one calibration split and keeps the sparsest that passes. Picking the edge
of the constraint among noisy evaluations overstates the winner's score (the winner's curse): a table whose
calibration ratio is exactly the target reads below it on new text about half the time. So a table is accepted
only when the one-sided lower confidence bound of its calibration ratio clears the target:

    accepted  ⇔  min over parts q  LB_c( score_q(table) / score_q(dense) ) ≥ target

LB_c is the (1 − c) quantile of the paired bootstrap of the ratio (sequences / documents resampled with the
same indices for dense and table, `n_boot` resamples, a fixed seed so the rule is a deterministic function of
the two evaluations). c = `confidence` (default 0.9; 0.5 is the plain point estimate, the rule before issue 27).
`accept_table` is the rule, and the only place it is decided: the uniform anchor, the multiplier's and the marginal
method's tables, and the uniform table the verdict writes in place of one that does not beat it all pass through it.
Parts: a task of several corpora (`ppl:wikipedia,ppl:owt`, `ppl:domains`) tags its examples by part
(`EvalPoint.extra["parts"]` = [(name, start, stop)]); the constraint holds on each part with its own margin.
Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeprof.evaluate.point import EvalPoint
from moeprof.optimize.config import DEFAULT_CONFIDENCE
N_BOOT = 1000


def parts_of(pt: EvalPoint) -> list[tuple[str, int, int]]:
    """Return [(name, start, stop)] of the example ranges a point's parts cover ([("all", 0, N)] without parts)."""
    parts = (pt.extra or {}).get("parts")
    if parts:
        return [(str(n), int(a), int(b)) for n, a, b in parts]
    n = 0 if pt.example_values is None else int(pt.example_values.size)
    return [("all", 0, n)]


def _sub(pt: EvalPoint, a: int, b: int) -> EvalPoint:
    v, w = pt.example_values[a:b], pt.example_weights[a:b]
    score = float(v.sum() / w.sum()) if pt.score_kind == "mean" else float(np.exp(-v.sum() / w.sum()))
    return EvalPoint(p=pt.p, score=score, score_kind=pt.score_kind, example_values=v, example_weights=w)


def part_ratios(dense: EvalPoint, pt: EvalPoint, *, confidence: float = 0.5, n_boot: int = N_BOOT,
                seed: int = 0) -> dict[str, float]:
    """Return {part: the ratio's one-sided lower bound at `confidence`} (confidence ≤ 0.5: the point ratio).

    Without per-example values the point ratio of the whole is returned for "all" (no margin can be computed)."""
    if dense.example_values is None or pt.example_values is None:
        return {"all": pt.score / dense.score}
    if dense.example_values.size != pt.example_values.size:
        raise ValueError(f"dense and table evaluations cover different examples ({dense.example_values.size} vs "
                         f"{pt.example_values.size})")
    out = {}
    rng = np.random.default_rng(seed)
    for name, a, b in parts_of(pt):
        d, s = _sub(dense, a, b), _sub(pt, a, b)
        ratio = s.score / d.score
        if confidence <= 0.5 or b - a < 2:
            out[name] = float(ratio)
            continue
        idx = rng.integers(0, b - a, size=(n_boot, b - a))
        with np.errstate(divide="ignore", invalid="ignore"):
            boot = s.score_of(idx) / d.score_of(idx)
        boot = boot[np.isfinite(boot)]
        # the bootstrap's quantile, shifted so that it is a margin below the observed ratio (percentile method)
        out[name] = float(min(ratio, np.quantile(boot, 1.0 - confidence))) if boot.size else float(ratio)
    return out


def margin_ratio(dense: EvalPoint, pt: EvalPoint, *, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Return the ratio the acceptance rule compares with the target: the lowest part's lower confidence bound."""
    return min(part_ratios(dense, pt, confidence=confidence).values())


@dataclass(frozen=True)
class Acceptance:
    """What the acceptance rule decided for one table: `accepted`, and the ratio it compared with the target
    (`bound`: the lowest part's lower confidence bound; the searches see `bound × dense score` as the score)."""

    accepted: bool
    bound: float
    target: float
    confidence: float


def accept_table(dense: EvalPoint, pt: EvalPoint, *, target: float,
                 confidence: float = DEFAULT_CONFIDENCE) -> Acceptance:
    """The acceptance rule: `pt` (a table's calibration evaluation) is accepted when every part's ratio to `dense`
    clears `target` by the margin at `confidence` (`margin_ratio` ≥ target). Every table the optimizer may write
    is accepted or refused here, the uniform one included."""
    bound = margin_ratio(dense, pt, confidence=confidence)
    return Acceptance(bool(bound >= target - 1e-12), float(bound), float(target), float(confidence))


def tokens_to_resolve(ci: tuple[float, float] | None, tokens: int | None, target: float) -> int | None:
    """Return about how many tokens (or documents) would make the ratio's CI half as wide as the budget 1 − target.

    The CI's half-width falls as 1/√n: n' = n · (half-width / ((1 − target) / 2))². None without a CI or a count."""
    if ci is None or not tokens or target >= 1.0:
        return None
    half = (ci[1] - ci[0]) / 2
    return int(np.ceil(tokens * (half / ((1.0 - target) / 2)) ** 2))

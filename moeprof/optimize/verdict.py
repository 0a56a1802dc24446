"""The verdict on a schedule: does it keep the target on text it was not fitted on, and what did it buy over uniform p?

    v = judge(heldout_evaluate, dense, scheduled, target=0.99, task="ppl:wikipedia", start_p=0.81)
    print("\n".join(v.lines()))          # what `moeprof schedule`, `moeprof eval --schedule`, `info` print
    schedule.provenance["verdict"] = v.to_dict()

1. The held-out ratio against the target, with the paired bootstrap CI; a warning when it misses (the lowest part
   of a task of several corpora decides), and one when the CI is wider than the budget 1 − target (the tokens
   given cannot resolve the target; `margin.tokens_to_resolve` says about how many would).
2. Uniform p at the same held-out score: a few held-out evaluations bisect the uniform p whose score equals the
   schedule's (linear interpolation between the bracketing pair); its FLOP-weighted sparsity against the
   schedule's is the gain in points. The noise: the half-width of the paired bootstrap CI of score(schedule) /
   score(uniform at the nearer bracket end), times the local slope d sparsity / d ratio, in points.
3. When the gain does not exceed the noise, the verdict says "no gain over uniform p" (`beats_uniform` False);
   the optimizer then writes the uniform table (`optimize_schedule`).

Numpy only (the evaluations come from the caller's `Evaluate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from moeprof.critical.search import bootstrap_ratio_ci
from moeprof.evaluate.point import EvalPoint, Evaluate
from moeprof.optimize.config import DEFAULT_VERDICT_EVALS
from moeprof.optimize.margin import part_ratios, tokens_to_resolve


@dataclass
class Verdict:
    """What `judge` found (`to_dict` is the provenance's `verdict`; `from_dict` reads it back)."""

    target: float
    task: str
    heldout_ratio: float
    heldout_ratio_ci: tuple[float, float] | None = None
    heldout_parts: dict = field(default_factory=dict)  # {part: held-out ratio} (a task of several corpora)
    sparsity_flop: float | None = None  # the schedule's held-out FLOP-weighted sparsity
    uniform_p: float | None = None  # uniform p at the schedule's held-out score
    uniform_sparsity_flop: float | None = None
    uniform_bound: str = "equal"  # "equal"; "at least": even the sparsest uniform p tried kept the score
    gain_points: float | None = None  # 100 × (schedule − uniform) FLOP-weighted sparsity at equal held-out score
    noise_points: float | None = None
    uniform_evaluations: int = 0
    tokens: int | None = None  # held-out tokens (perplexity) or documents scored
    tokens_to_resolve: int | None = None
    schedule_is_uniform: bool = False
    written: str = "optimized"  # what the schedule file holds: "optimized", or "uniform p …"

    @property
    def worst_ratio(self) -> float:
        return min(self.heldout_parts.values()) if self.heldout_parts else self.heldout_ratio

    @property
    def meets_target(self) -> bool:
        return self.worst_ratio >= self.target - 1e-12

    @property
    def resolvable(self) -> bool:
        """False when the held-out CI is wider than the budget 1 − target (the evaluation cannot resolve it)."""
        ci = self.heldout_ratio_ci
        return ci is None or (ci[1] - ci[0]) / 2 <= (1.0 - self.target)

    @property
    def beats_uniform(self) -> bool | None:
        """True when the gain exceeds its noise; None when there is no comparison."""
        if self.schedule_is_uniform:
            return False
        if self.gain_points is None:
            return None
        return self.gain_points > (self.noise_points or 0.0)

    def lines(self, *, what: str = "held-out") -> list[str]:
        """Return the verdict as plain lines; warnings start with "warning:"."""
        ci = self.heldout_ratio_ci
        ci_text = "" if ci is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]"
        parts = ""
        if len(self.heldout_parts) > 1:
            parts = " (" + ", ".join(f"{k} {v:.4f}" for k, v in self.heldout_parts.items()) + ")"
        out = []
        if self.meets_target:
            out.append(f"{what} ratio {self.heldout_ratio:.4f}{ci_text}{parts} meets the target {self.target:g}")
        else:
            out.append(f"warning: {what} ratio {self.heldout_ratio:.4f}{ci_text}{parts} MISSES the target "
                       f"{self.target:g} on {self.task}")
        if not self.resolvable:
            need = "" if self.tokens_to_resolve is None else f"; about {self.tokens_to_resolve} would"
            out.append(f"warning: the {what} CI (±{(ci[1] - ci[0]) / 2:.4f}) is wider than the budget "
                       f"{1 - self.target:.4g}: {self.tokens or 'these'} tokens/documents cannot resolve the "
                       f"target{need}")
        if self.schedule_is_uniform:
            out.append(f"the schedule is uniform p {self.uniform_p:.4f}: no gain over uniform p (the optimized table "
                       "did not beat it)" if self.uniform_p is not None else "the schedule is uniform")
        elif self.gain_points is not None:
            noise = "" if self.noise_points is None else f", noise ±{self.noise_points:.1f}"
            bound = "at least " if self.uniform_bound == "at least" else ""
            out.append(f"uniform p {self.uniform_p:.4f} keeps the same {what} score at FLOP sparsity "
                       f"{bound}{self.uniform_sparsity_flop:.3f}; the schedule {self.sparsity_flop:.3f}: "
                       f"{self.gain_points:+.1f} points{noise}")
            if not self.beats_uniform:
                out.append(f"no gain over uniform p on {what} ({self.gain_points:+.1f} points within the noise)"
                           + ("" if self.written == "optimized" else
                              f": wrote {self.written} (the optimized table is kept in the provenance, optimized_p)"))
        return out

    def to_dict(self) -> dict:
        """Return the verdict as JSON-able data, with its lines (`text`) and the derived flags."""
        d = asdict(self)
        d["heldout_ratio_ci"] = None if self.heldout_ratio_ci is None else list(self.heldout_ratio_ci)
        d.update(meets_target=self.meets_target, resolvable=self.resolvable, beats_uniform=self.beats_uniform,
                 text="\n".join(self.lines()))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        names = set(cls.__dataclass_fields__)
        v = cls(**{k: d[k] for k in names if k in d})
        if v.heldout_ratio_ci is not None:
            v.heldout_ratio_ci = tuple(v.heldout_ratio_ci)
        return v


def verdict_lines(provenance: dict | None) -> list[str]:
    """Return the lines of a schedule's stored verdict ([] when its provenance holds none)."""
    d = (provenance or {}).get("verdict")
    if not isinstance(d, dict) or "heldout_ratio" not in d:
        return []
    return Verdict.from_dict(d).lines()


def _num_examples(pt: EvalPoint) -> int | None:
    if pt.example_weights is None:
        return None
    return int(pt.example_weights.sum()) if pt.score_kind == "inv_ppl" else int(pt.example_weights.size)


def judge(evaluate: Evaluate, dense: EvalPoint, scheduled: EvalPoint, *, target: float, task: str,
          start_p: float | None = None, budget: int = DEFAULT_VERDICT_EVALS, mirrored: bool = False,
          schedule_is_uniform: bool = False, uniform_p: float | None = None,
          points: dict | None = None) -> Verdict:
    """Return the Verdict of `scheduled` against `dense` (both from `evaluate`, on text the schedule was not fitted on).

    At most `budget` evaluations `evaluate(p)` of uniform p bisect the p with the schedule's score, starting at
    `start_p` (e.g. the calibration anchor; default 0.9). `mirrored`: the rule is dense at p = 0 (max-p).
    `schedule_is_uniform`: the schedule is uniform p `uniform_p` (no comparison is made). `points`, when given,
    receives {p: EvalPoint} of every uniform evaluation (the optimizer reuses them)."""
    ratio = scheduled.score / dense.score
    parts = part_ratios(dense, scheduled, confidence=0.5)
    ci = bootstrap_ratio_ci(dense, scheduled)
    tokens = _num_examples(dense)
    v = Verdict(target=float(target), task=str(task), heldout_ratio=float(ratio), heldout_ratio_ci=ci,
                heldout_parts=parts if len(parts) > 1 else {}, sparsity_flop=_f(scheduled.sparsity_flop_overall),
                tokens=tokens, tokens_to_resolve=tokens_to_resolve(ci, tokens, target),
                schedule_is_uniform=schedule_is_uniform, uniform_p=uniform_p)
    if schedule_is_uniform or budget < 1:
        return v
    points = {} if points is None else points

    def run(t: float) -> EvalPoint:  # t: 1 is dense, lower is sparser (p = t, or 1 − t for a mirrored rule)
        p = round(1.0 - t if mirrored else t, 6)
        if p not in points:
            points[p] = evaluate(p)
        return points[p]

    goal = scheduled.score
    hi_t, hi = 1.0, EvalPoint(p=None, score=dense.score, sparsity_flop_overall=0.0)  # keeps the score
    lo_t, lo = None, None  # loses it
    t = float(start_p if start_p is not None else 0.9)
    t = 1.0 - t if mirrored else t
    t = min(max(t, 0.0), 0.999)
    n = 0
    while n < budget:  # walk down from the start until the score is lost
        pt, n = run(t), n + 1
        if pt.score >= goal:
            hi_t, hi = t, pt
            if t <= 0.0:
                break
            t = max(0.0, 1.0 - 2.0 * (1.0 - t))
        else:
            lo_t, lo = t, pt
            break
    while lo is not None and n < budget and hi_t - lo_t > 1e-4:  # then bisect the bracket
        mid = (lo_t + hi_t) / 2
        pt, n = run(mid), n + 1
        if pt.score >= goal:
            hi_t, hi = mid, pt
        else:
            lo_t, lo = mid, pt
    v.uniform_evaluations = n
    if lo is None:  # even the sparsest uniform p tried keeps the schedule's score
        v.uniform_bound = "at least"
        t_u, s_u = hi_t, _f(hi.sparsity_flop_overall)
        noise_ref = hi
        slope = None
    else:
        frac = (goal - lo.score) / (hi.score - lo.score) if hi.score != lo.score else 0.5
        t_u = lo_t + frac * (hi_t - lo_t)
        s_u = _f(lo.sparsity_flop_overall + frac * (hi.sparsity_flop_overall - lo.sparsity_flop_overall))
        noise_ref = hi if hi.p is not None and (frac >= 0.5 or lo.example_values is None) else lo
        slope = abs((hi.sparsity_flop_overall - lo.sparsity_flop_overall) / ((hi.score - lo.score) / dense.score)) \
            if hi.score != lo.score else None
    v.uniform_p = float(1.0 - t_u if mirrored else t_u)
    v.uniform_sparsity_flop = s_u
    if s_u is not None and v.sparsity_flop is not None:
        v.gain_points = 100.0 * (v.sparsity_flop - s_u)
    pair = bootstrap_ratio_ci(noise_ref, scheduled) if noise_ref.example_values is not None else None
    if pair is not None and slope is not None:
        v.noise_points = float(100.0 * slope * (pair[1] - pair[0]) / 2 * noise_ref.score / dense.score)
    return v


def judge_schedule(schedule, evaluate: Evaluate, dense: EvalPoint, scheduled: EvalPoint, *, task: str,
                   budget: int = DEFAULT_VERDICT_EVALS, points: dict | None = None) -> Verdict:
    """Return the Verdict of a saved Schedule on any task (`moeprof eval --schedule S --task T`): its target and
    starting p come from its provenance (0.99 and its anchor p, or its median p, when it records none). `points`:
    as `judge`'s (receives the uniform evaluations)."""
    from moeprof.rules import rule as rule_of

    prov = schedule.provenance or {}
    target = prov.get("target") if isinstance(prov.get("target"), (int, float)) else 0.99
    p = np.asarray(schedule.p, dtype=float)
    finite = p[np.isfinite(p)]
    uniform = finite.size > 0 and np.ptp(finite) == 0.0 and finite.size == p.size
    start = prov.get("anchor_p") if isinstance(prov.get("anchor_p"), (int, float)) else (
        float(np.median(finite)) if finite.size else None)
    return judge(evaluate, dense, scheduled, target=float(target), task=task, start_p=start, budget=budget,
                 mirrored=rule_of(schedule.rule).mirrored, schedule_is_uniform=bool(uniform),
                 uniform_p=float(finite[0]) if uniform else None, points=points)


def _f(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)

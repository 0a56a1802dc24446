"""`optimize_schedule`: a config in, a typed `ScheduleResult` out (the schedule, its search, both splits' scores).

Method (a Lagrangian over every expert of every layer jointly, anchored at the uniform operating point, then
real evaluations):

1. The expert curves (`moeprof.optimize.curves`): one dense forward over the calibration split, then each expert
   alone at every grid p (`DEFAULT_GRID`: 0.2 … 0.9 by 0.025, 0.9 … 0.975 by 0.0125, 0.98 … 0.995 by 0.005; a
   sensitive model operates near 1, where a 0.025 step moves a layer's sparsity by ~6-9 points).
2. The uniform anchor (`moeprof.optimize.anchor`): the uniform critical p of the calibration split, found by the
   very search that gives the uniform baseline (`find_critical(extend=True)`, 5-9 evaluations; at most
   (max_evals − 1) / 2). It joins the grid, it is the operating point for step 3 and a candidate for step 5.
3. Layer probes (`weight_layers_by_loss(measure="kl")`): one probe per layer at the anchor p puts each layer's
   relative output error in units of the loss (mean KL(dense ‖ probed) per token). Options: a second probe per
   layer (`two_point_probes`), or probes in the joint model (`joint_probes`).
4. The method: "lagrangian" (`moeprof.optimize.multiplier`: bisection over the multiplier λ with real
   calibration evaluations, ≈ 8-9), or "marginal" (`moeprof.optimize.marginal`: layer groups reallocated from KL
   probes at the anchor's KL, then scaled to the target).
5. The sparser on the calibration split of the anchor's uniform table and the method's table is returned
   (`chosen`), so the schedule never loses to the uniform p on the data it is fitted on.
6. Experts with fewer than `min_tokens` calibration tokens get a safe p (dense) and are listed in the schedule.

The result is scored on the held-out split the optimizer never saw (dense and scheduled, with a paired bootstrap
CI of the ratio). Full evaluations: 1 dense + ≤ (max_evals − 1) / 2 anchor + the rest of `max_evals` (default 20)
for step 4; plus L probe forwards of a small calibration slice, which are not full evaluations. This module
imports no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from moeprof import __version__
from moeprof.critical.search import bootstrap_ratio_ci, check_dense
from moeprof.evaluate.point import EvalPoint
from moeprof.evaluate.task import TaskSplits, task_splits
from moeprof.optimize.anchor import UniformAnchor, uniform_anchor
from moeprof.optimize.config import OptimizeConfig
from moeprof.optimize.curves import ExpertCurves, expert_curves, routing_counts, weight_layers_by_loss
from moeprof.optimize.margin import accept_table
from moeprof.optimize.marginal import MarginalRound, marginal_search
from moeprof.optimize.multiplier import ScheduleSearch, search_schedule
from moeprof.optimize.verdict import Verdict, judge
from moeprof.rules import rule as rule_of
from moeprof.schedule.apply import loaded_model_id, model_shape
from moeprof.schedule.data import Schedule


@dataclass
class ScheduleResult:
    """What `optimize_schedule` found: the Schedule, the search, both splits' scores, and how it got there.

    The calibration figures are those of `search.point` (None when nothing passed: every expert dense); the
    held-out ones of `heldout` against `heldout_dense`. `provenance()` is what the schedule file records.
    """

    schedule: Schedule
    search: ScheduleSearch | None
    heldout_dense: EvalPoint | None
    heldout: EvalPoint | None
    heldout_ci: tuple[float, float] | None
    config: OptimizeConfig | None = None
    splits: dict = field(default_factory=dict)  # what each split is (`TaskSplits.describe`)
    curves: ExpertCurves | None = None
    curves_from: str = "measured"  # or "given"
    anchored: bool = False
    anchor: UniformAnchor | None = None
    chosen: str = "lagrangian"  # "lagrangian", "marginal" or "uniform anchor"
    layer_loss_factors: np.ndarray | None = None
    layer_probes: int = 0  # probe forwards made
    layer_probe_p: float | None = None
    layer_probe_measure: str | None = None
    layer_probe_p_low: float | None = None
    layer_probe_context_p: float | None = None
    marginal_rounds: list[MarginalRound] = field(default_factory=list)
    marginal_probes: int = 0
    marginal_probe_tokens: int = 0  # each KL probe is one forward over these calibration tokens
    verdict: Verdict | None = None  # held-out against the target, and against uniform p at the same score
    optimized_p: np.ndarray | None = None  # the method's table, when the verdict wrote the uniform one instead

    # -- the calibration split ------------------------------------------------------------------------------

    @property
    def calibration(self) -> EvalPoint | None:
        """The calibration evaluation of the returned table (None: nothing passed, every expert dense)."""
        return self.search.point

    @property
    def dense_score(self) -> float:
        return self.search.dense.score

    @property
    def score(self) -> float | None:
        return None if self.calibration is None else self.calibration.score

    @property
    def ratio(self) -> float | None:
        return None if self.calibration is None else self.calibration.score / self.dense_score

    @property
    def sparsity_token(self) -> float | None:
        return None if self.calibration is None else self.calibration.sparsity_token

    @property
    def sparsity_flop(self) -> float | None:
        """FLOP-weighted realized sparsity on calibration, experts left dense counting 0."""
        return None if self.calibration is None else self.calibration.sparsity_flop_overall

    @property
    def evaluations(self) -> int:
        """Full evaluations made, dense and the anchor's included."""
        return self.search.num_evaluations + (0 if self.anchor is None else len(self.anchor.evaluations))

    # -- the held-out split ---------------------------------------------------------------------------------

    @property
    def heldout_score(self) -> float | None:
        return None if self.heldout is None else self.heldout.score

    @property
    def heldout_ratio(self) -> float | None:
        return None if self.heldout is None else self.heldout.score / self.heldout_dense.score

    @property
    def heldout_sparsity_token(self) -> float | None:
        return None if self.heldout is None else self.heldout.sparsity_token

    @property
    def heldout_sparsity_flop(self) -> float | None:
        return None if self.heldout is None else self.heldout.sparsity_flop_overall

    # -- the anchor -----------------------------------------------------------------------------------------

    @property
    def anchor_p(self) -> float | None:
        return None if self.anchor is None else self.anchor.p

    @property
    def anchor_from(self) -> str | None:
        """"search" (the anchor was searched), "store" (given by `config.anchor_start`), None (no anchor)."""
        if self.anchor is None:
            return None
        return "search" if self.config.anchor_start is None else "store"

    @property
    def anchor_store(self) -> dict | None:
        """The stored anchor: what it came from, its p, and whether it passed on calibration."""
        if self.anchor is None or self.config.anchor_start is None:
            return None
        return {**(self.config.anchor_source or {}), "p": float(self.config.anchor_start),
                "passed": bool(self.anchor.evaluations[0]["passed"])}

    # -- the schedule file's record -------------------------------------------------------------------------

    def provenance(self) -> dict:
        """Return the schedule's provenance (a file format: its keys are read by `moeprof schedule`'s users)."""
        cfg, found, cal, a, curves = self.config, self.search, self.calibration, self.anchor, self.curves
        probed = self.layer_probes > 0
        return {
            "method": ("marginal (layer groups reallocated at the uniform anchor's KL from joint two-sided KL probes, "
                       "then scaled to the target with real evaluations)" if self.marginal_rounds else
                       "lagrangian (expert damage curves, layers weighted by a loss probe, bisection on the "
                       "multiplier with real evaluations)") + (", against the uniform grid anchor" if self.anchored
                                                               else ""),
            "marginal_rounds": [vars(r) for r in self.marginal_rounds], "marginal_probes": self.marginal_probes,
            "marginal_probe_tokens": self.marginal_probe_tokens,
            "task": cfg.task, "target": cfg.target, **self.splits,
            "dense_score": self.dense_score, "score": self.score, "ratio": self.ratio,
            "sparsity_token": self.sparsity_token, "sparsity_flop": self.sparsity_flop,
            "per_expert_sparsity": None if cal is None or cal.per_expert_sparsity is None else cal.per_expert_sparsity,
            "calibration_tokens_per_expert": curves.tokens, "lambda": found.lam,
            "predicted_sparsity_flop": found.predicted_sparsity, "layer_loss_factors": self.layer_loss_factors,
            "layer_probe_unresolved": list(curves.probe_unresolved), "layer_probe_floor": cfg.probe_floor,
            "evaluations": self.evaluations, "chosen": self.chosen,
            "anchor_p": self.anchor_p,
            "anchor_sparsity_flop": None if a is None or a.point is None else a.point.sparsity_flop_overall,
            "anchor_search": None if a is None else a.evaluations,
            "anchor_from": self.anchor_from,
            "curves_from": self.curves_from,
            "anchor_store": self.anchor_store,
            "layer_probe_p": self.layer_probe_p if probed else None,
            "layer_probe_measure": self.layer_probe_measure if probed else None,
            "layer_probe_p_low": self.layer_probe_p_low if probed else None, "layer_probes": self.layer_probes,
            "layer_probe_context_p": self.layer_probe_context_p if probed else None,
            "layer_loss_factors_low": curves.probe_factors_low,
            "search": found.evaluations, "min_tokens": cfg.min_tokens,
            "heldout_dense_score": self.heldout_dense.score, "heldout_score": self.heldout_score,
            "heldout_ratio": self.heldout_ratio, "heldout_ratio_ci": self.heldout_ci,
            "heldout_sparsity_flop": self.heldout_sparsity_flop, "heldout_sparsity_token": self.heldout_sparsity_token,
            "confidence": cfg.confidence,
            "verdict": None if self.verdict is None else self.verdict.to_dict(),
            "optimized_p": None if self.optimized_p is None else np.where(np.isnan(self.optimized_p), None,
                                                                          self.optimized_p).tolist(),
            "moeprof_version": __version__,
        }


def optimize_schedule(model, tokenizer, config: OptimizeConfig, *, splits: TaskSplits | None = None,
                      curves: ExpertCurves | None = None, on_eval: Callable[[dict], None] | None = None,
                      on_stage: Callable[[str], None] | None = None, journal=None) -> ScheduleResult:
    """Return the ScheduleResult: a per-(layer, expert) schedule fitted on the task's calibration split, and its
    score on the held-out split (dense and scheduled, with a paired bootstrap CI of the ratio).

    `splits` (default `task_splits` of the config's task and data settings) and `curves` (default: measured, then
    weighted by layer probes) may be given. `on_eval(row)` gets one dict per full evaluation, `on_stage(text)`
    one line per stage. `journal` (`moeprof.evaluate.journal.EvaluationJournal`): every full evaluation of either
    split is journaled as it completes and taken from it when it holds that p or table, so an interrupted run
    resumes (the expert curves and layer probes, forwards but not full evaluations, are measured again).

    config.anchor (default: on when this call measures the curves and probes the layers): find the uniform
    critical p on the calibration split first (`uniform_anchor`, search `anchor_search`: "critical" =
    `find_critical`, "grid" = bisection over the grid); it joins the grid, the layer probes measure KL at that p
    (the operating point), and the uniform table is returned instead of the method's when it is sparser on the
    calibration split. anchor=False: the earlier method (ΔNLL probes at p = 0.5, no uniform candidate).
    two_point_probes: each layer is also probed at the grid p nearest 1 − 2·(1 − anchor p), and its factor
    interpolated between the two (`weight_layers_by_loss(probe_p_low=...)`; L more probe forwards). joint_probes:
    every layer sits at the anchor p during the probes and each probe moves one layer to the grid p nearest
    1 − 1.5·(1 − anchor p) (`weight_layers_by_loss(context_p=...)`: the marginal rate in the joint model).

    config.anchor_start: a uniform critical p found before (`moeprof.critical.pipeline.stored_anchor` reads it
    from a profile store's /critical record): one calibration evaluation verifies it, and only when it fails does
    the anchor search run, on its denser side (`uniform_anchor(start=...)`).

    config.method "marginal": after the anchor, no multiplier: the anchor's uniform table is reallocated across
    `layer_groups(L, marginal_groups)` by `marginal_reallocation` (KL probes of every group moved both ways in
    the joint model, on the first `marginal_sequences` calibration sequences, default all; `marginal_rounds`
    rounds) at the anchor's KL, then `fit_to_target` scales its distance from dense with the evaluations left
    (real calibration evaluations). Every expert of a layer gets the layer's p (experts with < min_tokens
    calibration tokens stay dense). The uniform table still wins when it is sparser on calibration."""
    cfg = config
    type, rule, target, max_evals = cfg.type, cfg.rule, cfg.target, cfg.max_evals
    p_grid, marginal = cfg.p_grid, cfg.marginal
    say = on_stage or (lambda s: None)
    splits = splits or task_splits(model, tokenizer, task=cfg.task, type=type, rule=rule, seq_len=cfg.seq_len,
                                   max_tokens=cfg.max_tokens, limit=cfg.limit, batch_size=cfg.batch_size)
    if journal is not None:
        splits = replace(splits, calibration=journal.wrap(splits.calibration, "calibration"),
                         heldout=journal.wrap(splits.heldout, "heldout"))
    probe = curves is None and cfg.layer_probe_sequences > 0 and not marginal
    result = ScheduleResult(None, None, None, None, None, config=cfg, splits=dict(splits.describe),
                            curves_from="measured" if curves is None else "given")
    result.anchored = anchored = (probe or marginal) if cfg.anchor is None else cfg.anchor
    found_anchor, n_anchor = None, 0
    budget = (max_evals - 1) // 2
    # the dense calibration evaluation is evaluation 1 of at most max_evals (dense, anchor and search together):
    # every progress line counts against that one budget
    say("the dense model on the calibration split")
    dense = splits.calibration(None)
    check_dense(dense, None)  # raises on an unusable dense score; the warnings come once, from the search
    if on_eval is not None:
        on_eval({"lam": float("nan"), "label": "dense", "evaluation": 1, "max_evaluations": max_evals,
                 "score": dense.score, "ratio": 1.0, "passed": None, "sparsity_token": None,
                 "sparsity_flop": None, "dense_score": dense.score})
    if anchored and budget > 0:
        say(f"the uniform critical p on the calibration split (at most {budget} evaluations)"
            if cfg.anchor_start is None else
            f"verifying the stored uniform critical p {cfg.anchor_start:.4f} on the calibration split (1 "
            f"evaluation; if it fails, a search on its denser side, at most {budget} in all)")

        def anchor_eval(row: dict) -> None:
            if on_eval is not None:
                stored = cfg.anchor_start is not None and not rows_seen
                on_eval({**row, "lam": float("nan"),
                         "label": f"uniform p {row['p']:.4f}" + (" (from the store)" if stored else ""),
                         "evaluation": len(rows_seen) + 2, "max_evaluations": max_evals,
                         "dense_score": dense.score})
            rows_seen.append(row)

        rows_seen: list[dict] = []
        found_anchor = uniform_anchor(splits.calibration, p_grid, dense, target=target, budget=budget,
                                      on_eval=anchor_eval, search=cfg.anchor_search, start=cfg.anchor_start,
                                      confidence=cfg.confidence)
        n_anchor = len(found_anchor.evaluations)
        if found_anchor.p is not None and curves is None:  # the grid gets the anchor p: probe and choose there
            p_grid = tuple(sorted(set(float(p) for p in p_grid) | {float(found_anchor.p)}))
    result.anchor = found_anchor
    if curves is None and marginal and found_anchor is not None and found_anchor.p is not None:
        say("counting each expert's calibration tokens (one dense forward)")
        curves = routing_counts(model, splits.calibration_tokens, batch_size=cfg.batch_size)
    if curves is None:
        say("measuring each expert's damage curve on the calibration split")
        curves = expert_curves(model, splits.calibration_tokens, type=type, rule=rule, p_grid=p_grid,
                               batch_size=cfg.batch_size)
    result.curves = curves
    probe_p, probe_low, measure = 0.5, None, "nll"
    if anchored and not marginal:  # probe at the operating point (the top grid p when no uniform grid p passed)
        # and twice as far (method marginal makes no layer probes)
        probe_p = found_anchor.p if found_anchor is not None and found_anchor.p is not None else curves.p_grid[-1]
        probe_low = float(curves.p_grid[int(np.argmin(np.abs(curves.p_grid - (1 - 2 * (1 - probe_p)))))])
        probe_low = probe_low if probe_low < probe_p and cfg.two_point_probes else None
        measure = "kl"
    context = None
    if anchored and cfg.joint_probes and found_anchor is not None and found_anchor.p is not None:
        # every layer at the anchor p; each probe moves one layer to the grid p nearest 1 − 1.5·(1 − anchor p)
        context, probe_low = probe_p, None
        below = [float(p) for p in curves.p_grid if p < context]
        if below:
            probe_p = min(below, key=lambda p: abs(p - (1 - 1.5 * (1 - context))))
        else:
            context = None
    if probe:
        result.layer_probes = curves.damage.shape[0] * (1 if probe_low is None else 2) + (context is not None)
        result.layer_probe_p, result.layer_probe_measure = probe_p, measure
        result.layer_probe_p_low, result.layer_probe_context_p = probe_low, context
        at = f"{probe_p:g}" + ("" if probe_low is None else f" and {probe_low:g}") + (
            "" if context is None else f", every other layer at {context:g}")
        say(f"weighting layers by their {measure} probes at p = {at} ({result.layer_probes} probes)")
        result.layer_loss_factors = weight_layers_by_loss(
            model, splits.calibration_tokens[:cfg.layer_probe_sequences], curves, type=type, rule=rule,
            batch_size=cfg.batch_size, probe_p=probe_p, probe_floor=cfg.probe_floor, measure=measure,
            probe_p_low=probe_low, context_p=context)

    def search_eval(row: dict) -> None:
        if on_eval is not None:
            on_eval({**row, "evaluation": row["evaluation"] + n_anchor, "max_evaluations": max_evals})

    if marginal and found_anchor is not None and found_anchor.p is not None:
        found, result.marginal_rounds, result.marginal_probes, result.marginal_probe_tokens = marginal_search(
            model, splits, curves, found_anchor, dense, cfg, budget=max_evals - 1 - n_anchor, say=say,
            on_eval=search_eval)
    else:
        if marginal:
            say("no uniform anchor (none passed, or no evaluations were left for it): the multiplier search "
                "instead of the reallocation")
        say("bisecting the multiplier with real calibration evaluations")
        found = search_schedule(splits.calibration, curves, target=target, max_evals=max_evals - n_anchor,
                                min_tokens=cfg.min_tokens, chance=splits.chance, dense=dense, on_eval=search_eval,
                                confidence=cfg.confidence)
    result.chosen = "marginal" if result.marginal_rounds else "lagrangian"
    a = found_anchor
    if a is not None and a.point is not None and (
            found.point is None or found.point.sparsity_flop_overall < a.point.sparsity_flop_overall):
        E = curves.tokens.shape[1]  # the uniform candidate is sparser on the calibration split: keep it
        table = np.where(np.arange(E)[None, :] < curves.num_experts[:, None], a.p, np.nan)
        found = ScheduleSearch(table, 0.0, float(a.point.sparsity_flop_overall), found.dense, a.point, [],
                               found.evaluations)
        result.chosen = "uniform anchor"
    result.search = found
    say("scoring on the held-out split")
    result.heldout_dense = splits.heldout(None)
    result.heldout = splits.heldout(torch.as_tensor(found.p)) if found.point is not None else None
    result.heldout_ci = bootstrap_ratio_ci(result.heldout_dense, result.heldout) if result.heldout is not None else None
    if result.heldout is not None:
        found = result.search = _verdict(result, splits, found, curves, cfg, say)
    result.schedule = Schedule(found.p, type, rule, cfg.model_id or loaded_model_id(model), model_shape(model),
                               provenance=result.provenance(), safe_experts=found.safe_experts)
    return result


def _verdict(result: ScheduleResult, splits: TaskSplits, found: ScheduleSearch, curves: ExpertCurves,
             cfg: OptimizeConfig, say: Callable[[str], None]) -> ScheduleSearch:
    """Judge the found table on held-out (`moeprof.optimize.verdict.judge`); return what is written: the found
    table, or, when it does not beat uniform p at equal held-out score, the uniform one (the calibration anchor,
    which passed the same acceptance rule; without one, the densest uniform p bracketing the schedule's held-out
    score). The optimized table then stays in `result.optimized_p`."""
    a, uniform = result.anchor, result.chosen == "uniform anchor"
    start = None if a is None else a.p
    if cfg.verdict_evals and not uniform:
        say(f"the verdict: uniform p at the schedule's held-out score (at most {cfg.verdict_evals} held-out "
            "evaluations)")
    points: dict = {}
    mirrored = rule_of(cfg.rule).mirrored
    v = judge(splits.heldout, result.heldout_dense, result.heldout, target=cfg.target, task=cfg.task,
              start_p=start, budget=cfg.verdict_evals, mirrored=mirrored, schedule_is_uniform=uniform,
              uniform_p=start if uniform else None, points=points)
    result.verdict = v
    if uniform or v.beats_uniform is not False:
        return found
    if a is not None and a.p is not None:
        p_u, cal = float(a.p), a.point
    else:  # no anchor passed: the densest uniform p seen keeping the schedule's held-out score (dense when none)
        keep = [p for p, pt in points.items() if pt.score >= result.heldout.score]
        if not keep:
            return found
        p_u = min(keep) if mirrored else max(keep)
        cal = splits.calibration(p_u)
    if cal is None or not accept_table(found.dense, cal, target=cfg.target, confidence=cfg.confidence).accepted:
        # the uniform table must pass the same acceptance rule on calibration as any table written; it does not
        # here, so the optimized table (which does) stays, and the verdict says it did not beat uniform
        return found
    E = curves.tokens.shape[1]
    table = np.where(np.arange(E)[None, :] < curves.num_experts[:, None], p_u, np.nan)
    result.optimized_p = found.p
    held = points.get(round(p_u, 6)) or splits.heldout(p_u)
    result.heldout = held
    result.heldout_ci = bootstrap_ratio_ci(result.heldout_dense, held)
    result.chosen = "uniform (no held-out gain over uniform p)"
    v.written = f"uniform p {p_u:.4f}"
    return ScheduleSearch(table, 0.0, float(cal.sparsity_flop_overall), found.dense, cal, [], found.evaluations)

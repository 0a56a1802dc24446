"""The schedule optimizer: per-(layer, expert) p that maximize FLOP-weighted sparsity at score ≥ target × dense.

Legend: L = layers, E = experts per layer, P = the p grid, n_e = calibration tokens routed to expert e of layer l,
F_l = multiply-adds of one token through one expert of layer l.

Method (a Lagrangian over every expert of every layer jointly, anchored at the uniform operating point, then
real evaluations):

1. One dense forward over the calibration split captures each expert's routed tokens (`tolerance`'s
   `RoutedTokens`); each expert then runs alone at every grid p (no model forward per p) giving its injected
   squared error err2_e(p) = Σ_t w_t² ‖y_t(p) − y_t‖² and its realized sparsity s_e(p). The grid
   (`DEFAULT_GRID`) runs 0.2 … 0.9 by 0.025, 0.9 … 0.975 by 0.0125, then 0.98 … 0.995 by 0.005: a sensitive
   model operates near 1 (SmolLM2's uniform critical p ≈ 0.93-0.95), where a 0.025 step moves a layer's
   sparsity by ~6-9 points (uniform 0.925 → 0.95 → 0.975: 0.43 → 0.36 → 0.27).
2. The uniform anchor (`uniform_anchor`): the uniform critical p of the calibration split, found by the very
   search that gives the uniform baseline (`find_critical(extend=True)`, 5-9 evaluations; at most
   (max_evals − 1) / 2, else the sparsest p seen passing; `anchor_search="grid"`: bisection over the grid).
   It joins the grid, it is the operating point for step 3 and a candidate for step 6.
3. Damage of a choice = Σ_l f_l Σ_e err2_e(p_e) / R_l, R_l = Σ_e Σ_t w_t² ‖y_t‖² (the layer's FFN output
   energy). The factor f_l puts layer l's relative output error in units of the loss: one probe per layer (that
   layer alone at the anchor p, on a few calibration sequences) measures the mean KL(dense ‖ probed) per
   token, f_l = KL_l / Σ_e err2_e / R_l there (`weight_layers_by_loss(measure="kl")`). The earlier probe (ΔNLL
   with the layer at p = 0.5) was far from a sensitive model's operating point and, on a few sequences, could
   read ≤ 0 (a layer then looked free); KL is positive and resolvable at the operating point. Options: a
   second probe per layer at 1 − 2(1 − anchor p) and a factor interpolated between (`two_point_probes`);
   probes in the joint model, every layer at the anchor p and one moved below it (`joint_probes`: the marginal
   rate where the allocation decides, but one layer's marginal move can be below what a few sequences resolve).
4. Gain = Σ_e n_e F_l s_e(p_e) / Σ_e n_e F_l (the FLOP-weighted sparsity). For a multiplier λ every expert
   takes, on its own, the p (or dense) minimizing damage − λ·gain: separable by expert, solved exactly.
5. The predicted sparsity grows with λ; bisection over a log-spaced λ ladder with REAL calibration evaluations
   finds the largest λ whose schedule keeps the target (≈ 8-9 evaluations). Layers of like sensitivity switch
   at the same λ, so adjacent rungs can differ by several layers at once; the evaluations left then bisect on
   how many of those changes (cheapest predicted damage per sparsity first) still keep the target.
6. The sparser on the calibration split of the anchor's uniform table and the multiplier's table is returned
   (`provenance["chosen"]`), so the schedule never loses to the uniform p on the data it is fitted on.
7. Experts with fewer than `min_tokens` calibration tokens get a safe p (dense) and are listed in the schedule.

Full evaluations: 1 dense + ≤ (max_evals − 1) / 2 anchor + the rest of `max_evals` (default 20) for step 5; plus
L probe forwards (2L with two_point_probes, L + 1 with joint_probes) of a small calibration slice, which are not
full evaluations. On SmolLM2 (per layer) the multiplier's tables stay below uniform p on calibration, so step 6
returns the uniform table (README, "Schedules"); on tiny-moe the multiplier's table wins (v1 by ~10 points, v2 by ~5).

The calibration score is measured on the task's calibration split; the caller scores the result on the
held-out split (see `moeprof.cli` `schedule`, `benchmarks/schedule/`). This module imports no transformers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from moeprof.critical.search import EvalPoint, Evaluate, check_dense
from moeprof.evaluate.task import TaskSplits, task_splits

# 0.2 … 0.9 every 0.025, 0.9 … 0.975 every 0.0125, then 0.98 … 0.995 every 0.005: a sensitive model (SmolLM2's
# uniform critical p is ~0.93-0.95) operates near 1, where one grid step is a large change of sparsity
DEFAULT_GRID = tuple(sorted({round(0.2 + 0.025 * k, 4) for k in range(32)}
                            | {0.9125, 0.9375, 0.9625, 0.98, 0.985, 0.99, 0.995}))
DEFAULT_MIN_TOKENS = 16
DEFAULT_MAX_EVALS = 20
LAMBDA_RUNGS = 256
DEFAULT_MARGINAL_GROUPS = 10  # at most this many layer groups (consecutive layers): 2 probes each per round
DEFAULT_MARGINAL_DELTA = 0.02  # the probe move in p, both ways
DEFAULT_MARGINAL_TRUST = 2.0  # a round moves a group at most trust · delta in p
DEFAULT_MARGINAL_ROUNDS = 3


@dataclass
class ExpertCurves:
    """Per-expert damage and sparsity along the p grid (from `expert_curves`)."""

    p_grid: np.ndarray  # [P] ascending
    damage: np.ndarray  # [L, E, P] err2 / layer output energy (NaN: expert saw no tokens)
    sparsity: np.ndarray  # [L, E, P] realized sparsity of the type
    tokens: np.ndarray  # [L, E] calibration tokens routed
    flops_per_token: np.ndarray  # [L]
    num_experts: np.ndarray  # [L] experts of each layer (padding beyond is not an expert)
    probe_unresolved: list = field(default_factory=list)  # layers whose NLL probe measured no increase
    layer_scale: np.ndarray | None = None  # [L, P] the loss factors `weight_layers_by_loss` applied
    probe_factors_low: np.ndarray | None = None  # [L] its factors at probe_p_low (None: one probe point)


@torch.no_grad()
def expert_curves(model, sequences: torch.Tensor, *, type: str, rule: str = "topp",
                  p_grid=DEFAULT_GRID, max_tokens_per_expert: int = 2048, batch_size: int = 8) -> ExpertCurves:
    """Return each expert's damage and sparsity curves on `sequences` [N, T] (one dense forward, then each expert
    alone per grid p through its site's Layout: `moeprof.critical.tolerance`'s machinery)."""
    from moeprof.critical.tolerance import _tolerance, layout_expert_error, routed_tokens_of_model

    sites, routed = routed_tokens_of_model(model, sequences, max_tokens_per_expert=max_tokens_per_expert,
                                           batch_size=batch_size)
    L, E = len(sites), max(s.num_experts for s in sites)
    err2 = np.full((L, E, len(p_grid)), np.nan)
    ref2 = np.zeros((L, E))

    def error(layer, e, x, w, grid):
        layout = sites[layer].layout
        e2, ssum, r2 = layout_expert_error(layout, e, x.to(layout.device), grid, type=type, rule=rule,
                                           weights=w.to(layout.device))
        err2[layer, e], ref2[layer, e] = e2.numpy(), r2
        return e2, ssum, r2

    tol = _tolerance(routed.tokens, error, L, E, p_grid, 1.0, type, rule)
    energy = ref2.sum(axis=1, keepdims=True)  # [L, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        damage = err2 / np.where(energy > 0, energy, np.inf)[..., None]
    return ExpertCurves(tol.p_grid, damage, tol.sparsity, tol.tokens,
                        np.array([float(s.flops_per_token) for s in sites]), np.array([s.num_experts for s in sites]))


@torch.no_grad()
def routing_counts(model, sequences: torch.Tensor, *, max_tokens_per_expert: int = 2048,
                   batch_size: int = 8) -> ExpertCurves:
    """Return ExpertCurves holding only what method "marginal" needs: calibration tokens per expert (capped as in
    `expert_curves`), FLOPs per token and experts per layer, from one dense forward; no p grid, no damage."""
    from moeprof.critical.tolerance import routed_tokens_of_model

    sites, routed = routed_tokens_of_model(model, sequences, max_tokens_per_expert=max_tokens_per_expert,
                                           batch_size=batch_size)
    L, E = len(sites), max(s.num_experts for s in sites)
    return ExpertCurves(np.zeros(0), np.zeros((L, E, 0)), np.zeros((L, E, 0)), routed.counts(L, E),
                        np.array([float(s.flops_per_token) for s in sites]), np.array([s.num_experts for s in sites]))


@torch.no_grad()
def weight_layers_by_loss(model, sequences: torch.Tensor, curves: ExpertCurves, *, type: str, rule: str = "topp",
                          probe_p: float = 0.5, batch_size: int = 8, probe_floor: bool = False,
                          measure: str = "nll", probe_p_low: float | None = None,
                          context_p: float | None = None) -> np.ndarray:
    """Rescale `curves.damage` in place so each layer's is in units of calibration NLL; return the factors [L].

    The relative output error of a layer says nothing about how much the loss cares about that layer. One
    probe per layer (only that layer sparsified, every expert at `probe_p`, on `sequences`) measures the real
    NLL increase ΔNLL_l; the layer's damage curves are scaled by ΔNLL_l / Σ_e damage_e(probe_p). L forwards of
    `sequences` (pass a small slice of the calibration split; they are not full evaluations).

    A probe that measured no increase (ΔNLL_l ≤ 0 on its small slice) makes the layer look free; such layers are
    listed in `curves.probe_unresolved`. With `probe_floor` their ΔNLL is taken as twice the standard error of
    the per-sequence ΔNLL, the smallest increase the probe could have seen: without it two of SmolLM2's layers
    (4 probe sequences) were sparsified to the bottom of the grid at the smallest multiplier and, failing in the
    real evaluations, pulled the multiplier down for every other layer; with it, a layer that IS nearly free
    (layer 1 of the known-answer test's model, 2 probe sequences) is kept too dense. Off by default.

    measure="kl": the probe's loss increase is the mean KL(dense ‖ probed) per predicted token instead of ΔNLL.
    KL is never negative and is a sum of per-token terms with no cancellation, so it resolves a layer's damage
    near the operating point (a 1/L share of a ~0.01-nat budget), where the per-sequence ΔNLL is mostly noise;
    to first order E[ΔNLL] = KL when the dense model is calibrated. `optimize_schedule` uses it at the uniform
    anchor p (see the module docstring).

    context_p (> probe_p): the probes run with EVERY layer at context_p (the operating point) and measure one
    layer's move from context_p to probe_p: factor = (KL_l − KL_context) / (its proxy's increase for that move),
    the marginal exchange rate where the allocation decides, errors of the other layers included (L + 1
    forwards). Without it each layer is probed alone on the dense model.

    probe_p_low (< probe_p): a second probe per layer there (2L forwards). A factor measured at one p need not
    hold far from it (SmolLM2, 1,024 calibration tokens: one multiplier step moved layer 11, whose factor is
    ~100x the median, from 0.95 to 0.7, and that rung failed), so each layer's factor is measured at both points
    and interpolated between them (log-linear in p); above probe_p the factor at probe_p applies, below
    probe_p_low the one at probe_p_low. On SmolLM2 the factors at 0.85 and 0.925 agreed within 20 % for every
    layer, so `optimize_schedule` leaves it off by default. `curves.layer_scale` [L, P] keeps what was applied;
    the factors at probe_p_low are `curves.probe_factors_low`.
    """
    if measure not in ("nll", "kl"):
        raise ValueError(f"measure must be 'nll' or 'kl', got {measure!r}")
    from moeprof.capture import sparsify
    from moeprof.evaluate.perplexity import DenseReference, perplexity

    ref = DenseReference(model, sequences, batch_size=batch_size, keep_logprobs=measure == "kl")
    dense_nll = math.log(ref.result.ppl)
    dense_seq = ref.result.seq_nll / ref.result.seq_tokens  # [N] mean NLL per sequence
    curves.probe_unresolved = []
    L, E = curves.damage.shape[:2]

    real = torch.as_tensor(np.arange(E)[None, :] < np.asarray(curves.num_experts)[:, None])  # [L, E]
    base = torch.full((L, E), float("nan"), dtype=torch.float64)
    c = None
    if context_p is not None:  # every layer at context_p; the probes measure one layer's move from there
        c = int(np.argmin(np.abs(curves.p_grid - context_p)))
        base = torch.where(real, float(curves.p_grid[c]), base)
        with sparsify(model, type=type, rule=rule, p=base):
            ctx = perplexity(model, reference=ref)
        dense_nll, dense_seq = math.log(ctx.ppl), ctx.seq_nll / ctx.seq_tokens  # ΔNLL from there

    def probe(j: int) -> np.ndarray:
        factors = np.ones(L)
        for layer in range(L):  # a row of the [L, E] arrays: one site (a layer may hold routed and shared sites)
            table = base.clone()
            table[layer] = torch.where(real[layer], float(curves.p_grid[j]), float("nan"))
            with sparsify(model, type=type, rule=rule, p=table):
                res = perplexity(model, reference=ref)
            if measure == "kl":
                delta = float(res.kl) - (0.0 if c is None else float(ctx.kl))
            else:
                delta = math.log(res.ppl) - dense_nll
            per_seq = res.seq_nll / res.seq_tokens - dense_seq  # [N]
            resolution = 2.0 * float(per_seq.std(ddof=1)) / math.sqrt(per_seq.size) if per_seq.size > 1 else 0.0
            if delta <= 0.0:
                if layer not in curves.probe_unresolved:
                    curves.probe_unresolved.append(layer)
                if probe_floor:
                    delta = resolution
            predicted = float(np.nansum(curves.damage[layer, :, j]))
            if c is not None:  # the proxy's increase for the same move
                predicted -= float(np.nansum(curves.damage[layer, :, c]))
            factors[layer] = max(delta, 1e-6) / predicted if predicted > 0 else 1.0
        return factors

    j = int(np.argmin(np.abs(curves.p_grid - probe_p)))
    factors = probe(j)
    scale = np.repeat(factors[:, None], len(curves.p_grid), axis=1)  # [L, P]
    curves.probe_factors_low = None
    if probe_p_low is not None:
        k = int(np.argmin(np.abs(curves.p_grid - probe_p_low)))
        if k < j:
            low = probe(k)
            curves.probe_factors_low = low
            p = np.asarray(curves.p_grid, dtype=float)
            t = np.clip((p - p[k]) / (p[j] - p[k]), 0.0, 1.0)  # 0 at and below p_low, 1 at and above probe_p
            scale = np.exp((1 - t)[None, :] * np.log(low)[:, None] + t[None, :] * np.log(factors)[:, None])
    curves.layer_scale = scale
    curves.damage *= scale[:, None, :]
    return factors


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
                   start: float | None = None) -> UniformAnchor:
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
    """
    from moeprof.critical.search import DEFAULT_COARSE, find_critical

    if search not in ("critical", "grid"):
        raise ValueError(f"search must be 'critical' or 'grid', got {search!r}")
    if start is not None and not 0.0 <= start < 1.0:
        raise ValueError(f"start must be a sparse uniform p in [0, 1), got {start}")
    rows: list[dict] = []
    points: list[EvalPoint] = []

    seen: dict[float, EvalPoint] = {}

    def counted(p) -> EvalPoint:
        if round(float(p), 10) in seen:  # `start`, met again by the search: evaluated once, counted once
            return seen[round(float(p), 10)]
        if len(rows) >= budget:
            raise _BudgetSpent
        pt = evaluate(p)
        seen[round(float(p), 10)] = pt
        passed = pt.score / dense.score >= target - 1e-12
        row = {"p": float(p), "score": pt.score, "ratio": pt.score / dense.score,
               "sparsity_flop": pt.sparsity_flop_overall, "sparsity_token": pt.sparsity_token, "passed": passed}
        rows.append(row)
        points.append(pt)
        if on_eval is not None:
            on_eval(row)
        return pt

    def best_seen() -> UniformAnchor:
        ok = [(r["p"], pt) for r, pt in zip(rows, points) if r["passed"]]
        if not ok:
            return UniformAnchor(None, None, rows)
        p, pt = min(ok, key=lambda t: t[0])
        return UniformAnchor(p, pt, rows)

    if start is not None:
        try:
            if counted(start).score / dense.score >= target - 1e-12:
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
            if counted(grid[mid]).score / dense.score >= target - 1e-12:
                ok = mid
            else:
                fail = mid
    except _BudgetSpent:
        pass
    return best_seen()


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
                    on_eval: Callable[[dict], None] | None = None, refine: bool = True) -> ScheduleSearch:
    """Return the schedule of the largest multiplier whose real calibration score is ≥ target × dense.

    evaluate(p) is a `moeprof.evaluate.runners` evaluator (p: None for dense, or the [L, E] table). Bisection
    over `lambda_ladder`: the predicted sparsity is monotone in λ, so the passing region is taken to be the rungs
    below the first failing one. At most `max_evals` full evaluations, dense included. `refine`: the evaluations
    left then bisect on how many of the entries that differ between the last passing and the first failing
    table to change (cheapest predicted damage per sparsity first).
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must lie in (0, 1] (a fraction of the dense score, e.g. 0.99), got {target}")
    if max_evals < 2:
        raise ValueError(f"--max-evals must be at least 2 (dense and one schedule), got {max_evals}")
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
        row = {"lam": lam, "predicted": predicted, "score": pt.score,
               "ratio": pt.score / dense.score, "sparsity_flop": pt.sparsity_flop_overall,
               "sparsity_token": pt.sparsity_token, "passed": pt.score / dense.score >= target - 1e-12, **extra}
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


# ----------------------------------------------------------------------------------------------------------
# The API the CLI and the benchmarks call


@dataclass
class ScheduleRun:
    """`optimize_schedule`'s outcome: the Schedule, the search, and both scores on the held-out split."""

    schedule: object  # moeprof.schedule.Schedule
    search: ScheduleSearch
    heldout_dense: EvalPoint
    heldout: EvalPoint | None
    heldout_ci: tuple[float, float] | None


def optimize_schedule(model, tokenizer, *, type: str, task: str, target: float = 0.99, rule: str = "topp",
                      model_id: str | None = None, max_evals: int = DEFAULT_MAX_EVALS,
                      min_tokens: int = DEFAULT_MIN_TOKENS, seq_len: int = 256, max_tokens: int = 8192,
                      limit: int | None = None, batch_size: int = 8, p_grid=DEFAULT_GRID,
                      splits: TaskSplits | None = None, curves: ExpertCurves | None = None,
                      on_eval: Callable[[dict], None] | None = None,
                      on_stage: Callable[[str], None] | None = None,
                      layer_probe_sequences: int = 8, probe_floor: bool = False,
                      anchor: bool | None = None, two_point_probes: bool = False,
                      anchor_search: str = "critical", joint_probes: bool = False,
                      anchor_start: float | None = None, anchor_source: dict | None = None,
                      method: str = "lagrangian", marginal_groups: int = DEFAULT_MARGINAL_GROUPS,
                      marginal_rounds: int = DEFAULT_MARGINAL_ROUNDS,
                      marginal_sequences: int | None = None) -> ScheduleRun:
    """Return the ScheduleRun: a per-(layer, expert) schedule fitted on the task's calibration split, and its
    score on the held-out split (dense and scheduled, with a paired bootstrap CI of the ratio).

    anchor (default: on when this call measures the curves and probes the layers): find the uniform critical p on
    the calibration split first (`uniform_anchor`, search `anchor_search`: "critical" = `find_critical`, "grid" =
    bisection over the grid); it joins the grid, the layer probes measure KL at that p (the operating point),
    and the uniform table is returned instead of the multiplier's when it is sparser on the calibration split.
    anchor=False: the earlier method (ΔNLL probes at p = 0.5, no uniform candidate). two_point_probes: each layer
    is also probed at the grid p nearest 1 − 2·(1 − anchor p), and its factor interpolated between the two
    (`weight_layers_by_loss(probe_p_low=...)`; L more probe forwards). joint_probes: every layer sits at the
    anchor p during the probes and each probe moves one layer to the grid p nearest 1 − 1.5·(1 − anchor p)
    (`weight_layers_by_loss(context_p=...)`: the marginal rate in the joint model; 1 more probe forward).

    anchor_start: a uniform critical p found before (`moeprof.critical.pipeline.stored_anchor` reads it from a
    profile store's /critical record): one calibration evaluation verifies it, and only when it fails does the
    anchor search run, on its denser side (`uniform_anchor(start=...)`). `anchor_source` (what it came from) is
    kept in the provenance as `anchor_store`, with `anchor_from` = "store" (else "search").

    method="marginal": after the anchor, no multiplier: the anchor's uniform table is reallocated across
    `layer_groups(L, marginal_groups)` by `marginal_reallocation` (KL probes of every group moved both ways in
    the joint model, on the first `marginal_sequences` calibration sequences, default all; `marginal_rounds`
    rounds) at the anchor's KL, then `fit_to_target` scales its distance from dense with the evaluations left
    (real calibration evaluations). Every expert of a layer gets the layer's p (experts with < min_tokens
    calibration tokens stay dense). The uniform table still wins when it is sparser on calibration."""
    from moeprof import __version__
    from moeprof.critical.search import bootstrap_ratio_ci
    from moeprof.schedule import Schedule, loaded_model_id, model_shape

    say = on_stage or (lambda s: None)
    layer_factors = None
    splits = splits or task_splits(model, tokenizer, task=task, type=type, rule=rule, seq_len=seq_len,
                                   max_tokens=max_tokens, limit=limit, batch_size=batch_size)
    if method not in ("lagrangian", "marginal"):
        raise ValueError(f"method must be 'lagrangian' or 'marginal', got {method!r}")
    marginal = method == "marginal"
    if marginal and (marginal_groups < 1 or marginal_rounds < 1
                     or (marginal_sequences is not None and marginal_sequences < 1)):
        raise ValueError(f"marginal_groups, marginal_rounds and marginal_sequences must be at least 1, got "
                         f"{marginal_groups}, {marginal_rounds}, {marginal_sequences}")
    if marginal and (anchor is False or rule not in ("topp", "topk")):
        raise ValueError("method 'marginal' moves p toward dense at p = 1 from the uniform anchor: it needs "
                         f"anchor on and rule topp or topk (got anchor={anchor}, rule={rule!r})")
    probe = curves is None and layer_probe_sequences > 0 and not marginal
    given_curves = curves is not None
    anchored = (probe or marginal) if anchor is None else anchor
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must lie in (0, 1] (a fraction of the dense score, e.g. 0.99), got {target}")
    if max_evals < 2:
        raise ValueError(f"--max-evals must be at least 2 (dense and one schedule), got {max_evals}")
    dense, found_anchor, n_anchor = None, None, 0
    budget = (max_evals - 1) // 2
    if anchored and budget > 0:
        say(f"the uniform critical p on the calibration split (at most {budget} evaluations)" if anchor_start is None
            else f"verifying the stored uniform critical p {anchor_start:.4f} on the calibration split (1 "
                 f"evaluation; if it fails, a search on its denser side, at most {budget} in all)")
        dense = splits.calibration(None)
        check_dense(dense, None)  # raises on an unusable dense score; the warnings come once, from the search

        def anchor_eval(row: dict) -> None:
            if on_eval is not None:
                stored = anchor_start is not None and not rows_seen
                on_eval({**row, "lam": float("nan"),
                         "label": f"uniform p {row['p']:.4f}" + (" (from the store)" if stored else ""),
                         "evaluation": len(rows_seen) + 2, "max_evaluations": budget + 1,
                         "dense_score": dense.score})
            rows_seen.append(row)

        rows_seen: list[dict] = []
        found_anchor = uniform_anchor(splits.calibration, p_grid, dense, target=target, budget=budget,
                                      on_eval=anchor_eval, search=anchor_search, start=anchor_start)
        n_anchor = len(found_anchor.evaluations)
        if found_anchor.p is not None and curves is None:  # the grid gets the anchor p: probe and choose there
            p_grid = tuple(sorted(set(float(p) for p in p_grid) | {float(found_anchor.p)}))
    if curves is None and marginal and found_anchor is not None and found_anchor.p is not None:
        say("counting each expert's calibration tokens (one dense forward)")
        curves = routing_counts(model, splits.calibration_tokens, batch_size=batch_size)
    if curves is None:
        say("measuring each expert's damage curve on the calibration split")
        curves = expert_curves(model, splits.calibration_tokens, type=type, rule=rule, p_grid=p_grid,
                               batch_size=batch_size)
    probe_p, probe_low, measure = 0.5, None, "nll"
    if anchored and not marginal:  # probe at the operating point (the top grid p when no uniform grid p passed)
        # and twice as far (method marginal makes no layer probes)
        probe_p = found_anchor.p if found_anchor is not None and found_anchor.p is not None else curves.p_grid[-1]
        probe_low = float(curves.p_grid[int(np.argmin(np.abs(curves.p_grid - (1 - 2 * (1 - probe_p)))))])
        probe_low = probe_low if probe_low < probe_p and two_point_probes else None
        measure = "kl"
    context = None
    if anchored and joint_probes and found_anchor is not None and found_anchor.p is not None:
        # every layer at the anchor p; each probe moves one layer to the grid p nearest 1 − 1.5·(1 − anchor p)
        context, probe_low = probe_p, None
        below = [float(p) for p in curves.p_grid if p < context]
        if below:
            probe_p = min(below, key=lambda p: abs(p - (1 - 1.5 * (1 - context))))
        else:
            context = None
    n_probes = 0
    if probe:
        n_probes = curves.damage.shape[0] * (1 if probe_low is None else 2) + (context is not None)
        at = f"{probe_p:g}" + ("" if probe_low is None else f" and {probe_low:g}") + (
            "" if context is None else f", every other layer at {context:g}")
        say(f"weighting layers by their {measure} probes at p = {at} ({n_probes} probes)")
        layer_factors = weight_layers_by_loss(model, splits.calibration_tokens[:layer_probe_sequences], curves,
                                              type=type, rule=rule, batch_size=batch_size, probe_p=probe_p,
                                              probe_floor=probe_floor, measure=measure, probe_p_low=probe_low,
                                              context_p=context)

    def search_eval(row: dict) -> None:
        if on_eval is not None:
            on_eval({**row, "evaluation": row["evaluation"] + n_anchor,
                     "max_evaluations": row["max_evaluations"] + n_anchor})

    rounds_done: list = []
    n_marginal_probes, probe_tokens = 0, 0
    if marginal and found_anchor is not None and found_anchor.p is not None:
        found, rounds_done, n_marginal_probes, probe_tokens = _marginal_search(
            model, splits, curves, found_anchor, dense, type=type, rule=rule, target=target,
            budget=max_evals - 1 - n_anchor, min_tokens=min_tokens, batch_size=batch_size, groups=marginal_groups,
            rounds=marginal_rounds, sequences=marginal_sequences, say=say, on_eval=search_eval)
    else:
        if marginal:
            say("no uniform anchor (none passed, or no evaluations were left for it): the multiplier search "
                "instead of the reallocation")
        say("bisecting the multiplier with real calibration evaluations")
        found = search_schedule(splits.calibration, curves, target=target, max_evals=max_evals - n_anchor,
                                min_tokens=min_tokens, chance=splits.chance, dense=dense, on_eval=search_eval)
    chosen = "marginal" if rounds_done else "lagrangian"
    a = found_anchor
    if a is not None and a.point is not None and (
            found.point is None or found.point.sparsity_flop_overall < a.point.sparsity_flop_overall):
        E = curves.tokens.shape[1]  # the uniform candidate is sparser on the calibration split: keep it
        table = np.where(np.arange(E)[None, :] < curves.num_experts[:, None], a.p, np.nan)
        found = ScheduleSearch(table, 0.0, float(a.point.sparsity_flop_overall), found.dense, a.point, [],
                               found.evaluations)
        chosen = "uniform anchor"
    say("scoring on the held-out split")
    held_dense = splits.heldout(None)
    held = splits.heldout(torch.as_tensor(found.p)) if found.point is not None else None
    ci = bootstrap_ratio_ci(held_dense, held) if held is not None else None
    cal = found.point
    provenance = {
        "method": ("marginal (layer groups reallocated at the uniform anchor's KL from joint two-sided KL probes, "
                   "then scaled to the target with real evaluations)" if rounds_done else
                   "lagrangian (expert damage curves, layers weighted by a loss probe, bisection on the multiplier "
                   "with real evaluations)") + (", against the uniform grid anchor" if anchored else ""),
        "marginal_rounds": [vars(r) for r in rounds_done], "marginal_probes": n_marginal_probes,
        "marginal_probe_tokens": probe_tokens,  # each KL probe is one forward over these calibration tokens
        "task": task, "target": target, **splits.describe,
        "dense_score": found.dense.score, "score": None if cal is None else cal.score,
        "ratio": None if cal is None else cal.score / found.dense.score,
        "sparsity_token": None if cal is None else cal.sparsity_token,
        "sparsity_flop": None if cal is None else cal.sparsity_flop_overall,  # dense experts count 0
        "per_expert_sparsity": None if cal is None or cal.per_expert_sparsity is None else cal.per_expert_sparsity,
        "calibration_tokens_per_expert": curves.tokens, "lambda": found.lam,
        "predicted_sparsity_flop": found.predicted_sparsity, "layer_loss_factors": layer_factors,
        "layer_probe_unresolved": list(curves.probe_unresolved), "layer_probe_floor": probe_floor,
        "evaluations": found.num_evaluations + n_anchor, "chosen": chosen,
        "anchor_p": None if a is None else a.p,
        "anchor_sparsity_flop": None if a is None or a.point is None else a.point.sparsity_flop_overall,
        "anchor_search": None if a is None else a.evaluations,
        "anchor_from": None if a is None else ("search" if anchor_start is None else "store"),
        "curves_from": "given" if given_curves else "measured",
        "anchor_store": None if a is None or anchor_start is None else {
            **(anchor_source or {}), "p": float(anchor_start), "passed": bool(a.evaluations[0]["passed"])},
        "layer_probe_p": probe_p if probe else None, "layer_probe_measure": measure if probe else None,
        "layer_probe_p_low": probe_low if probe else None, "layer_probes": n_probes,
        "layer_probe_context_p": context if probe else None,
        "layer_loss_factors_low": curves.probe_factors_low,
        "search": found.evaluations, "min_tokens": min_tokens,
        "heldout_dense_score": held_dense.score, "heldout_score": None if held is None else held.score,
        "heldout_ratio": None if held is None else held.score / held_dense.score,
        "heldout_ratio_ci": ci, "heldout_sparsity_flop": None if held is None else held.sparsity_flop_overall,
        "heldout_sparsity_token": None if held is None else held.sparsity_token,
        "moeprof_version": __version__,
    }
    schedule = Schedule(found.p, type, rule, model_id or loaded_model_id(model), model_shape(model),
                        provenance=provenance, safe_experts=found.safe_experts)
    return ScheduleRun(schedule, found, held_dense, held, ci)


# ----------------------------------------------------------------------------------------------------------
# The joint-marginal method: layer groups moved both ways in the joint model, KL as the smooth loss


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
                  step: float = 0.05, on_eval: Callable[[dict], None] | None = None
                  ) -> tuple[float | None, EvalPoint | None, list[dict]]:
    """Return (t, point, rows): the largest t found with `scaled(table, t)` keeping the calibration score ≥ target ×
    dense, with at most `budget` real evaluations: t = 1 first, then outward (up when it passes, down when it
    fails) by `step`, doubling each time, until the other side is met; then bisection to 0.01 in t. (None, None,
    rows) when nothing evaluated passed. Dense entries (NaN) stay dense at every t."""
    rows: list[dict] = []
    best: tuple[float | None, EvalPoint | None] = (None, None)

    def run(t: float) -> bool:
        nonlocal best
        pt = evaluate(torch.as_tensor(scaled(table, t), dtype=torch.float64))
        passed = pt.score / dense.score >= target - 1e-12
        row = {"t": float(t), "score": pt.score, "ratio": pt.score / dense.score, "passed": passed,
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


def _marginal_search(model, splits: TaskSplits, curves: ExpertCurves, anchor: UniformAnchor, dense: EvalPoint, *,
                     type: str, rule: str, target: float, budget: int, min_tokens: int, batch_size: int,
                     groups: int, rounds: int, sequences: int | None, say: Callable[[str], None],
                     on_eval: Callable[[dict], None]) -> tuple[ScheduleSearch, list[MarginalRound], int, int]:
    """optimize_schedule's method="marginal" after the anchor: reallocate, then fit to the target (see there)."""
    from moeprof.evaluate.runners import perplexity_evaluator

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
    t, point, _rows = fit_to_target(splits.calibration, table, dense, target=target, budget=budget, on_eval=fit_eval)
    if t is None:
        found = ScheduleSearch(np.full((L, E), np.nan), float("nan"), 0.0, dense, None, safe, evaluations)
    else:
        found = ScheduleSearch(scaled(table, t), float("nan"), float("nan"), dense, point, safe,
                               evaluations)
    return found, done, probes, int(tokens.numel())

"""Each expert's damage and sparsity curves along the p grid, and the layer probes that put them in units of loss.

Legend: L = layers, E = experts per layer, P = the p grid, n_e = calibration tokens routed to expert e of layer l.

One dense forward over the calibration split captures each expert's routed tokens (`critical.tolerance`'s
`RoutedTokens`); each expert then runs alone at every grid p (no model forward per p), giving its injected
squared error err2_e(p) = Σ_t w_t² ‖y_t(p) − y_t‖² and its realized sparsity s_e(p). Damage of a choice =
Σ_l f_l Σ_e err2_e(p_e) / R_l, R_l = Σ_e Σ_t w_t² ‖y_t‖² (the layer's FFN output energy); the factor f_l
(`weight_layers_by_loss`) puts layer l's relative output error in units of the loss, from one probe per layer.
This module imports no transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from moeprof.optimize.config import DEFAULT_GRID


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


"""Static magnitude thresholds τ [L, E] from a top-p (or top-k) schedule and its model's profile store.

A runtime that cannot sort per token keeps |a| ≥ τ: each expert's τ puts its scheduled realized sparsity of the
profile's |entry| histogram below τ (`threshold_schedule` returns the schedule of rule "threshold"). This module
reads the store (h5py); the schedule data (`moeprof.schedule.data`) does not.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from moeprof import __version__
from moeprof.schedule.data import (Schedule, ScheduleError, ScheduleModelWarning, as_schedule, p_table_of,
                                   same_model_key)
from moeprof.store import Store


def tau_from_histogram(counts: np.ndarray, target: np.ndarray, edges: np.ndarray,
                       max_abs: np.ndarray | None = None) -> np.ndarray:
    """Return τ [...] such that a fraction `target` [...] of the entries binned in counts [..., A] lies below τ.

    Bins: 0 = [0, edges[0]), j = [edges[j-1], edges[j]), A-1 = [edges[-1], max_abs] (its top: the largest |entry|
    seen, else edges[-1]). Within the bin where the cumulative count reaches target · n, τ is interpolated
    log-linearly (linearly in the first bin, which starts at 0), as if its entries were spread evenly in log |a|.
    NaN target → NaN; an expert with no entries → NaN. target 0 → τ = 0 (keep everything).
    Worked example: counts [0, 2, 2, 0] over edges [1, 10, 100], target 0.75 → 3 of 4 entries: bin 2 = [10, 100)
    holds the 3rd and 4th, half of it is needed → τ = 10 · (100 / 10)^0.5 = 31.6.
    """
    counts = np.asarray(counts, dtype=np.float64)
    target = np.clip(np.asarray(target, dtype=np.float64), 0.0, 1.0)
    A = counts.shape[-1]
    cum = np.cumsum(counts, axis=-1)  # [..., A]
    n = cum[..., -1]
    need = target * n  # entries that must fall below τ
    j = np.minimum((cum < need[..., None]).sum(-1), A - 1)  # first bin whose cumulative count reaches `need`
    before = np.where(j > 0, np.take_along_axis(cum, np.maximum(j - 1, 0)[..., None], -1)[..., 0], 0.0)
    in_bin = np.take_along_axis(counts, j[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.clip(np.where(in_bin > 0, (need - before) / in_bin, 0.0), 0.0, 1.0)
    edges = np.asarray(edges, dtype=np.float64)
    lower = np.concatenate([[0.0], edges])[j]
    upper = np.concatenate([edges, [edges[-1]]])[j]
    if max_abs is not None:  # the overflow bin ends at the largest entry seen
        top = np.nan_to_num(np.asarray(max_abs, dtype=np.float64), nan=0.0)
        upper = np.where(j == A - 1, np.maximum(top, edges[-1]), upper)
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = np.where(j == 0, frac * upper, lower * (upper / np.where(lower > 0, lower, 1.0)) ** frac)
    return np.where(np.isnan(target) | (n <= 0), np.nan, tau)


def target_sparsity(schedule: Schedule, store) -> tuple[np.ndarray, dict]:
    """Return (the realized sparsity [L, E] each scheduled expert must reach, {where it came from: experts}).

    From the schedule's provenance["per_expert_sparsity"] (token-weighted over the expert's vectors, as the
    optimizer measured it) where it has a number; otherwise the store's sparsity curve of the schedule's type at
    the expert's p (linear between p-grid points; a p outside the grid takes the nearest end, counted as
    "curve_clamped"). A top-k schedule's target is 1 − p. NaN where the schedule leaves the expert dense.
    """
    _check_source(schedule)
    p = schedule.p
    target = np.full(p.shape, np.nan)
    given = schedule.provenance.get("per_expert_sparsity")
    if given is not None:
        given = p_table_of(given)
        if given.shape == p.shape:
            target = np.where(np.isfinite(p), given, np.nan)
    sources = {"provenance": int(np.isfinite(target).sum())}
    missing = np.isfinite(p) & ~np.isfinite(target)
    if missing.any():
        if schedule.rule == "topk":
            target[missing] = 1.0 - p[missing]
            sources["one_minus_p"] = int(missing.sum())
        else:
            grid = np.asarray(store.p_grid, dtype=np.float64)
            mean = store.mean(schedule.type)  # [L, E, P]
            for l, e in zip(*np.nonzero(missing)):
                curve = mean[l, e]
                if np.isfinite(curve).all():
                    target[l, e] = np.interp(p[l, e], grid, curve)
            sources["curve"] = int((missing & np.isfinite(target)).sum())
            sources["curve_clamped"] = int((missing & ((p < grid[0]) | (p > grid[-1]))).sum())
    return target, sources


def thresholds(schedule: Schedule | str | os.PathLike, store) -> np.ndarray:
    """Return τ [L, E]: each expert's magnitude threshold whose fraction of entries with |a| < τ (in the store's
    |entry| histogram of the schedule's type) equals that expert's scheduled realized sparsity (`target_sparsity`).
    NaN where the schedule leaves the expert dense, or where the profile saw none of its entries.

    `store`: a `moeprof.store.Store` or the path of a profile store of the same model.
    """
    return _thresholds(as_schedule(schedule), store)[0]


def _check_source(schedule: Schedule) -> None:
    if schedule.rule not in ("topp", "topk"):
        raise ScheduleError(f"thresholds come from a top-p (or top-k) schedule; this one has rule {schedule.rule!r}"
                            + (" (it holds thresholds already)" if schedule.rule == "threshold" else ""))


def _thresholds(schedule: Schedule, store) -> tuple[np.ndarray, np.ndarray, dict]:
    _check_source(schedule)
    if not hasattr(store, "abs_histogram"):
        with Store(store) as st:
            return _thresholds(schedule, st)
    shape = (store.num_layers, store.num_experts)
    if tuple(schedule.p.shape) != shape:
        raise ScheduleError(f"the schedule is [layers, experts] = {list(schedule.p.shape)}, the store "
                            f"{store.path} {list(shape)}: profile the schedule's model")
    if schedule.model and same_model_key(store.model) != same_model_key(schedule.model):
        warnings.warn(f"the schedule was made for {schedule.model!r}, the store profiles {store.model!r} (same "
                      "shape)", ScheduleModelWarning, stacklevel=3)
    hist = store.abs_histogram(schedule.type)
    target, sources = target_sparsity(schedule, store)
    tau = tau_from_histogram(hist.counts, target, hist.edges, hist.max_abs)
    return tau, target, sources


def threshold_schedule(schedule: Schedule | str | os.PathLike, store) -> Schedule:
    """Return the schedule of rule "threshold" whose table is `thresholds(schedule, store)` (τ ≥ 0; NaN = dense),
    with provenance naming the source schedule, the store and each expert's target sparsity."""
    schedule = as_schedule(schedule)
    _check_source(schedule)
    if not hasattr(store, "abs_histogram"):
        with Store(store) as st:
            return threshold_schedule(schedule, st)
    tau, target, sources = _thresholds(schedule, store)
    unseen = np.isfinite(schedule.p) & ~np.isfinite(tau)
    provenance = {
        "method": "static magnitude thresholds: each expert's τ puts its scheduled realized sparsity of the "
                  "profile's |entry| histogram below τ (log-linear within a bin)",
        "source_rule": schedule.rule, "source_method": schedule.provenance.get("method"),
        "source_p": schedule.p, "target_sparsity": target, "target_from": sources,
        # the sparsity τ was set to realize on the profiled tokens (by construction, within a bin); NaN where τ is
        # NaN (dense, or an expert the profile never saw): nothing is realized there
        "per_expert_sparsity": np.where(np.isfinite(tau), target, np.nan),
        "store": str(store.path), "store_tokens": store.attrs.get("tokens"), "store_data": store.data_sources,
        "unseen_experts": [[int(l), int(e)] for l, e in zip(*np.nonzero(unseen))],
        **{k: schedule.provenance[k] for k in ("task", "target", "calibration", "heldout")
           if k in schedule.provenance},
        "moeprof_version": __version__,
    }
    return Schedule(tau, schedule.type, "threshold", schedule.model, dict(schedule.shape), provenance,
                    list(schedule.safe_experts))

"""Per-expert sparsity schedules: which p applies to which (layer, expert), saved, loaded and applied.

Legend: L = layers, E = experts per layer (1 for a dense FFN), H = hidden, I = FFN width per expert.

    s = Schedule.uniform(model, type="i", p=0.9)           # or Schedule.load("s.json"), or `moeprof schedule`
    s.save("s.json")                                        # atomic; versioned JSON (README "Schedules")
    handle = moeprof.schedule.sparsify_(model, s)           # in place, like torchao's quantize_
    model.generate(...)                                     # every forward runs the schedule
    handle.remove()                                         # the model is exactly what it was
    with moeprof.capture.sparsify(model, schedule=s): ...   # the same, scoped

A schedule is plain data. Applying it goes through `moeprof.capture.sparsify` (its [L, E] `p` table is what
that function takes): there is one sparsification path. This module imports neither torch nor h5py at import
time, so a report can read a schedule file without loading a model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeprof import __version__
from moeprof.activations import ACTIVATION_TYPES

SCHEDULE_FORMAT = "moeprof-schedule"
SCHEDULE_SCHEMA_VERSION = 1
SCHEDULE_RULES = ("topp", "topk", "maxp", "threshold")  # = moeprof.topp.RULES (tested); no torch import here
# "threshold": the table holds static magnitudes τ [L, E] (keep |a| ≥ τ), not p (`thresholds`, `threshold_schedule`)
SHAPE_KEYS = ("layers", "experts", "hidden", "intermediate")


class ScheduleError(ValueError):
    """A schedule file or object that cannot be used (the message names the problem and the fix)."""


class ScheduleModelWarning(UserWarning):
    """The schedule was made for a model with another id (same shape): it applies, but may not fit."""


def _table(p: Any) -> np.ndarray:
    """Return p as a float64 [L, E] array (null / None entries become NaN = dense)."""
    try:
        arr = np.array([[np.nan if v is None else v for v in row] for row in p] if isinstance(p, list) else p,
                       dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ScheduleError(f"the schedule's p table is not a [layers, experts] table of numbers ({exc})") from None
    if arr.ndim != 2:
        raise ScheduleError(f"the schedule's p table must be [layers, experts], got {arr.ndim} dimension(s)")
    return arr


@dataclass
class Schedule:
    """Per-(layer, expert) p of one rule for one activation type of one model shape.

    p [L, E]: the rule's parameter per expert; NaN = that expert stays dense (also the padding of layers with
    fewer experts). shape: the model's fingerprint {layers, experts, hidden, intermediate}. provenance: how it
    was made (task, calibration data, target, dense / reached scores, realized sparsity, evaluations, version).
    safe_experts: [layer, expert] pairs that got a safe p because calibration saw too few of their tokens.
    """

    p: np.ndarray
    type: str
    rule: str = "topp"
    model: str = ""
    shape: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    safe_experts: list = field(default_factory=list)
    schema_version: int = SCHEDULE_SCHEMA_VERSION

    def __post_init__(self):
        self.p = _table(self.p)
        if self.schema_version != SCHEDULE_SCHEMA_VERSION:
            raise ScheduleError(f"schedule schema version {self.schema_version} is not supported (this moeprof "
                                f"reads version {SCHEDULE_SCHEMA_VERSION}); remake it with `moeprof schedule`")
        if self.type not in ACTIVATION_TYPES:
            raise ScheduleError(f"unknown activation type {self.type!r} in the schedule; choose one of "
                                f"{', '.join(ACTIVATION_TYPES)}")
        if self.rule not in SCHEDULE_RULES:
            raise ScheduleError(f"unknown rule {self.rule!r} in the schedule; choose one of {', '.join(SCHEDULE_RULES)}")
        finite = self.p[np.isfinite(self.p)]
        if self.rule == "threshold":  # τ is a magnitude: any finite value >= 0
            if np.isinf(self.p).any() or (finite < 0).any():
                bad = self.p[np.isinf(self.p) | (self.p < 0)]
                raise ScheduleError(f"the threshold schedule has τ = {float(bad[0])!r}; every τ must be a finite "
                                    "number >= 0 (NaN / null = dense): remake it with `moeprof schedule-thresholds`")
        elif np.isinf(self.p).any() or ((finite < 0) | (finite > 1)).any():
            bad = self.p[np.isinf(self.p) | (self.p < 0) | (self.p > 1)]
            raise ScheduleError(f"the schedule has p = {float(bad[0])!r}, outside [0, 1]; every p must lie in "
                                "[0, 1] (NaN / null = dense)")
        if not self.shape:
            self.shape = {"layers": self.p.shape[0], "experts": self.p.shape[1], "hidden": None, "intermediate": None}
        missing = [k for k in SHAPE_KEYS if k not in self.shape]
        if missing:
            raise ScheduleError(f"the schedule's model shape lacks {', '.join(missing)}")
        if (self.shape["layers"], self.shape["experts"]) != self.p.shape:
            raise ScheduleError(f"the schedule's p table is {list(self.p.shape)} but its model shape says "
                                f"[{self.shape['layers']}, {self.shape['experts']}]")
        self.safe_experts = [[int(a), int(b)] for a, b in self.safe_experts]

    # -- construction ----------------------------------------------------------------------------------------

    @classmethod
    def uniform(cls, model, *, type: str, p: float, rule: str = "topp", model_id: str | None = None) -> "Schedule":
        """Return the schedule giving every expert of every FFN site of `model` the same p."""
        shape = model_shape(model)
        table = np.full((shape["layers"], shape["experts"]), float(p))
        _pad_missing(model, table)
        return cls(table, type, rule, model_id or model_identity(model), shape,
                   provenance={"method": "uniform", "moeprof_version": __version__})

    # -- the JSON file -------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Return the JSON form (NaN written as null, so any JSON reader takes it)."""
        return {
            "format": SCHEDULE_FORMAT, "schema_version": self.schema_version, "model": self.model,
            "shape": dict(self.shape), "type": self.type, "rule": self.rule,
            "p": [[None if math.isnan(v) else float(v) for v in row] for row in self.p.tolist()],
            "safe_experts": self.safe_experts, "provenance": _jsonable(self.provenance),
        }

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "the schedule") -> "Schedule":
        """Return the Schedule of its JSON form; ScheduleError names what is wrong."""
        if not isinstance(d, dict) or d.get("format") != SCHEDULE_FORMAT:
            raise ScheduleError(f"{source} is not a moeprof schedule (no \"format\": \"{SCHEDULE_FORMAT}\"); make "
                                "one with `moeprof schedule` or Schedule.save")
        version = d.get("schema_version")
        if version != SCHEDULE_SCHEMA_VERSION:
            raise ScheduleError(f"{source} has schedule schema version {version}; this moeprof reads version "
                                f"{SCHEDULE_SCHEMA_VERSION}: remake it with `moeprof schedule` or upgrade moeprof")
        for key in ("type", "p", "shape"):
            if key not in d:
                raise ScheduleError(f"{source} lacks the field {key!r}; remake it with `moeprof schedule`")
        try:
            return cls(d["p"], d["type"], d.get("rule", "topp"), d.get("model", ""), d["shape"],
                       d.get("provenance", {}), d.get("safe_experts", []), version)
        except ScheduleError as exc:
            raise ScheduleError(f"{source}: {exc}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the schedule to `path` as JSON, atomically (an existing file is replaced only on success)."""
        from moeprof.atomic import write_text

        return write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Schedule":
        """Return the schedule in the JSON file at `path`; ScheduleError (one line) for anything else."""
        path = Path(path)
        if not path.is_file():
            raise ScheduleError(f"no schedule file {str(path)!r}; make one with `moeprof schedule ... --out FILE`")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ScheduleError(f"{path} is not JSON ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); "
                                "give a schedule file written by `moeprof schedule`") from None
        return cls.from_dict(d, source=str(path))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return (self.to_dict() == other.to_dict())

    # -- fitting a model -------------------------------------------------------------------------------------

    def check_shape(self, shape: dict, model: str | None = None) -> None:
        """Raise ScheduleError when `shape` (a model's fingerprint) differs; warn when only the model id does."""
        mine = {k: self.shape.get(k) for k in SHAPE_KEYS}
        theirs = {k: shape.get(k) for k in SHAPE_KEYS}
        differs = [k for k in SHAPE_KEYS if mine[k] is not None and theirs[k] is not None and mine[k] != theirs[k]]
        if differs:
            raise ScheduleError(f"the schedule is for a model of shape {_shape_text(mine)}, this model is "
                                f"{_shape_text(theirs)}; make a schedule for this model with `moeprof schedule`")
        if model and self.model and _id_key(model) != _id_key(self.model):
            warnings.warn(f"the schedule was made for {self.model!r}, applied to {model!r} (same shape)",
                          ScheduleModelWarning, stacklevel=3)

    @property
    def dense_fraction(self) -> float:
        """Fraction of the table's entries left dense (NaN)."""
        return float(np.isnan(self.p).mean())


def _shape_text(shape: dict) -> str:
    return (f"[layers {shape['layers']}, experts {shape['experts']}, hidden {shape['hidden']}, "
            f"intermediate {shape['intermediate']}]")


def _id_key(model_id: str) -> str:
    """A model id compared by its last path part ("moeprof/tiny-moe" and "/x/embedded/tiny-moe" agree)."""
    return Path(str(model_id).rstrip("/")).name.lower()


def _jsonable(obj: Any) -> Any:
    """Return obj with numpy values and NaN made JSON-safe (NaN → null)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ----------------------------------------------------------------------------------------------------------
# The model side (imports transformers-side code lazily)


def model_identity(model) -> str:
    """Return the id a schedule records for a loaded model: `moeprof.models.model_id` of what `load_model` was
    given (the CLI's id), else its config's name_or_path, else its model_type."""
    if getattr(model, "moeprof_model_id", None):
        return str(model.moeprof_model_id)
    config = getattr(model, "config", None)
    return str(getattr(config, "name_or_path", "") or getattr(config, "model_type", ""))


def model_shape(model) -> dict:
    """Return the fingerprint {layers, experts, hidden, intermediate} of a model's FFN sites."""
    from moeprof.arch import adapter_for

    sites = adapter_for(model).sites(model)
    return {"layers": len(sites), "experts": max(s.num_experts for s in sites),
            "hidden": int(sites[0].hidden_size), "intermediate": int(max(s.intermediate_size for s in sites))}


def _pad_missing(model, table: np.ndarray) -> None:
    """Set NaN where a layer has fewer experts than the widest (those entries do not exist)."""
    from moeprof.arch import adapter_for

    for s in adapter_for(model).sites(model):
        table[s.row, s.num_experts:] = np.nan


class SparsifyHandle:
    """What `sparsify_` returns: `.realized` (the Realized recorder) and `.remove()` (restore the model)."""

    def __init__(self, stack: contextlib.ExitStack, realized, schedule: Schedule):
        self._stack = stack
        self.realized = realized
        self.schedule = schedule

    @property
    def active(self) -> bool:
        return self._stack is not None

    def remove(self) -> None:
        """Undo the schedule: the model's experts implementation and hooks are what they were (idempotent)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def __enter__(self) -> "SparsifyHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def sparsify_(model, schedule: Schedule | str | os.PathLike, *, model_id: str | None = None,
              use_kernel: bool = True) -> SparsifyHandle:
    """Apply `schedule` (a Schedule or a schedule file) to `model` in place; return the handle that undoes it.

    Until `handle.remove()`, every forward (also `model.generate`, with or without KV cache) runs with the
    schedule's rule at its per-expert p, through `moeprof.capture.sparsify` (MoE top-p of x / i through the
    grouped kernel). ScheduleError when the model's shape differs; ScheduleModelWarning when only its id does.
    """
    from moeprof.capture import sparsify

    stack = contextlib.ExitStack()
    realized = stack.enter_context(sparsify(model, schedule=schedule, model_id=model_id, use_kernel=use_kernel))
    return SparsifyHandle(stack, realized, as_schedule(schedule))


def as_schedule(schedule: Schedule | str | os.PathLike) -> Schedule:
    """Return a Schedule from a Schedule or the path of a schedule file."""
    return schedule if isinstance(schedule, Schedule) else Schedule.load(schedule)


def table_for(model, schedule: Schedule | str | os.PathLike, model_id: str | None = None):
    """Return (schedule, its p table as a float64 torch tensor [L, E]) after checking it fits `model`."""
    import torch

    schedule = as_schedule(schedule)
    schedule.check_shape(model_shape(model), model_id or model_identity(model))
    return schedule, torch.as_tensor(schedule.p, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Static magnitude thresholds τ [L, E] (a runtime that cannot sort per token keeps |a| ≥ τ)


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
        given = _table(given)
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
    from moeprof.store import Store

    _check_source(schedule)
    if not hasattr(store, "abs_histogram"):
        with Store(store) as st:
            return _thresholds(schedule, st)
    shape = (store.num_layers, store.num_experts)
    if tuple(schedule.p.shape) != shape:
        raise ScheduleError(f"the schedule is [layers, experts] = {list(schedule.p.shape)}, the store "
                            f"{store.path} {list(shape)}: profile the schedule's model")
    if schedule.model and _id_key(store.model) != _id_key(schedule.model):
        warnings.warn(f"the schedule was made for {schedule.model!r}, the store profiles {store.model!r} (same "
                      "shape)", ScheduleModelWarning, stacklevel=3)
    hist = store.abs_histogram(schedule.type)
    target, sources = target_sparsity(schedule, store)
    tau = tau_from_histogram(hist.counts, target, hist.edges, hist.max_abs)
    return tau, target, sources


def threshold_schedule(schedule: Schedule | str | os.PathLike, store) -> Schedule:
    """Return the schedule of rule "threshold" whose table is `thresholds(schedule, store)` (τ ≥ 0; NaN = dense),
    with provenance naming the source schedule, the store and each expert's target sparsity."""
    from moeprof.store import Store

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

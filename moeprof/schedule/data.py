"""A per-expert sparsity schedule as plain data: which p of which rule applies to which (layer, expert), and its
versioned JSON file. No model code and no store here: applying a schedule is `moeprof.schedule.apply`, static
thresholds from a profile store `moeprof.schedule.thresholds`. Imports neither torch nor h5py.

Legend: L = layers, E = experts per layer (1 for a dense FFN), H = hidden, I = FFN width per expert.

    s = Schedule.load("s.json")        # or moeprof.schedule.uniform(model, type="i", p=0.9), or `moeprof schedule`
    s.save("s.json")                   # atomic; versioned JSON (docs/schedules.md)
    s.check_shape(shape, model_id)     # ScheduleError when made for another model shape
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.activation_types import ACTIVATION_TYPES
from moeprof.errors import MoeprofError
from moeprof.rules import RULES, UnknownRuleError, rule

SCHEDULE_FORMAT = "moeprof-schedule"
SCHEDULE_SCHEMA_VERSION = 1
# rule "threshold": the table holds static magnitudes τ [L, E] (keep |a| ≥ τ), not p (`moeprof.schedule.thresholds`)
SHAPE_KEYS = ("layers", "experts", "hidden", "intermediate")


class ScheduleError(MoeprofError, ValueError):
    """A schedule file or object that cannot be used (the message names the problem and the fix)."""


class ScheduleModelWarning(UserWarning):
    """The schedule was made for a model with another id (same shape): it applies, but may not fit."""


def _is_number(v: Any) -> bool:
    """True for a JSON number (a bool or a numeric string is not one)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _kind(v: Any) -> str:
    return {str: "a string", bool: "a boolean", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _table(value: Any, field: str) -> np.ndarray:
    """Return `value` as a float64 [L, E] array (null / None → NaN); ScheduleError naming `field` unless it is a
    [layers, experts] table of numbers."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iuf":
            raise ScheduleError(f"field {field!r} must be a [layers, experts] table of numbers, got {value.dtype} "
                                "entries")
        arr = value.astype(np.float64)
    else:
        if not isinstance(value, (list, tuple)) or not all(isinstance(r, (list, tuple, np.ndarray)) for r in value):
            raise ScheduleError(f"field {field!r} must be a [layers, experts] table (a list of lists) of numbers, "
                                f"got {_kind(value)}")
        for l, row in enumerate(value):
            for e, v in enumerate(row):
                if v is not None and not _is_number(v):
                    raise ScheduleError(f"field {field!r} has {v!r} ({_kind(v)}) at [{l}, {e}]; every entry must be "
                                        "a number or null")
        if len({len(r) for r in value}) > 1:
            raise ScheduleError(f"field {field!r} has rows of different lengths; it must be a [layers, experts] table")
        arr = np.array([[np.nan if v is None else float(v) for v in row] for row in value], dtype=np.float64)
        if arr.ndim == 1:  # no rows at all
            arr = arr.reshape(len(value), 0)
    if arr.ndim != 2:
        raise ScheduleError(f"field {field!r} must be [layers, experts], got {arr.ndim} dimension(s)")
    return arr


def p_table_of(p: Any) -> np.ndarray:
    """Return p as a float64 [L, E] array (null / None entries become NaN = dense)."""
    return _table(p, "p")


# provenance fields that readers use as numbers (sparsities also lie in [0, 1]) or as [L, E] sparsity tables
_PROVENANCE_NUMBERS = ("target", "dense_score", "score", "ratio", "heldout_ratio", "heldout_score",
                       "heldout_dense_score", "anchor_p", "lambda")
_PROVENANCE_FRACTIONS = ("sparsity_flop", "sparsity_token", "anchor_sparsity_flop", "heldout_sparsity_flop",
                         "heldout_sparsity_token", "predicted_sparsity_flop")
_PROVENANCE_TABLES = ("per_expert_sparsity", "target_sparsity")


def _check_provenance(prov: Any, shape: tuple[int, int]) -> None:
    """Raise ScheduleError naming the first provenance field a reader could not use."""
    if not isinstance(prov, dict):
        raise ScheduleError(f"field 'provenance' must be an object (how the schedule was made), got {_kind(prov)}")
    for key in _PROVENANCE_NUMBERS + _PROVENANCE_FRACTIONS:
        v = prov.get(key)
        if v is None:
            continue
        if not _is_number(v):
            raise ScheduleError(f"field 'provenance.{key}' must be a number or null, got {v!r} ({_kind(v)})")
        if key in _PROVENANCE_FRACTIONS and not np.isnan(float(v)) and not 0.0 <= float(v) <= 1.0:  # NaN: not
            # measured (the marginal method predicts no sparsity)
            raise ScheduleError(f"field 'provenance.{key}' is {float(v)!r}, but a sparsity lies in [0, 1]")
    ci = prov.get("heldout_ratio_ci")
    if ci is not None and not (isinstance(ci, (list, tuple, np.ndarray)) and len(ci) == 2
                               and all(c is None or _is_number(c) for c in ci)):
        raise ScheduleError(f"field 'provenance.heldout_ratio_ci' must be [low, high] numbers or null, got {ci!r}")
    for key in _PROVENANCE_TABLES:
        if prov.get(key) is None:
            continue
        table = _table(prov[key], f"provenance.{key}")
        if table.shape != shape:
            raise ScheduleError(f"field 'provenance.{key}' is {list(table.shape)}, the p table {list(shape)}")
        bad = np.isinf(table) | (table < 0) | (table > 1)
        if bad.any():
            l, e = (int(i) for i in np.argwhere(bad)[0])
            raise ScheduleError(f"field 'provenance.{key}' has {float(table[l, e])!r} at [{l}, {e}], but a "
                                "sparsity lies in [0, 1]")


def _safe_experts(pairs: Any, shape: tuple[int, int]) -> list[list[int]]:
    """Return `pairs` as [[layer, expert], ...]; ScheduleError unless each is a pair of indices of the p table."""
    if not isinstance(pairs, (list, tuple)):
        raise ScheduleError(f"field 'safe_experts' must be a list of [layer, expert] pairs, got {_kind(pairs)}")
    out = []
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
                _is_number(v) and float(v) == int(v) for v in pair)):
            raise ScheduleError(f"field 'safe_experts' holds {pair!r}; each entry must be a [layer, expert] pair of "
                                "integers")
        l, e = int(pair[0]), int(pair[1])
        if not (0 <= l < shape[0] and 0 <= e < shape[1]):
            raise ScheduleError(f"field 'safe_experts' holds [{l}, {e}], outside the p table [{shape[0]}, {shape[1]}]")
        out.append([l, e])
    return out


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
        self.p = p_table_of(self.p)
        for name in ("type", "rule", "model"):
            if not isinstance(getattr(self, name), str):
                raise ScheduleError(f"field {name!r} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.shape, dict):
            raise ScheduleError(f"field 'shape' must be an object {{{', '.join(SHAPE_KEYS)}}}, got {self.shape!r}")
        for k, v in self.shape.items():
            if v is not None and not (_is_number(v) and float(v) == int(v) and v >= 0):
                raise ScheduleError(f"field 'shape.{k}' must be a whole number or null, got {v!r}")
        if self.schema_version != SCHEDULE_SCHEMA_VERSION:
            raise ScheduleError(f"schedule schema version {self.schema_version} is not supported (this moeprof "
                                f"reads version {SCHEDULE_SCHEMA_VERSION}); remake it with `moeprof schedule`")
        if self.type not in ACTIVATION_TYPES:
            raise ScheduleError(f"unknown activation type {self.type!r} in the schedule; choose one of "
                                f"{', '.join(ACTIVATION_TYPES)}")
        try:
            fraction = rule(self.rule).fraction
        except UnknownRuleError:
            raise ScheduleError(f"unknown rule {self.rule!r} in the schedule; choose one of {', '.join(RULES)}") from None
        finite = self.p[np.isfinite(self.p)]
        if not fraction:  # τ is a magnitude: any finite value >= 0
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
        self.safe_experts = _safe_experts(self.safe_experts, self.p.shape)
        _check_provenance(self.provenance, self.p.shape)

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
        if model and self.model and same_model_key(model) != same_model_key(self.model):
            warnings.warn(f"the schedule was made for {self.model!r}, applied to {model!r} (same shape)",
                          ScheduleModelWarning, stacklevel=3)

    @property
    def dense_fraction(self) -> float:
        """Fraction of the table's entries left dense (NaN)."""
        return float(np.isnan(self.p).mean())


def _shape_text(shape: dict) -> str:
    return (f"[layers {shape['layers']}, experts {shape['experts']}, hidden {shape['hidden']}, "
            f"intermediate {shape['intermediate']}]")


def same_model_key(model_id: str) -> str:
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




def stored_verdict_lines(provenance: dict | None) -> list[str]:
    """Return the lines of the verdict a schedule's provenance keeps ([] when it keeps none): the text
    `moeprof.optimize.verdict` wrote (`verdict.text`), read as data, so that every reader (info, leaderboard, the
    HTML report) shows the same words without importing what scores a model. A verdict written by hand may be a
    string or a list of lines."""
    verdict = (provenance or {}).get("verdict")
    if isinstance(verdict, dict):
        verdict = verdict.get("text")
    if isinstance(verdict, str):
        return [line for line in verdict.splitlines() if line.strip()]
    if isinstance(verdict, list):
        return [str(v) for v in verdict]
    return []


def as_schedule(schedule: Schedule | str | os.PathLike) -> Schedule:
    """Return a Schedule from a Schedule or the path of a schedule file."""
    return schedule if isinstance(schedule, Schedule) else Schedule.load(schedule)


def is_schedule_file(path: str | os.PathLike) -> bool:
    """True when `path` holds a moeprof schedule (JSON with its format tag): replacing it loses nothing else."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("format") == SCHEDULE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False

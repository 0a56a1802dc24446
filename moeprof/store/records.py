"""What the store's typed readers return, and the facts a profile run records (`ProfileMeta`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeprof.store.schema import doc_units


@dataclass
class ProfileMeta:
    """Facts about a profile run recorded as root attributes."""

    model: str
    model_type: str
    architecture: str
    is_moe: bool
    top_k: int
    hidden_size: int
    model_config: dict
    data_sources: list[str]
    tokens: int
    seq_len: int
    batch_size: int
    dtype: str
    device: str
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class Sites:
    """Per-site FFN facts: intermediate_size [L], kind [L] ("routed" | "shared" | "dense"), slots [L, E] bool,
    layer [L] (the decoder layer of each site row)."""

    intermediate_size: np.ndarray
    kind: list[str]
    slots: np.ndarray
    layer: np.ndarray | None = None

    def label(self, row: int) -> str:
        """Return the site's name in tables: its decoder layer, with its kind where it is not the routed experts
        or where the layer holds more than one site ("3", "3 shared", "0 dense")."""
        layer = int(self.layer[row]) if self.layer is not None else row
        kind = self.kind[row]
        return str(layer) if kind == "routed" or (kind == "dense" and "routed" not in self.kind) else f"{layer} {kind}"


@dataclass
class Routing:
    """tokens [L, E] (token, expert) assignments, weight_sum [L, E], layer_tokens [L] tokens entering each layer."""

    tokens: np.ndarray
    weight_sum: np.ndarray
    layer_tokens: np.ndarray


@dataclass
class Balance:
    """Expert-load metrics of the routing counts (`moeprof.outliers.routing_balance`): per expert [L, E]
    load_share, utilization (load / ideal), weight_share, dead; per layer [L] entropy_norm, perplexity_frac
    (exp(H) / E), jain, load_cv, max_mean_load, dead_frac; `model`: aggregates over the routed layers."""

    load_share: np.ndarray
    utilization: np.ndarray
    weight_share: np.ndarray
    entropy_norm: np.ndarray
    perplexity_frac: np.ndarray
    jain: np.ndarray
    load_cv: np.ndarray
    max_mean_load: np.ndarray
    dead_frac: np.ndarray
    dead: np.ndarray
    model: dict[str, float]


@dataclass
class Sparsity:
    """One type's top-p sparsity: mean / std [L, E, P], hist [L, E, P, B], vectors [L, E], width [L]."""

    mean: np.ndarray
    std: np.ndarray
    hist: np.ndarray
    vectors: np.ndarray
    width: np.ndarray


@dataclass
class Magnitude:
    """One type's magnitudes [L, E]: l1_mean, l2_mean, max_abs_mean, max_abs, peak_ratio_mean (NaN: unseen)."""

    l1_mean: np.ndarray
    l2_mean: np.ndarray
    max_abs_mean: np.ndarray
    max_abs: np.ndarray
    peak_ratio_mean: np.ndarray


@dataclass
class AbsHist:
    """One type's |entry| histogram: counts [L, E, A] over the fixed log bins, edges [A-1] (bin 0 = [0, edges[0]),
    bin j = [edges[j-1], edges[j]), bin A-1 = [edges[-1], inf)), max_abs [L, E] largest |entry| seen (NaN: unseen)."""

    counts: np.ndarray
    edges: np.ndarray
    max_abs: np.ndarray


@dataclass
class Outliers:
    """Routing balance (load_share [L, E], entropy_norm [L], max_mean_load [L], dead [L, E]) and one type's
    robust z of mean sparsity within its layer (sparsity_z, flagged [L, E, P])."""

    load_share: np.ndarray
    entropy_norm: np.ndarray
    max_mean_load: np.ndarray
    dead: np.ndarray
    sparsity_z: np.ndarray
    flagged: np.ndarray


@dataclass
class Trace:
    """The per-token trace: token_id, sequence, position [N]; expert, weight [N, L, K]; sparsity {type: [N, L, K, P]}
    (NaN where a slot was not recorded); token_text [N] (None when not stored)."""

    token_id: np.ndarray
    sequence: np.ndarray
    position: np.ndarray
    expert: np.ndarray
    weight: np.ndarray
    sparsity: dict[str, np.ndarray]
    token_text: list[str] | None


@dataclass
class Critical:
    """The /critical group: attrs (critical_p, rule, type, task, target, scores, …) and its arrays.

    per_expert_sparsity / tolerance_sparsity / tolerance_p [L, E], tolerance_rel_error [L, E, Q],
    tolerance_p_grid [Q], points {p, score, ratio, sparsity_token, sparsity_flop, passed: [M]}; None = absent.
    """

    attrs: dict[str, Any]
    per_expert_sparsity: np.ndarray | None = None
    tolerance_sparsity: np.ndarray | None = None
    tolerance_p: np.ndarray | None = None
    tolerance_rel_error: np.ndarray | None = None
    tolerance_p_grid: np.ndarray | None = None
    points: dict[str, np.ndarray] = field(default_factory=dict)

    ARRAYS = ("per_expert_sparsity", "tolerance_sparsity", "tolerance_p", "tolerance_rel_error", "tolerance_p_grid")

    @staticmethod
    def doc_units(name: str) -> tuple[str, str]:
        """Return (doc, units) of the /critical dataset `name` (e.g. "points/p") from the schema table."""
        return doc_units(f"critical/{name}")

    @classmethod
    def from_items(cls, attrs: dict[str, Any], arrays: dict[str, Any]) -> "Critical":
        """Return the record of attrs and arrays named as in the group (e.g. "tolerance_p", "points/p")."""
        unknown = [k for k in arrays if k not in cls.ARRAYS and not k.startswith("points/")]
        if unknown:
            raise KeyError(f"unknown /critical dataset(s) {unknown}; known: {', '.join(cls.ARRAYS)}, points/*")
        points = {k.split("/", 1)[1]: np.asarray(v) for k, v in arrays.items() if k.startswith("points/")}
        return cls(dict(attrs), **{k: np.asarray(v) for k, v in arrays.items() if k in cls.ARRAYS}, points=points)

    def arrays(self) -> dict[str, np.ndarray]:
        """Return {name in the group: array} of every array present."""
        out = {k: getattr(self, k) for k in self.ARRAYS if getattr(self, k) is not None}
        out.update({f"points/{k}": v for k, v in self.points.items()})
        return out


def _value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _str_list(value) -> list[str]:
    """Return a list-of-strings attribute, stored as an array of strings or (older stores) as JSON text."""
    if isinstance(value, (str, bytes)):
        return [str(v) for v in json.loads(_value(value))]
    return [str(_value(v)) for v in np.asarray(value).reshape(-1)]

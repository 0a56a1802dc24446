"""The store's schema table: every dataset it writes, with dims, dtype, doc and units, and the dim labels.

`schema_table()` joins the store's own rows (STORE_FIELDS) with the rows each registered accumulator declares
(`moeprof.stats`); every writer takes a dataset's `doc` / `units` attributes from here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from typing import Any

import h5py
import numpy as np

from moeprof.activation_types import ACTIVATION_TYPES
from moeprof.errors import MoeprofError
from moeprof.outliers import OUTLIER_Z
from moeprof.schema import Field, put

FORMAT = "moeprof-profile"
SCHEMA_VERSION = 2  # 2: exact accumulator state added (see `moeprof.store` for how version 1 reads)


class StoreError(MoeprofError, ValueError):
    """A file that is not a moeprof store, of a newer schema, or missing what a reader needs."""


# Groups another command added to a store; replacing the store's profile carries them over (`write_profile`).
KEPT_GROUPS = ("critical", "schedules")


_SPARSITY_UNITS = "fraction of entries dropped"
CRITICAL_DOC = "critical sparsity: the largest realized sparsity whose score stays >= target x dense"

# Every dataset the store writes itself. The accumulators declare theirs (`moeprof.stats`, one `Field` table per
# registered statistic); `schema_table` joins both. `{type}` in a name stands for an activation type.
STORE_FIELDS: tuple[Field, ...] = (
    Field("p_grid", ("P",), "float64", "top-p values profiled: keep the fewest largest-|v| entries holding this "
          "fraction of the L1 mass", "fraction of L1 mass"),
    Field("hist_edges", ("B+1",), "float64", "bin edges of the per-vector sparsity histograms (last bin includes 1)",
          _SPARSITY_UNITS),
    Field("sites/intermediate_size", ("L",), "int64", "FFN width (per expert for MoE layers) of each layer",
          "entries"),
    Field("sites/kind", ("L",), "string", "FFN kind of each layer: routed (experts), shared or dense "
          "(moe = routed in older stores)", ""),
    Field("sites/layer", ("L",), "int64", "decoder layer of each site row (a layer may hold a routed, a shared "
          "and a dense site; absent in older stores: row = layer)", "layer"),
    Field("outliers/load_share", ("L", "E"), "float64", "fraction of the layer's (token, expert) assignments per "
          "expert [layer, expert]", "fraction"),
    Field("outliers/entropy_norm", ("L",), "float64", "routing entropy over the layer's experts / log E [layer] "
          "(1 = perfectly balanced)", "1"),
    Field("outliers/max_mean_load", ("L",), "float64", "busiest expert's tokens / mean tokens per expert [layer]",
          "ratio"),
    Field("outliers/dead", ("L", "E"), "bool", "experts routed no token [layer, expert]", "bool"),
    Field("routing/utilization", ("L", "E"), "float64", "load / ideal load: tokens routed to the expert / the "
          "layer's mean over its experts (NeMo's utilization ratio; 1 = balanced share, 0 = dead) [layer, expert]",
          "ratio"),
    Field("routing/weight_share", ("L", "E"), "float64", "the expert's fraction of the layer's routing-weight mass "
          "(weight_sum / the layer's sum) [layer, expert]", "fraction"),
    Field("routing/jain", ("L",), "float64", "Jain's fairness index of tokens per expert, (sum t)^2 / (E sum t^2) "
          "[layer] (vLLM; 1 = balanced, 1/E = one expert takes all; NaN: one expert)", "1"),
    Field("routing/load_cv", ("L",), "float64", "coefficient of variation of tokens per expert (population std / "
          "mean) [layer] (0 = balanced; NaN: one expert)", "1"),
    Field("routing/perplexity_frac", ("L",), "float64", "exp(routing entropy) / E: the fraction of experts "
          "effectively used [layer] (1 = balanced; NaN: one expert)", "1"),
    Field("routing/dead_frac", ("L",), "float64", "fraction of the layer's experts routed no token [layer]",
          "fraction"),
    Field("outliers/{type}/sparsity_z", ("L", "E", "P"), "float64", "robust z-score of each expert's mean top-p "
          "sparsity of {type} within its layer [layer, expert, p]", "z"),
    Field("outliers/{type}/flagged", ("L", "E", "P"), "bool", f"|sparsity_z| > {OUTLIER_Z} [layer, expert, p]",
          "bool"),
    Field("trace/token_text", ("N",), "string", "decoded token text [token]", ""),
    Field("critical/per_expert_sparsity", ("L", "E"), "float64", "realized sparsity of each expert at critical_p "
          "[layer, expert] (NaN: never sparsified)", "fraction"),
    Field("critical/tolerance_sparsity", ("L", "E"), "float64", "each expert's own tolerance: the largest realized "
          "sparsity among the grid points whose relative output error is within the budget (the sparsest point "
          "within budget, for every rule) [layer, expert]; 0 when none fits, NaN without tokens", "fraction"),
    Field("critical/tolerance_p", ("L", "E"), "float64", "grid p of the tolerance point (NaN: none within the "
          "budget)", "1"),
    Field("critical/tolerance_rel_error", ("L", "E", "Q"), "float64", "router-weighted relative output error of "
          "the expert alone [layer, expert, p]", "1"),
    Field("critical/tolerance_p_grid", ("Q",), "float64", "p grid of tolerance_rel_error", "1"),
    Field("critical/points/p", ("M",), "float64", "rule parameter of each evaluated sparse point, in evaluation "
          "order", "1"),
    Field("critical/points/score", ("M",), "float64", "task score at that p (1/ppl for perplexity)", "score"),
    Field("critical/points/ratio", ("M",), "float64", "score / dense score", "1"),
    Field("critical/points/sparsity_token", ("M",), "float64", "realized sparsity, token-weighted over "
          "sparsified vectors", "fraction"),
    Field("critical/points/sparsity_flop", ("M",), "float64", "realized sparsity, weighted by each expert's FLOPs "
          "per token", "fraction"),
    Field("critical/points/passed", ("M",), "bool", "ratio >= target", "bool"),
    Field("stability/consecutive_jaccard", ("L", "E"), "float64", "mean Jaccard of the expert's top-p kept-sets "
          "between consecutive steps it both serves (decode steps; block diffusion, attr mode: denoising steps at one "
          "position) [layer, expert]; NaN: no such pair", "1"),
    Field("stability/consecutive_pairs", ("L", "E"), "int64", "pairs of consecutive steps behind "
          "consecutive_jaccard [layer, expert]", "pairs"),
    Field("stability/drift_jaccard", ("L", "E"), "float64", "mean Jaccard between the expert's mask at the first "
          "step it serves and at each later step it serves [layer, expert]; NaN: served once or never", "1"),
    Field("stability/drift_pairs", ("L", "E"), "int64", "pairs behind drift_jaccard [layer, expert]", "pairs"),
    Field("stability/gap_jaccard", ("L", "G"), "float64", "mean same-expert Jaccard of masks g steps apart "
          "[layer, g - 1] (g = 1: consecutive)", "1"),
    Field("stability/gap_pairs", ("L", "G"), "int64", "pairs behind gap_jaccard [layer, g - 1]", "pairs"),
    Field("stability/drift_gap_jaccard", ("L", "G"), "float64", "mean Jaccard with the expert's first-step mask, "
          "g steps after it [layer, g - 1]", "1"),
    Field("stability/drift_gap_pairs", ("L", "G"), "int64", "pairs behind drift_gap_jaccard [layer, g - 1]",
          "pairs"),
    Field("schedules/<name>/p", ("L", "E"), "float64", "scheduled rule parameter p of each expert (NaN: left "
          "dense); the group's `schedule` attr holds the rest of the schedule as JSON", "fraction of L1 mass"),
)
# One record per search (`write_critical`): the same datasets under critical/<type>/<rule>/<task>/.
STORE_FIELDS += tuple(replace(f, name="critical/{type}/{rule}/{task}/" + f.name[len("critical/"):])
                      for f in STORE_FIELDS if f.name.startswith("critical/"))
# /routing datasets the store derives from the exact counts (`moeprof.outliers.routing_balance`); the model-level
# aggregates (`MODEL_BALANCE` + dead_frac) are attributes of /routing
BALANCE_DATASETS = ("utilization", "weight_share", "jain", "load_cv", "perplexity_frac", "dead_frac")
STABILITY_DOC = "mask stability: Jaccard of each expert's top-p kept-sets across generation steps (moeprof.stability)"
_FIELDS = {f.name: f for f in STORE_FIELDS}


def member_path(statistic, type: str | None = None) -> str:
    """Return the group an accumulator class writes: `<group>/<type>` for per-type ones, else `<group>`."""
    return f"{statistic.group}/{type}" if statistic.per_type else statistic.group


def schema_table(statistics: dict | None = None) -> list[Field]:
    """Return every dataset of the layout: the store's own rows plus, for each accumulator class of
    `statistics` (e.g. `moeprof.stats.STATISTICS`), its state and derived rows under its group."""
    rows = list(STORE_FIELDS)
    for cls in (statistics or {}).values():
        prefix = member_path(cls, "{type}")
        for f in getattr(cls, "STATE", ()) + getattr(cls, "DERIVED", ()):
            rows.append(replace(f, name=f"{prefix}/{f.name}"))
    return rows


def doc_units(name: str) -> tuple[str, str]:
    """Return (doc, units) of a store-owned dataset, e.g. "critical/points/p"; KeyError names the known ones."""
    if name not in _FIELDS:
        raise KeyError(f"{name!r} is not in the store schema; known: {', '.join(_FIELDS)}")
    f = _FIELDS[name]
    return f.doc_for(), f.units


def _put(group: h5py.Group, name: str, data: Any, doc: str, units: str) -> h5py.Dataset:
    return put(group, name, data, doc, units)


def _write(f: h5py.File, pattern: str, data: Any, type: str | None = None) -> h5py.Dataset:
    """Write the store-owned dataset `pattern` (a STORE_FIELDS name) with its doc and units; replace it if present."""
    spec = _FIELDS[pattern]
    path = pattern.format(type=type or "")
    parent, _, leaf = path.rpartition("/")
    group = f.require_group(parent) if parent else f
    if leaf in group:
        del group[leaf]
    return _put(group, leaf, data, spec.doc_for(type), spec.units)


# Axis names of the schema's dims, written as HDF5 dimension labels on every dataset (h5py `ds.dims[i].label`,
# xarray / netCDF readers see named dims). /p_grid and /sites/layer are also the dimension scales (coordinates) of
# the p and layer axes of the profile's own arrays.
DIM_LABELS = {"L": "layer", "E": "expert", "P": "p", "B": "bin", "B+1": "bin_edge", "A": "abs_bin", "A-1": "abs_edge",
              "N": "token", "K": "slot", "M": "point", "Q": "tolerance_p", "G": "gap", "R": "kept_layer",
              "D": "feature"}
_SCALES = {"p": "p_grid", "layer": "sites/layer"}
_LABEL_ONLY = (*KEPT_GROUPS, "stability")  # groups copied between files keep no references to another file's scales


def _str_array(values) -> np.ndarray:
    """Return `values` as an array of UTF-8 strings (HDF5 reads them back as text, not as fixed-length bytes)."""
    return np.array([str(v) for v in values], dtype=h5py.string_dtype())


def _pattern(name: str):
    rx = re.escape(name)
    for hole in ("\\{type\\}", "\\{rule\\}", "\\{task\\}", "<name>"):
        rx = rx.replace(hole, "[^/]+")
    return re.compile(f"^{rx}$")


def label_dims(f: h5py.File, table: list[Field] | None = None, *, scales: bool = True) -> None:
    """Label every axis of every dataset of `f` found in `table` (default: the store's own rows) with its dim name
    (DIM_LABELS); with `scales`, attach /p_grid and /sites/layer as the scales of the p and layer axes."""
    patterns = [(_pattern(fl.name), fl) for fl in (table if table is not None else STORE_FIELDS)]
    found: list[tuple[h5py.Dataset, tuple[str, ...]]] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            spec = next((fl for rx, fl in patterns if rx.match(name)), None)
            if spec is not None and len(spec.dims) == obj.ndim:
                found.append((obj, spec.dims))

    f.visititems(visit)
    scale_ds = {}
    if scales:
        for label, path in _SCALES.items():
            if isinstance(f.get(path), h5py.Dataset) and not f[path].is_scale:
                f[path].make_scale(label)
            if isinstance(f.get(path), h5py.Dataset):
                scale_ds[label] = f[path]
    for ds, dims in found:
        for i, d in enumerate(dims):
            label = DIM_LABELS.get(d, d.lower())
            ds.dims[i].label = label
            sc = scale_ds.get(label) if ds.name.split("/")[1] not in _LABEL_ONLY else None
            if (sc is not None and ds.name.lstrip("/") not in _SCALES.values() and len(sc) == ds.shape[i]
                    and not ds.dims[i].keys()):
                ds.dims[i].attach_scale(sc)


# /sites/kind's vocabulary, and the spellings callers may hand in for it: moeprof.arch names routed experts
# "moe" (Site.kind), the store names them "routed".
STORED_SITE_KINDS = ("routed", "shared", "dense")
_SITE_KIND_ALIASES = {"moe": "routed"}


def canonical_site_kinds(kinds) -> list[str]:
    """Return `kinds` in the store's vocabulary ("moe" -> "routed"), or raise ValueError naming a bad one."""
    out = []
    for k in kinds:
        k = _SITE_KIND_ALIASES.get(str(k), str(k))
        if k not in STORED_SITE_KINDS:
            raise ValueError(f"site kind {k!r} is not one of {', '.join(STORED_SITE_KINDS)} (or 'moe' = routed): "
                             f"pass Site.kind from moeprof.arch")
        out.append(k)
    return out


def critical_key(type: str, rule: str, task: str) -> str:
    """Return the group of one search's record: critical/<type>/<rule>/<task> ('/' in a task becomes '|')."""
    return "/".join(["critical", type or "-", rule or "-", (task or "-").replace("/", "|")])


def config_fingerprint(config: dict) -> str:
    """Return a short hash of the values of a model config that fix the store's shape and the model's maths."""
    keep = {k: v for k, v in sorted(config.items())
            if k in _FINGERPRINT_KEYS or "expert" in k or k.endswith("_size") or k.startswith("num_")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


_FINGERPRINT_KEYS = {"model_type", "hidden_act", "vocab_size", "norm_topk_prob", "head_dim", "rms_norm_eps",
                     "rope_theta", "tie_word_embeddings", "mlp_only_layers", "decoder_sparse_step"}


def _slots(kinds: list[str], num_layers: int, num_experts: int) -> np.ndarray:
    """Return bool [L, E]: True where (layer, expert) is a real expert.

    A dense layer inside an MoE model (e.g. DeepSeek's first layers) and a shared expert have one FFN, recorded
    as expert 0; their other slots are padding, neither experts nor dead.
    """
    slots = np.ones((num_layers, num_experts), dtype=bool)
    for layer, kind in enumerate(kinds[:num_layers]):
        if kind in ("dense", "shared"):
            slots[layer, 1:] = False
    return slots


def _is_record(g) -> bool:
    """True when an HDF5 group is one critical-sparsity record (it has the search's headline)."""
    return "critical_p" in g.attrs or "points" in g or "per_expert_sparsity" in g


_RECORD_SKIP = set(ACTIVATION_TYPES) | {"-"}  # the first level of keyed records inside /critical


def _keyed_records(root) -> list:
    found: list = []
    for t in root:
        if t in _RECORD_SKIP and isinstance(root[t], h5py.Group):
            root[t].visititems(lambda n, o: found.append(o) if isinstance(o, h5py.Group) and _is_record(o) else None)
    return found

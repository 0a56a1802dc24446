"""The versioned HDF5 store: the one owner of its schema, writing a profile atomically, typed readers.

Layout (L = layers, E = experts per layer — 1 for dense models, P = p-grid size, B = histogram bins, A = |entry|
histogram bins, N = traced tokens, K = routed slots). `schema_table()` lists every dataset with its dims, dtype, doc
and units; the writer takes each dataset's `doc` / `units` attributes from it.

    /                      attrs: format="moeprof-profile", schema_version, model, model_type, architecture,
                                  is_moe, num_layers, num_experts, top_k, hidden_size, model_config (JSON),
                                  data_sources (JSON), tokens, seq_len, batch_size, dtype, device, types (JSON),
                                  moeprof_version, created_utc, wall_s, parameters (JSON: total, active)
    /p_grid                [P]        the top-p values profiled
    /hist_edges            [B+1]      per-vector sparsity histogram bin edges
    /sites/intermediate_size [L]      FFN width per expert of each layer
    /sites/kind            [L]        "routed" | "shared" | "dense" ("moe" in stores written before: = routed)
    /<accumulator group>/… one group per registered statistic (`moeprof.stats.STATISTICS`), written by its
                           `to_hdf5` (exact state, merged by its reductions) plus the derived means readers use:
      /routing/{tokens, weight_sum, layer_tokens}
      /sparsity/<t>/{vectors, width, sum, sqsum, hist} state; {mean, std} derived     (t ∈ {x, u, g, i})
      /magnitude/<t>/{vectors, l1_sum, l2_sum, max_abs_sum, max_abs, peak_ratio_sum} state;
                     {l1_mean, l2_mean, max_abs_mean, peak_ratio_mean} derived
      /abs_hist/<t>/counts [L, E, A] state; edges [A-1] (the fixed log |entry| bins; what a static threshold τ
                     needs: `Store.abs_histogram`, `moeprof.schedule.thresholds`)
      /rank/<t>/{vectors, gram} state; effective_rank [L, E] derived; attrs method, layers  (with --rank)
      /trace/…             optional per-token detail (token_id, sequence, position, expert, weight, sparsity_<t>)
    /outliers/...          per-layer routing balance (load_share, entropy_norm, max_mean_load, dead) and
                           <t>/sparsity_z, <t>/flagged [L, E, P]: robust z of expert sparsity within its layer
    /critical/...          critical-sparsity results (`write_critical`, added by `moeprof critical`)
    /stability/...         mask stability (`write_stability`, written by `moeprof stability`)
    /schedules/<name>/p    [L, E] a per-expert p schedule (`write_schedule`); attr `schedule` = the rest of its
                           JSON form (`moeprof.schedule.Schedule`), read back by `Store.schedule(name)`

Every dataset carries `doc` and `units` attributes. A store is written under a temporary name and renamed, so a
crash or Ctrl-C never leaves a half-written file under the real name.

Versions. Schema 2 added the exact accumulator state (sparsity/<t>/{sum, sqsum}, magnitude/<t>/{vectors, *_sum})
and the trace's stream counters (attrs max_tokens, tokens_seen, sequences_seen); every schema-1 dataset keeps its
name and meaning. Readers accept both. A schema-1 store reads the same through every typed reader; rebuilding its
statistics (`ProfileStats.from_store`) reconstructs the sums from mean × vectors and the squared sums from
(std² + mean²) × vectors, equal to the originals up to floating-point rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import h5py
import numpy as np

from moeprof import __version__
from moeprof.activations import ACTIVATION_TYPES, HIST_BINS
from moeprof.atomic import atomic_path as _atomic_path
from moeprof.atomic import check_space, write_bytes
from moeprof.outliers import OUTLIER_Z, dead_mask, model_balance, outlier_arrays, routing_balance
from moeprof.schema import Field, put

if TYPE_CHECKING:
    from moeprof.stats import ProfileStats

FORMAT = "moeprof-profile"
SCHEMA_VERSION = 2  # 2: exact accumulator state added (see the module doc for how version 1 reads)


class StoreError(ValueError):
    """A file that is not a moeprof store, of a newer schema, or missing what a reader needs."""


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


def check_writable(path: str | os.PathLike, flag: str | None = None) -> Path:
    """Return `path` if a file can be created there; raise StoreError naming the folder otherwise (and the
    command-line `flag` that named it, when it came from one)."""
    path = Path(path)
    other = f"choose another {flag}" if flag else "choose another output path"
    if not path.parent.is_dir():
        raise StoreError(f"output folder {path.parent} does not exist; create it (mkdir -p {path.parent}) or {other}")
    if not os.access(path.parent, os.W_OK):
        raise StoreError(f"output folder {path.parent} is not writable; {other}")
    if path.is_dir():
        raise StoreError(f"output {path} is a folder; give a file name like {path / 'profile.h5'}")
    return path


def is_store(path: str | os.PathLike) -> bool:
    """True when `path` is a file holding a moeprof store (of any schema version)."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except (OSError, ValueError):
        return False


# Groups another command added to a store; replacing the store's profile carries them over (`write_profile`).
KEPT_GROUPS = ("critical", "schedules")


def check_output(path: str | os.PathLike, *, force: bool = False, flag: str = "--out") -> Path:
    """Return the file to write for the output `path`, or raise StoreError before any work is done.

    An existing file that is not a moeprof store (the input data, say), a read-only file and a symlink are never
    replaced without `force` (a symlink with `force`: its target is written). An existing store named as the
    output is replaced (the user named it), and `write_profile` keeps its KEPT_GROUPS or refuses. The folder
    is probed by creating (and removing) the temporary file, so /proc or a read-only mount fails here, before
    the run, not after it.
    """
    path = Path(path)
    if path.is_symlink():
        if not force:
            raise StoreError(f"{flag} {path} is a symlink (to {os.readlink(path)}); give the real path, or pass "
                             "--force to replace the file it points to")
        path = path.resolve()
    check_writable(path, flag)
    if path.exists() and not force:
        if not is_store(path):
            raise StoreError(f"{flag} {path} exists and is not a moeprof store (is it your data?); choose "
                             "another file name, or pass --force to replace it")
        if not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222:  # (root may write anything)
            raise StoreError(f"{flag} {path} is read-only; make it writable, or pass --force to replace it")
    _probe(path, flag)
    return path


def _probe(path: Path, flag: str) -> None:
    from moeprof.atomic import tmp_name

    tmp = tmp_name(path)
    try:
        with open(tmp, "wb"):
            pass
    except OSError as exc:
        raise StoreError(f"cannot create files in {path.parent} ({exc.strerror or exc}); choose another "
                         f"{flag}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (checked writable first); renamed onto `path` only on success."""
    with _atomic_path(check_writable(path)) as tmp:
        yield tmp



# ----------------------------------------------------------------------------------------------------------
# The schema table


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
    import re

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


def _str_list(value) -> list[str]:
    """Return a list-of-strings attribute, stored as an array of strings or (older stores) as JSON text."""
    if isinstance(value, (str, bytes)):
        return [str(v) for v in json.loads(_value(value))]
    return [str(_value(v)) for v in np.asarray(value).reshape(-1)]


# ----------------------------------------------------------------------------------------------------------
# Writing

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


@contextlib.contextmanager
def _in_memory(path: Path, image: bytes | None = None) -> Iterator[h5py.File]:
    """Yield an HDF5 file built in memory (from `image` when given); written to `path` atomically on success.

    HDF5 never touches the disk itself: a full disk is an ordinary OSError of one plain write (h5py's own
    close on ENOSPC crashes the process), reported as `DiskFullError` with the old file untouched.
    """
    check_writable(path)
    buf = io.BytesIO(image) if image is not None else io.BytesIO()
    with h5py.File(buf, "r+" if image is not None else "w") as f:
        yield f
    write_bytes(path, buf.getbuffer())


def estimate_bytes(stats: ProfileStats, trace=None) -> int:
    """Return a lower bound of the size of the store of `stats` (its state tensors; derived ones add more)."""
    n = 0
    for member in stats.members.values():
        n += sum(int(t.numel()) * 8 for t in member.state().values())
    if trace is not None:
        n += sum(int(t.numel()) * 8 for t in vars(trace).values() if hasattr(t, "numel"))
    return n


def check_store_space(path: str | os.PathLike, stats: ProfileStats, trace=None) -> None:
    """Raise DiskFullError before a run when the folder of `path` cannot hold the store of `stats`."""
    check_space(path, estimate_bytes(stats, trace))


def _carry_over(path: Path, f: h5py.File, num_layers: int, num_experts: int, model: str | None = None,
                model_config: dict | None = None) -> None:
    """Copy KEPT_GROUPS of the store being replaced at `path` into `f`; refused (StoreError) when the old store
    profiles a model of another shape, or (given `model` / `model_config`) another model or config: its /critical
    and /schedules would otherwise be kept beside a profile they do not describe."""
    if not path.exists() or not is_store(path):
        return
    with h5py.File(path, "r") as old:
        kept = [g for g in KEPT_GROUPS if g in old]
        if not kept:
            return
        what = ", ".join("/" + g for g in kept)
        shape = (int(old.attrs.get("num_layers", -1)), int(old.attrs.get("num_experts", -1)))
        if shape != (num_layers, num_experts):
            raise StoreError(f"{path} holds {what} of a model with [layers, experts] = {shape}, not "
                             f"{(num_layers, num_experts)}; write the new profile to another --out (or delete the "
                             "old store first)")
        old_model = _value(old.attrs.get("model", ""))
        if model is not None and old_model != model:
            raise StoreError(f"{path} holds {what} of {old_model!r}, not {model!r}; write the new profile to another "
                             "--out (or delete the old store first)")
        if model_config is not None and "model_config" in old.attrs:  # (a store too old to have one: shape only)
            try:
                old_fp = config_fingerprint(json.loads(_value(old.attrs["model_config"]) or "{}"))
            except ValueError:
                old_fp = None
            if old_fp != config_fingerprint(model_config):
                raise StoreError(f"{path} holds {what} of {old_model!r} with another config (the checkpoint "
                                 "changed); write the new profile to another --out (or delete the old store first)")
        for g in kept:
            old.copy(old[g], f, g)


def check_replace(path: str | os.PathLike, num_layers: int, num_experts: int, model: str | None = None,
                  model_config: dict | None = None) -> None:
    """Raise StoreError (before a run) when replacing the store at `path` would keep results of another shape,
    model or config (see `_carry_over`)."""
    path = Path(path)
    if path.exists() and is_store(path):
        with h5py.File(io.BytesIO(), "w") as scratch:
            _carry_over(path, scratch, num_layers, num_experts, model, model_config)


def write_profile(path: str | os.PathLike, stats: ProfileStats, meta: ProfileMeta, *,
                  intermediate_sizes: list[int], site_kinds: list[str], site_layers: list[int] | None = None,
                  trace=None, token_texts: list[str] | None = None) -> Path:
    """Write a profile store atomically and return its path: root facts, every accumulator of `stats` (and
    `trace`, when it recorded tokens) through its `to_hdf5`, and the outlier statistics. Replacing a store
    keeps its KEPT_GROUPS (/critical, /schedules) when they fit the new shape, else raises StoreError."""
    path = Path(path)
    site_kinds = canonical_site_kinds(site_kinds)
    with _in_memory(path) as f:
        L, E = stats.num_layers, stats.num_experts
        _carry_over(path, f, L, E, meta.model, meta.model_config)
        a = f.attrs
        a["format"] = FORMAT
        a["schema_version"] = SCHEMA_VERSION
        a["model"] = meta.model
        a["model_type"] = meta.model_type
        a["architecture"] = meta.architecture
        a["is_moe"] = bool(meta.is_moe)
        a["num_layers"] = L
        a["num_experts"] = E
        a["top_k"] = meta.top_k
        a["hidden_size"] = meta.hidden_size
        a["model_config"] = json.dumps(meta.model_config, default=str)
        a["data_sources"] = _str_array(meta.data_sources)
        a["tokens"] = meta.tokens
        a["seq_len"] = meta.seq_len
        a["batch_size"] = meta.batch_size
        a["dtype"] = meta.dtype
        a["device"] = meta.device
        a["types"] = _str_array(stats.types)
        a["moeprof_version"] = __version__
        a["created_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        a["wall_s"] = float(meta.wall_s)
        for k, v in meta.extra.items():
            a[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)

        _write(f, "p_grid", np.array(stats.p_grid, dtype=np.float64))
        _write(f, "hist_edges", np.linspace(0.0, 1.0, HIST_BINS + 1))
        _write(f, "sites/intermediate_size", np.array(intermediate_sizes, dtype=np.int64))
        _write(f, "sites/kind", _str_array(site_kinds))
        _write(f, "sites/layer", np.array(range(L) if site_layers is None else site_layers, dtype=np.int64))
        for (_, t), member in stats.members.items():
            member.to_hdf5(f.require_group(member_path(member, t)))
        _write_outliers(f, stats, site_kinds)
        if trace is not None and trace.recorded:
            trace.to_hdf5(f.require_group(member_path(trace)))
            if token_texts is not None:
                _write(f, "trace/token_text", _str_array(token_texts[:trace.recorded]))
        label_dims(f, schema_table({type(m).__name__: type(m) for m in [*stats.members.values(), trace]
                                    if m is not None}))
    return path


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


def _write_outliers(f: h5py.File, stats: ProfileStats, site_kinds: list[str]) -> None:
    """Per-layer routing balance and robust z-scores of per-expert sparsity, under /outliers."""
    tokens = stats.routing.tokens.numpy()
    slots = _slots(site_kinds, stats.num_layers, stats.num_experts)
    g = f.require_group("outliers")
    g.attrs["doc"] = f"robust z-score (median/MAD within a layer; |z| > {OUTLIER_Z} flagged) and routing balance"
    bal = routing_balance(tokens, slots, stats.routing.weight_sum.numpy())
    for name in ("load_share", "entropy_norm", "max_mean_load", "dead"):
        _write(f, f"outliers/{name}", bal[name])
    for name in BALANCE_DATASETS:
        _write(f, f"routing/{name}", bal[name])
    for k, v in model_balance(bal, slots).items():  # model-level aggregates over the routed layers
        f["routing"].attrs[k] = v
    for t in stats.types:
        z, flagged = outlier_arrays(tokens, slots, stats.activations[t].mean_sparsity().numpy())
        _write(f, "outliers/{type}/sparsity_z", z, t)
        _write(f, "outliers/{type}/flagged", flagged, t)


# ----------------------------------------------------------------------------------------------------------
# What the typed readers return


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


# ----------------------------------------------------------------------------------------------------------
# Reading


class _UpgradedGroup:
    """A read-only stand-in for an HDF5 group of an older schema, with the datasets the current one adds."""

    def __init__(self, name: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]):
        self.name, self._arrays, self.attrs = name, arrays, attrs

    def __contains__(self, key: str) -> bool:
        return key in self._arrays

    def __getitem__(self, key: str) -> np.ndarray:
        return self._arrays[key]


class _Attrs(dict):
    """The root attributes; a missing one raises StoreError naming it and the command that writes it."""

    def __init__(self, store: "Store", items: dict):
        super().__init__(items)
        self._store = store

    def __missing__(self, key: str):
        raise self._store._missing(key, "root attribute")


class Store:
    """A moeprof store opened read-only. Use as a context manager, or call `close()`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path} does not exist; run `moeprof profile MODEL --out {self.path}` first")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError:
            raise StoreError(f"{self.path} is not an HDF5 file; give a store written by `moeprof profile`") from None
        self.file_attr_text = _value(self.file.attrs.get("schema_version"))
        fmt = self.file.attrs.get("format")
        if fmt != FORMAT or "schema_version" not in self.file.attrs:
            self.file.close()
            raise StoreError(f"{self.path} is an HDF5 file but not a moeprof store; give a file written by "
                             "`moeprof profile`")
        try:
            version = int(self.file.attrs["schema_version"])
        except (TypeError, ValueError):
            self.file.close()
            raise StoreError(f"{self.path} has schema_version {self.file_attr_text!r}, not a number; the file is "
                             "damaged: profile again to rewrite it") from None
        if version > SCHEMA_VERSION:
            self.file.close()
            raise StoreError(f"{self.path} has schema version {version}, newer than this moeprof understands "
                             f"({SCHEMA_VERSION}); upgrade moeprof (pip install -U moeprof)")
        self.version = version

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def _writer(self, name: str) -> str:
        """Return the command that writes item `name` of this store."""
        top = name.strip("/").split("/")[0]
        if top == "critical":
            return f"`moeprof critical MODEL --task TASK --out {self.path}`"
        if top == "schedules":
            return "`moeprof schedule`"
        if top == "trace":
            return f"`moeprof profile MODEL --trace-tokens N --out {self.path}`"
        return f"`moeprof profile MODEL --out {self.path}`"

    def _missing(self, name: str, what: str = "dataset") -> StoreError:
        return StoreError(f"{self.path} has no {what} {name!r}; the store is incomplete: {self._writer(name)} "
                          "writes it")

    def _need(self, name: str):
        """Return the HDF5 object at `name`, or raise StoreError naming it and the command that writes it."""
        if name not in self.file:
            raise self._missing(name)
        return self.file[name]

    def _read(self, name: str) -> np.ndarray:
        return self._need(name)[()]

    def _attr(self, name: str) -> Any:
        if name not in self.file.attrs:
            raise self._missing(name, "root attribute")
        return self.file.attrs[name]

    @property
    def attrs(self) -> dict[str, Any]:
        return _Attrs(self, {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self.file.attrs.items()})

    @property
    def model(self) -> str:
        return str(self._attr("model"))

    @property
    def types(self) -> list[str]:
        return _str_list(self._attr("types"))

    @property
    def data_sources(self) -> list[str]:
        """Return the data the profile read (an array of strings; JSON text in older stores; [] when absent)."""
        raw = self.file.attrs.get("data_sources")
        return [] if raw is None else _str_list(raw)

    @property
    def p_grid(self) -> np.ndarray:
        return self._read("p_grid")

    @property
    def hist_edges(self) -> np.ndarray:
        """Return the histogram bin edges [B+1] (a file without them: the bins every moeprof version wrote)."""
        return self.file["hist_edges"][()] if "hist_edges" in self.file else np.linspace(0.0, 1.0, HIST_BINS + 1)

    @property
    def is_moe(self) -> bool:
        return bool(self._attr("is_moe"))

    @property
    def num_layers(self) -> int:
        return int(self._attr("num_layers"))

    @property
    def num_experts(self) -> int:
        return int(self._attr("num_experts"))

    def require_type(self, type: str) -> None:
        """Raise StoreError when `type` is not an activation type (naming the nearest one) or was not profiled."""
        if type not in ACTIVATION_TYPES:
            import difflib

            from moeprof.activations import TYPE_NAMES

            names = {**{t: t for t in ACTIVATION_TYPES}, **{n: t for t, n in TYPE_NAMES.items()}}
            near = difflib.get_close_matches(str(type).lower(), list(names), n=1, cutoff=0.5)
            hint = f"did you mean --type {names[near[0]]}? " if near else ""
            raise StoreError(f"{type!r} is not an activation type; {hint}give one of "
                             f"{', '.join(f'{t} ({TYPE_NAMES[t]})' for t in ACTIVATION_TYPES)}: {self.path} "
                             f"profiled {', '.join(self.types)} (e.g. --type {'i' if 'i' in self.types else self.types[0]})")
        if type not in self.types:
            raise StoreError(f"activation type {type!r} was not profiled in {self.path} (it has "
                             f"{', '.join(self.types)}); profile it with --types {type}")

    def p_index(self, p: float) -> int:
        """Return the index of `p` in the p-grid, or raise naming the values that exist."""
        grid = self.p_grid
        hits = np.flatnonzero(np.isclose(grid, p, atol=1e-9))
        if not hits.size:
            raise StoreError(f"p = {p} is not in the profiled p-grid ({', '.join(f'{q:g}' for q in grid)})")
        return int(hits[0])

    # --- typed readers

    def sites(self) -> Sites:
        """Return the per-layer FFN facts (a store without /sites/kind: every layer routed if MoE, else dense)."""
        L, E = self.num_layers, self.num_experts
        if "sites/kind" in self.file:
            kinds = [_value(k) for k in self.file["sites/kind"][()]]
        else:
            kinds = ["routed" if self.is_moe else "dense"] * L
        kinds = [_SITE_KIND_ALIASES.get(str(k), str(k)) for k in kinds]
        sizes = (self.file["sites/intermediate_size"][()] if "sites/intermediate_size" in self.file
                 else np.zeros(L, dtype=np.int64))
        slots = _slots(kinds, L, E) if E > 1 else np.ones((L, E), dtype=bool)
        layers = self.file["sites/layer"][()] if "sites/layer" in self.file else np.arange(L)
        return Sites(sizes, kinds, slots, layers)

    def routing(self) -> Routing:
        """Return the routing counts (a store without layer_tokens: each layer's busiest expert's count)."""
        tokens = self._read("routing/tokens")
        layer_tokens = (self._read("routing/layer_tokens") if "routing/layer_tokens" in self.file
                        else tokens.max(-1))
        return Routing(tokens, self._read("routing/weight_sum"), layer_tokens)

    def balance(self) -> Balance:
        """Return the expert-load metrics, computed from the exact routing counts and the sites (so stores written
        before they were stored read the same): see `moeprof.outliers.routing_balance` / `model_balance`."""
        r, slots = self.routing(), self.sites().slots
        bal = routing_balance(r.tokens, slots, r.weight_sum)
        return Balance(**bal, model=model_balance(bal, slots))

    def routing_tokens(self) -> np.ndarray:
        """Return tokens routed to each expert [L, E]."""
        return self.routing().tokens

    def sparsity(self, type: str) -> Sparsity:
        """Return the top-p sparsity datasets of `type`."""
        self.require_type(type)
        return Sparsity(*(self._read(f"sparsity/{type}/{n}") for n in ("mean", "std", "hist", "vectors", "width")))

    def mean(self, type: str) -> np.ndarray:
        """Return token-averaged top-p sparsity [L, E, P] of `type`."""
        self.require_type(type)
        return self._read(f"sparsity/{type}/mean")

    def magnitude(self, type: str) -> Magnitude:
        """Return the magnitude datasets of `type`."""
        self.require_type(type)
        return Magnitude(*(self._read(f"magnitude/{type}/{n}")
                           for n in ("l1_mean", "l2_mean", "max_abs_mean", "max_abs", "peak_ratio_mean")))

    def abs_histogram(self, type: str) -> AbsHist:
        """Return the |entry| histogram of `type` (StoreError naming the fix for a store profiled before it existed)."""
        self.require_type(type)
        if f"abs_hist/{type}" not in self.file:
            raise StoreError(f"{self.path} has no |entry| histogram of {type} (/abs_hist/{type}); it was profiled "
                             f"before moeprof collected one: profile again (`moeprof profile MODEL --out {self.path}`)")
        return AbsHist(self._read(f"abs_hist/{type}/counts"), self._read(f"abs_hist/{type}/edges"),
                            self.magnitude(type).max_abs)

    def dead(self) -> np.ndarray:
        """Return dead [L, E] bool: expert slots routed no token (/outliers/dead; computed from routing and sites
        for a store written without it)."""
        if "outliers/dead" in self.file:
            return np.asarray(self.file["outliers/dead"][()], dtype=bool)
        return dead_mask(self.routing().tokens, self.sites().slots)

    def outliers(self, type: str) -> Outliers:
        """Return /outliers for `type`; computed from routing and sparsity for a store written without them."""
        self.require_type(type)
        if f"outliers/{type}/sparsity_z" in self.file:
            return Outliers(*(self._read(f"outliers/{n}") for n in ("load_share", "entropy_norm", "max_mean_load",
                                                                   "dead", f"{type}/sparsity_z", f"{type}/flagged")))
        tokens, slots = self.routing().tokens, self.sites().slots
        bal = routing_balance(tokens, slots)
        z, flagged = outlier_arrays(tokens, slots, self.mean(type))
        return Outliers(bal["load_share"], bal["entropy_norm"], bal["max_mean_load"], bal["dead"], z, flagged)

    def _critical_groups(self) -> list[h5py.Group]:
        """Return every /critical record group: /critical itself in a store of one search (written before
        records were keyed), else each /critical/<type>/<rule>/<task>, in writing order."""
        if "critical" not in self.file:
            return []
        root = self.file["critical"]
        keyed = _keyed_records(root)
        if not keyed:
            return [root] if _is_record(root) else []
        return sorted(keyed, key=lambda g: int(g.attrs.get("sequence", 0)))

    def criticals(self) -> list[Critical]:
        """Return every critical-sparsity record of the store (one per type, rule and task searched)."""
        return [self._critical_record(g) for g in self._critical_groups()]

    def critical(self, type: str | None = None, rule: str | None = None, task: str | None = None) -> Critical | None:
        """Return the latest /critical record matching type / rule / task (None = any), or None if none.

        Reads both layouts: one record per search under /critical/<type>/<rule>/<task>, and the single /critical
        group of stores written before. Raises StoreError when a per-expert array's shape is not [layers,
        experts]. A hand-made group's `tolerance` dataset reads as tolerance_sparsity.
        """
        want = {"type": type, "rule": rule, "task": task}
        groups = [g for g in self._critical_groups()
                  if all(v is None or _value(g.attrs.get(k)) == v for k, v in want.items())]
        return self._critical_record(groups[-1]) if groups else None

    def _critical_record(self, g: h5py.Group) -> Critical:
        arrays = {name: g[name][()] for name in Critical.ARRAYS if isinstance(g.get(name), h5py.Dataset)}
        if "tolerance_sparsity" not in arrays and isinstance(g.get("tolerance"), h5py.Dataset):
            arrays["tolerance_sparsity"] = g["tolerance"][()]
        if isinstance(g.get("points"), h5py.Group):
            arrays.update({f"points/{k}": v[()] for k, v in g["points"].items() if isinstance(v, h5py.Dataset)})
        shape = (self.num_layers, self.num_experts)
        for name in ("per_expert_sparsity", "tolerance_sparsity", "tolerance_p"):
            if name in arrays:
                arrays[name] = np.asarray(arrays[name], dtype=np.float64)
                if arrays[name].shape != shape:
                    raise StoreError(f"{self.path}: {g.name}/{name} has shape {arrays[name].shape}, expected "
                                     f"[layers, experts] = {shape}; rerun `moeprof critical` on this store")
        return Critical.from_items({k: _value(v) for k, v in g.attrs.items()}, arrays)

    def effective_rank(self, type: str) -> tuple[np.ndarray, str] | None:
        """Return (effective rank [L, E], method) of `type` from /rank/<type>, or None when the profile was run
        without --rank (NaN: a layer not kept, or an expert that saw no vector)."""
        self.require_type(type)
        path = f"rank/{type}"
        if path not in self.file:
            return None
        g = self.file[path]
        return g["effective_rank"][()], str(_value(g.attrs.get("method", "")))

    def parameters(self) -> dict[str, int] | None:
        """Return {"total", "active"} parameter counts recorded at profile time (None: an older store)."""
        raw = self.file.attrs.get("parameters")
        return None if raw is None else {k: int(v) for k, v in json.loads(raw).items()}

    def stability(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """Return (attrs, arrays) of /stability (arrays by their schema names), or None when absent."""
        if "stability" not in self.file:
            return None
        g = self.file["stability"]
        return ({k: _value(v) for k, v in g.attrs.items()},
                {k: v[()] for k, v in g.items() if isinstance(v, h5py.Dataset)})

    def schedule_names(self) -> list[str]:
        """Return the names of the schedules stored under /schedules (sorted)."""
        return sorted(self.file["schedules"]) if "schedules" in self.file else []

    def schedule(self, name: str):
        """Return the `moeprof.schedule.Schedule` stored as /schedules/<name>; StoreError names the ones there."""
        from moeprof.schedule.data import Schedule, ScheduleError

        if name not in self.schedule_names():
            raise StoreError(f"{self.path} has no schedule {name!r}; it has: "
                             f"{', '.join(self.schedule_names()) or 'none'}")
        g = self.file["schedules"][name]
        d = json.loads(str(_value(g.attrs["schedule"])))
        d["p"] = np.asarray(g["p"][()], dtype=np.float64)
        try:
            return Schedule.from_dict(d, source=f"{self.path}:/schedules/{name}")
        except ScheduleError as exc:
            raise StoreError(str(exc)) from None

    def has_member(self, statistic, type: str | None = None) -> bool:
        """True when the store holds accumulator class `statistic`'s group (e.g. a trace, recorded on request)."""
        return member_path(statistic, type) in self.file

    def trace(self) -> Trace:
        """Return the per-token trace; StoreError naming the flag when the profile recorded none."""
        if "trace" not in self.file:
            raise StoreError(f"{self.path} has no per-token trace; profile with --trace-tokens N to record the first "
                             "N tokens")
        g = self.file["trace"]
        sparsity = {t: g[f"sparsity_{t}"][()] for t in self.types if f"sparsity_{t}" in g}
        return Trace(*(g[n][()] for n in ("token_id", "sequence", "position", "expert", "weight")), sparsity,
                     self.token_texts())

    def token_texts(self) -> list[str] | None:
        """Return the decoded text of each traced token [N], or None when the store has no trace."""
        if "trace/token_text" not in self.file:
            return None
        return [_value(t) for t in self.file["trace/token_text"][()]]

    def member_group(self, statistic, type: str | None = None):
        """Return the group holding accumulator class `statistic`'s state (for its `from_hdf5`).

        Schema-1 groups are upgraded on the fly: sums from mean × vectors, squared sums from (std² + mean²) ×
        vectors, magnitude vector counts from sparsity/<t>/vectors (equal up to rounding, not bit for bit).
        """
        path = member_path(statistic, type)
        if path not in self.file:
            raise StoreError(f"{self.path} has no {path} (statistic {statistic.key!r}); it was written before "
                             "that statistic existed: profile the model again to collect it")
        g = self.file[path]
        if self.version >= 2:
            return g
        arrays = {k: v[()] for k, v in g.items() if isinstance(v, h5py.Dataset)}
        if statistic.group in ("sparsity", "magnitude"):
            n = self.file[f"sparsity/{type}/vectors"][()].astype(np.float64)  # [L, E]
            if statistic.group == "sparsity":
                mean, std = np.nan_to_num(arrays["mean"]), np.nan_to_num(arrays["std"])
                arrays["sum"] = mean * n[..., None]
                arrays["sqsum"] = (std * std + mean * mean) * n[..., None]
            else:
                arrays["vectors"] = n.astype(np.int64)
                for name in ("l1", "l2", "max_abs", "peak_ratio"):
                    arrays[f"{name}_sum"] = np.nan_to_num(arrays[f"{name}_mean"]) * n
        return _UpgradedGroup(g.name, arrays, {**dict(g.attrs), **({"type": type} if type else {})})

    def expert_table(self, type: str = "i", p: float | None = 0.9) -> dict[str, list]:
        """Return the per-expert table as columns {name: list}: one row per expert slot that is a real expert
        (dead ones included, a dense site's padding slots not), at `p` (None: one row per (expert, p)).

        Columns: row (site row of every [L, E] array), layer (decoder layer), kind, expert, p, tokens, load_share,
        utilization, weight_share, dead, vectors, sparsity (mean top-p sparsity of `type` at p), sparsity_std,
        l1_mean, max_abs, peak_ratio_mean. Everything comes from the typed readers (the exact counts).
        """
        self.require_type(type)
        grid = self.p_grid
        ps = list(range(len(grid))) if p is None else [self.p_index(p)]
        sites, bal, sp, mag = self.sites(), self.balance(), self.sparsity(type), self.magnitude(type)
        tokens = self.routing().tokens
        layers = sites.layer if sites.layer is not None else np.arange(self.num_layers)
        cols: dict[str, list] = {k: [] for k in (
            "row", "layer", "kind", "expert", "p", "tokens", "load_share", "utilization", "weight_share", "dead",
            "vectors", "sparsity", "sparsity_std", "l1_mean", "max_abs", "peak_ratio_mean")}
        for l, e in zip(*np.nonzero(sites.slots)):
            for j in ps:
                for k, v in (("row", int(l)), ("layer", int(layers[l])), ("kind", sites.kind[l]), ("expert", int(e)),
                             ("p", float(grid[j])), ("tokens", int(tokens[l, e])),
                             ("load_share", float(bal.load_share[l, e])), ("utilization", float(bal.utilization[l, e])),
                             ("weight_share", float(bal.weight_share[l, e])), ("dead", bool(bal.dead[l, e])),
                             ("vectors", int(sp.vectors[l, e])), ("sparsity", float(sp.mean[l, e, j])),
                             ("sparsity_std", float(sp.std[l, e, j])), ("l1_mean", float(mag.l1_mean[l, e])),
                             ("max_abs", float(mag.max_abs[l, e])), ("peak_ratio_mean", float(mag.peak_ratio_mean[l, e]))):
                    cols[k].append(v)
        return cols

    def to_dataframe(self, type: str = "i", p: float | None = 0.9):
        """Return `expert_table(type, p)` as a pandas DataFrame (a dict of columns when pandas is not installed)."""
        cols = self.expert_table(type, p)
        try:
            import pandas as pd
        except ImportError:
            return cols
        return pd.DataFrame(cols)

    def _dataset(self, name: str) -> np.ndarray:
        """Return any dataset by its path (inside the store only: callers use the typed readers)."""
        return self._read(name)

    def layout(self) -> list[tuple[str, tuple, str, str, str]]:
        """Return (name, shape, dtype, doc, units) for every dataset, in file order."""
        rows = []

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                rows.append((name, obj.shape, str(obj.dtype), str(obj.attrs.get("doc", "")),
                             str(obj.attrs.get("units", ""))))

        self.file.visititems(visit)
        return rows


def open_store(path: str | os.PathLike) -> Store:
    """Open a moeprof store read-only (raises StoreError for anything that is not one).

    In a notebook: `open_store("outputs/tiny-moe.h5").to_dataframe(type="i", p=0.9)` is the per-expert table;
    `.sparsity("i").mean` [layer, expert, p], `.routing()`, `.balance()`, `.critical()` the typed arrays."""
    return Store(path)


def export_table(store: Store, path: str | os.PathLike, *, type: str = "i", p: float | None = 0.9,
                 format: str = "csv") -> Path:
    """Write `store.expert_table(type, p)` to `path` as CSV (no pandas needed) or Parquet (pandas + pyarrow),
    atomically; return the path."""
    from moeprof.atomic import write_bytes, write_text

    cols = store.expert_table(type, p)
    path = check_writable(path)
    if format == "parquet":
        try:
            import pandas as pd

            buf = io.BytesIO()
            pd.DataFrame(cols).to_parquet(buf, index=False)
        except ImportError as exc:
            raise StoreError(f"Parquet needs pandas and pyarrow ({exc.name} is not installed); "
                             "pip install pandas pyarrow, or export --csv") from None
        return write_bytes(path, buf.getvalue())
    import csv

    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(list(cols))
    w.writerows(zip(*cols.values()))
    return write_text(path, text.getvalue())


@contextlib.contextmanager
def update_store(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Yield a writable copy of an existing store; it replaces the original only if the block succeeds."""
    with open_store(path):
        pass  # validate before copying
    path = Path(path)
    with _in_memory(path, path.read_bytes()) as f:
        yield f


def _is_record(g) -> bool:
    """True when an HDF5 group is one critical-sparsity record (it has the search's headline)."""
    return "critical_p" in g.attrs or "points" in g or "per_expert_sparsity" in g


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


def write_stability(path: str | os.PathLike, attrs: dict[str, Any], arrays: dict[str, Any]) -> None:
    """Replace the store's /stability group by `attrs` and `arrays` (names as in the schema table, e.g.
    "gap_jaccard"), atomically."""
    with update_store(path) as f:
        if "stability" in f:
            del f["stability"]
        g = f.create_group("stability")
        g.attrs["doc"] = STABILITY_DOC
        for k, v in attrs.items():
            g.attrs[k] = v
        for name, arr in arrays.items():
            _write(f, f"stability/{name}", arr)
        label_dims(f)


def write_critical(path: str | os.PathLike, record: Critical) -> None:
    """Write `record` as /critical/<type>/<rule>/<task> (replacing only the same search), atomically.

    Records of other searches are kept; a store holding one unkeyed /critical (written before) has it moved under
    its own key first. Raises StoreError when the store did not profile the record's type, ValueError when the
    per-expert arrays do not fit the store's [layers, experts] (the store profiles another model).
    """
    with open_store(path) as st:
        shape = (st.num_layers, st.num_experts)
        type = record.attrs.get("type")
        if type:
            st.require_type(type)
    per = record.per_expert_sparsity
    if per is not None and tuple(np.shape(per)) != shape:
        raise ValueError(f"per-expert sparsity has shape {np.shape(per)}, the store {shape}: "
                         "the store profiles another model; give a different --out")
    a = record.attrs
    with update_store(path) as f:
        root = f.require_group("critical")
        keyed = _keyed_records(root)
        if _is_record(root) and not keyed:  # one search of an older store: keep it under its own key
            key = critical_key(*(str(_value(root.attrs.get(k, ""))) for k in ("type", "rule", "task")))
            f.create_group(key)
            for k, v in root.attrs.items():
                f[key].attrs[k] = v
            for name in list(root):
                if name not in _RECORD_SKIP:
                    f.copy(root[name], f[key], name)
        sequence = int(root.attrs.get("records_written", len(keyed) + (1 if _is_record(root) else 0))) + 1
        key = critical_key(str(a.get("type", "")), str(a.get("rule", "")), str(a.get("task", "")))
        if key in f:
            del f[key]
        _write_record(f.create_group(key), record, sequence)
        # /critical itself mirrors the latest search, as in stores of one search (older readers keep working)
        for name in [n for n in root if n not in _RECORD_SKIP]:
            del root[name]
        for k in list(root.attrs):
            del root.attrs[k]
        _write_record(root, record, sequence)
        root.attrs["records_written"] = sequence
        label_dims(f)
        root.attrs["doc"] = (CRITICAL_DOC + "; this group holds the latest search, critical/<type>/<rule>/<task> "
                             "every search")


_RECORD_SKIP = set(ACTIVATION_TYPES) | {"-"}  # the first level of keyed records inside /critical


def _keyed_records(root) -> list:
    found: list = []
    for t in root:
        if t in _RECORD_SKIP and isinstance(root[t], h5py.Group):
            root[t].visititems(lambda n, o: found.append(o) if isinstance(o, h5py.Group) and _is_record(o) else None)
    return found


def _write_record(g, record: Critical, sequence: int) -> None:
    g.attrs["doc"] = CRITICAL_DOC
    for k, v in record.attrs.items():
        g.attrs[k] = v
    g.attrs["sequence"] = sequence
    for name, arr in record.arrays().items():
        field = _FIELDS[f"critical/{name}"]
        parent, _, leaf = name.rpartition("/")
        _put(g.require_group(parent) if parent else g, leaf, arr, field.doc_for(), field.units)


def write_schedule(path: str | os.PathLike, name: str, schedule) -> None:
    """Store `schedule` (a `moeprof.schedule.Schedule`) as /schedules/<name>, atomically, replacing one of that name.

    StoreError when its [layers, experts] differ from the store's (a schedule of another model) or the name is
    not a plain HDF5 name.
    """
    if not name or "/" in name or name.startswith("."):
        raise StoreError(f"schedule name {name!r} is not usable; give a plain name such as 'wikipedia-0.99'")
    with open_store(path) as st:
        shape = (st.num_layers, st.num_experts)
    if tuple(schedule.p.shape) != shape:
        raise StoreError(f"the schedule is [layers, experts] = {list(schedule.p.shape)}, the store "
                         f"{list(shape)}: it was made for another model")
    d = schedule.to_dict()
    d.pop("p")
    spec = _FIELDS["schedules/<name>/p"]
    with update_store(path) as f:
        group = f.require_group("schedules")
        if name in group:
            del group[name]
        g = group.create_group(name)
        g.attrs["schedule"] = json.dumps(d)
        _put(g, "p", np.asarray(schedule.p, dtype=np.float64), spec.doc_for(), spec.units)
        label_dims(f)

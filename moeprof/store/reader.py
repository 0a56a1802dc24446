"""Reading a store: `open_store(path)` returns a read-only `Store` whose typed readers return the records of
`moeprof.store.records`; stores of schema 1 read the same (see `moeprof.store`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from moeprof.activation_types import ACTIVATION_TYPES, HIST_BINS
from moeprof.outliers import dead_mask, model_balance, outlier_arrays, routing_balance
from moeprof.store.records import (AbsHist, Balance, Critical, Magnitude, Outliers, Routing, Sites, Sparsity, Trace,
                                   _str_list, _value)
from moeprof.store.schema import (_SITE_KIND_ALIASES, FORMAT, SCHEMA_VERSION, StoreError, _is_record, _keyed_records,
                                  _slots, member_path)


_STORE_ROOT_ATTRS = ("moeprof_version", "num_layers", "num_experts", "types")  # written into every store
_DIM_NAMES = {"L": "layers", "E": "experts", "P": "p", "B": "bins"}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _has_hdf5_signature(path: Path) -> bool:
    """True when `path` starts with the HDF5 signature (at 0, or 512, 1024, … for a file with a user block)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return any(head[at:at + 8] == _HDF5_SIGNATURE for at in [0, *(512 << k for k in range(7))])


def _reason(exc: BaseException) -> str:
    """Return an HDF5 error's message without h5py's "(… file read failed …)" detail lines."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def is_store(path: str | os.PathLike) -> bool:
    """True when `path` is a file holding a moeprof store (of any schema version)."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except (OSError, ValueError):
        return False


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


# the columns of `Store.expert_table` (and of the CSV / Parquet `moeprof export` writes), in order
EXPERT_TABLE_COLUMNS = ("row", "layer", "kind", "expert", "p", "tokens", "load_share", "utilization", "weight_share",
                        "dead", "vectors", "sparsity", "sparsity_std", "l1_mean", "max_abs", "peak_ratio_mean")


class Store:
    """A moeprof store opened read-only. Use as a context manager, or call `close()`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path} does not exist; run `moeprof profile MODEL --out {self.path}` first")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            if _has_hdf5_signature(self.path):
                raise StoreError(f"{self.path} is damaged: HDF5 cannot open it ({_reason(exc)}); restore it from a "
                                 "copy or profile again") from None
            raise StoreError(f"{self.path} is not an HDF5 file; give a store written by `moeprof profile`") from None
        try:
            root = {k: self.file.attrs.get(k) for k in ("schema_version", "format", *_STORE_ROOT_ATTRS)}
        except (OSError, KeyError, ValueError) as exc:  # a flipped byte in the root's attribute table
            self.file.close()
            raise StoreError(f"{self.path} is damaged: its root attributes cannot be read ({_reason(exc)}); "
                             "restore it from a copy or profile again") from None
        self.file_attr_text = _value(root["schema_version"])
        fmt = root["format"]
        if fmt != FORMAT or root["schema_version"] is None:
            self.file.close()
            if any(root[k] is not None for k in _STORE_ROOT_ATTRS):  # a store whose format mark was damaged
                raise StoreError(f"{self.path} is damaged: it holds a moeprof store's root attributes, but its "
                                 f"root attribute 'format' reads {_value(fmt)!r}, not {FORMAT!r}; restore it from "
                                 "a copy or profile again")
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

    def _read(self, name: str, dims: str = "") -> np.ndarray:
        """Return dataset `name`; StoreError naming it when HDF5 cannot read it (a fletcher32 checksum that fails:
        the bytes changed after they were written) or, given `dims` (e.g. "LEP"), when its shape is not the
        store's [layers, experts, p, bins]."""
        ds = self._need(name)
        try:
            arr = ds[()]
        except OSError as exc:
            checked = "its checksum does not match its bytes" if ds.fletcher32 else "HDF5 cannot read it"
            raise self._damaged(name, f"{checked} ({_reason(exc)})") from None
        if dims:
            want = tuple(self._dim(d) for d in dims)
            if arr.shape != want:
                raise self._damaged(name, f"its shape is {arr.shape}, but the store's root attributes and p-grid "
                                          f"make [{', '.join(_DIM_NAMES[d] for d in dims)}] = {want}")
        return arr

    def _dim(self, d: str) -> int:
        if d == "L":
            return self.num_layers
        if d == "E":
            return self.num_experts
        if d == "P":
            return int(np.shape(self._read("p_grid"))[0])
        return int(np.shape(self.hist_edges)[0]) - 1  # "B": histogram bins

    def _damaged(self, name: str, why: str) -> StoreError:
        return StoreError(f"{self.path} is damaged: dataset /{name.strip('/')}: {why}; restore the file from a copy "
                          "or profile again")

    def _check_range(self, name: str, arr: np.ndarray, lo: float, hi: float = np.inf) -> np.ndarray:
        """Return `arr` after checking its finite values lie in [lo, hi] (StoreError naming the dataset)."""
        finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        if finite.size and (finite.min() < lo - 1e-9 or finite.max() > hi + 1e-9):
            bad = (finite.max() if finite.max() > hi + 1e-9 else finite.min()).item()
            raise self._damaged(name, f"holds {bad!r}, outside [{lo:g}, {hi:g}]")
        return arr

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
        return self._read("hist_edges") if "hist_edges" in self.file else np.linspace(0.0, 1.0, HIST_BINS + 1)

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

            from moeprof.activation_types import TYPE_NAMES

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
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
            raise StoreError(f"p = {p!r} is not a number of the profiled p-grid ({', '.join(f'{q:g}' for q in grid)}"
                             "); give one of them, or p='all' (None) for every p")
        hits = np.flatnonzero(np.isclose(grid, p, atol=1e-9))
        if not hits.size:
            raise StoreError(f"p = {p} is not in the profiled p-grid ({', '.join(f'{q:g}' for q in grid)})")
        return int(hits[0])

    # --- typed readers

    def sites(self) -> Sites:
        """Return the per-layer FFN facts (a store without /sites/kind: every layer routed if MoE, else dense)."""
        L, E = self.num_layers, self.num_experts
        if "sites/kind" in self.file:
            kinds = [_value(k) for k in self._read("sites/kind")]
        else:
            kinds = ["routed" if self.is_moe else "dense"] * L
        kinds = [_SITE_KIND_ALIASES.get(str(k), str(k)) for k in kinds]
        sizes = (self._read("sites/intermediate_size") if "sites/intermediate_size" in self.file
                 else np.zeros(L, dtype=np.int64))
        slots = _slots(kinds, L, E) if E > 1 else np.ones((L, E), dtype=bool)
        layers = self._read("sites/layer") if "sites/layer" in self.file else np.arange(L)
        return Sites(sizes, kinds, slots, layers)

    def routing(self) -> Routing:
        """Return the routing counts (a store without layer_tokens: each layer's busiest expert's count)."""
        tokens = self._check_range("routing/tokens", self._read("routing/tokens", "LE"), 0)
        layer_tokens = (self._read("routing/layer_tokens", "L") if "routing/layer_tokens" in self.file
                        else tokens.max(-1))
        return Routing(tokens, self._read("routing/weight_sum", "LE"), layer_tokens)

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
        g = f"sparsity/{type}"
        return Sparsity(self.mean(type), self._check_range(f"{g}/std", self._read(f"{g}/std", "LEP"), 0.0, 1.0),
                        self._check_range(f"{g}/hist", self._read(f"{g}/hist", "LEPB"), 0),
                        self._vectors(type), self._read(f"{g}/width", "L"))

    def _vectors(self, type: str) -> np.ndarray:
        return self._check_range(f"sparsity/{type}/vectors", self._read(f"sparsity/{type}/vectors", "LE"), 0)

    def mean(self, type: str) -> np.ndarray:
        """Return token-averaged top-p sparsity [L, E, P] of `type`.

        Checked on read (StoreError naming the dataset): its shape, every value in [0, 1], and, where the store
        keeps the exact state (schema 2), mean = sum / vectors."""
        self.require_type(type)
        name = f"sparsity/{type}/mean"
        mean = self._check_range(name, self._read(name, "LEP"), 0.0, 1.0)
        if f"sparsity/{type}/sum" in self.file:
            total, n = self._read(f"sparsity/{type}/sum", "LEP"), self._vectors(type)
            with np.errstate(divide="ignore", invalid="ignore"):
                expect = total / n[..., None]
            off = (n > 0)[..., None] & ~np.isclose(mean, expect, rtol=1e-9, atol=1e-12, equal_nan=True)
            if off.any():
                l, e, j = (int(i[0]) for i in np.nonzero(off))
                raise self._damaged(name, f"disagrees with sum / vectors at [layer {l}, expert {e}, p index {j}]: "
                                          f"{float(mean[l, e, j])!r} vs {float(expect[l, e, j])!r}")
        return mean

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
            return np.asarray(self._read("outliers/dead"), dtype=bool)
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
        arrays = {name: self._read(f"{g.name}/{name}") for name in Critical.ARRAYS
                  if isinstance(g.get(name), h5py.Dataset)}
        if "tolerance_sparsity" not in arrays and isinstance(g.get("tolerance"), h5py.Dataset):
            arrays["tolerance_sparsity"] = self._read(f"{g.name}/tolerance")
        if isinstance(g.get("points"), h5py.Group):
            arrays.update({f"points/{k}": self._read(v.name) for k, v in g["points"].items()
                           if isinstance(v, h5py.Dataset)})
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
        return self._read(f"{path}/effective_rank"), str(_value(g.attrs.get("method", "")))

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
                {k: self._read(v.name) for k, v in g.items() if isinstance(v, h5py.Dataset)})

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
        d["p"] = np.asarray(self._read(f"{g.name}/p"), dtype=np.float64)
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
        sparsity = {t: self._read(f"trace/sparsity_{t}") for t in self.types if f"sparsity_{t}" in g}
        return Trace(*(self._read(f"trace/{n}") for n in ("token_id", "sequence", "position", "expert", "weight")), sparsity,
                     self.token_texts())

    def token_texts(self) -> list[str] | None:
        """Return the decoded text of each traced token [N], or None when the store has no trace."""
        if "trace/token_text" not in self.file:
            return None
        return [_value(t) for t in self._read("trace/token_text")]

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
            for f in getattr(statistic, "STATE", ()):
                if "{" not in f.name and f.name not in g:  # (a templated name, e.g. a trace's, is per type)
                    raise self._missing(f"{path}/{f.name}")
            return g
        arrays = {k: v[()] for k, v in g.items() if isinstance(v, h5py.Dataset)}
        if statistic.group in ("sparsity", "magnitude"):
            n = self._read(f"sparsity/{type}/vectors").astype(np.float64)  # [L, E]
            if statistic.group == "sparsity":
                mean, std = np.nan_to_num(arrays["mean"]), np.nan_to_num(arrays["std"])
                arrays["sum"] = mean * n[..., None]
                arrays["sqsum"] = (std * std + mean * mean) * n[..., None]
            else:
                arrays["vectors"] = n.astype(np.int64)
                for name in ("l1", "l2", "max_abs", "peak_ratio"):
                    arrays[f"{name}_sum"] = np.nan_to_num(arrays[f"{name}_mean"]) * n
        return _UpgradedGroup(g.name, arrays, {**dict(g.attrs), **({"type": type} if type else {})})

    def expert_table(self, type: str = "i", p: float | str | None = 0.9) -> dict[str, list]:
        """Return the per-expert table as columns {name: list}: one row per expert slot that is a real expert
        (dead ones included, a dense site's padding slots not), at `p` (None or "all": one row per (expert, p)).

        Columns: row (site row of every [L, E] array), layer (decoder layer), kind, expert, p, tokens, load_share,
        utilization, weight_share, dead, vectors, sparsity (mean top-p sparsity of `type` at p), sparsity_std,
        l1_mean, max_abs, peak_ratio_mean. Everything comes from the typed readers (the exact counts).
        """
        self.require_type(type)
        if isinstance(p, str) and p.strip().lower() == "all":  # the CLI's word for every p
            p = None
        grid = self.p_grid
        ps = list(range(len(grid))) if p is None else [self.p_index(p)]
        sites, bal, sp, mag = self.sites(), self.balance(), self.sparsity(type), self.magnitude(type)
        tokens = self.routing().tokens
        layers = sites.layer if sites.layer is not None else np.arange(self.num_layers)
        cols: dict[str, list] = {k: [] for k in EXPERT_TABLE_COLUMNS}
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

    def to_dataframe(self, type: str = "i", p: float | str | None = 0.9):
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

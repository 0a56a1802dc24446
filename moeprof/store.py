"""The versioned HDF5 store: writing a profile atomically, reading it back, adding results later.

Layout (L = layers, E = experts per layer — 1 for dense models, P = p-grid size, B = histogram bins):

    /                      attrs: format="moeprof-profile", schema_version, model, model_type, architecture,
                                  is_moe, num_layers, num_experts, top_k, hidden_size, model_config (JSON),
                                  data_sources (JSON), tokens, seq_len, batch_size, dtype, device, types (JSON),
                                  moeprof_version, created_utc, wall_s
    /p_grid                [P]        the top-p values profiled
    /hist_edges            [B+1]      per-vector sparsity histogram bin edges
    /sites/intermediate_size [L]      FFN width per expert of each layer; /sites/kind [L] "moe" | "dense"
    /routing/tokens        [L, E]     (token, expert) assignments; /routing/weight_sum [L, E]; /routing/layer_tokens [L]
    /sparsity/<t>/mean     [L, E, P]  token-averaged top-p sparsity of activation t ∈ {x, u, g, i}
    /sparsity/<t>/std      [L, E, P]  its per-vector standard deviation
    /sparsity/<t>/hist     [L, E, P, B] per-vector sparsity histogram
    /sparsity/<t>/vectors  [L, E]     vectors seen (routed pairs for an MoE layer)
    /sparsity/<t>/width    [L]        entries per vector
    /magnitude/<t>/{l1_mean, l2_mean, max_abs_mean, max_abs, peak_ratio_mean} [L, E]
    /outliers/...          per-layer routing balance (load_share, entropy_norm, max_mean_load, dead) and
                           <t>/sparsity_z, <t>/flagged [L, E, P]: robust z of expert sparsity within its layer
    /trace/...             optional per-token detail (see `write_profile`)
    /critical/...          critical-sparsity results (added by `moeprof critical`)

Every dataset carries `doc` and `units` attributes. A store is written under a temporary name and renamed, so a
crash or Ctrl-C never leaves a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import h5py
import numpy as np

from moeprof import __version__
from moeprof.activations import HIST_BINS, TYPE_NAMES
from moeprof.atomic import atomic_path as _atomic_path

if TYPE_CHECKING:
    from moeprof.stats import ProfileStats

FORMAT = "moeprof-profile"
SCHEMA_VERSION = 1


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


def check_writable(path: str | os.PathLike) -> Path:
    """Return `path` if a file can be created there; raise StoreError naming the folder otherwise."""
    path = Path(path)
    if not path.parent.is_dir():
        raise StoreError(f"output folder {path.parent} does not exist; create it or choose another --out")
    if not os.access(path.parent, os.W_OK):
        raise StoreError(f"output folder {path.parent} is not writable; choose another --out")
    if path.is_dir():
        raise StoreError(f"output {path} is a folder; give a file name like {path / 'profile.h5'}")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (checked writable first); renamed onto `path` only on success."""
    with _atomic_path(check_writable(path)) as tmp:
        yield tmp


def _put(group: h5py.Group, name: str, data: Any, doc: str, units: str) -> h5py.Dataset:
    arr = np.asarray(data)
    ds = group.create_dataset(name, data=arr, compression="gzip" if arr.size > 4096 else None)
    ds.attrs["doc"] = doc
    ds.attrs["units"] = units
    return ds


def write_profile(path: str | os.PathLike, stats: ProfileStats, meta: ProfileMeta, *,
                  intermediate_sizes: list[int], site_kinds: list[str], trace=None,
                  token_texts: list[str] | None = None) -> Path:
    """Write a profile store atomically and return its path."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        L, E = stats.num_layers, stats.num_experts
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
        a["data_sources"] = json.dumps(meta.data_sources)
        a["tokens"] = meta.tokens
        a["seq_len"] = meta.seq_len
        a["batch_size"] = meta.batch_size
        a["dtype"] = meta.dtype
        a["device"] = meta.device
        a["types"] = json.dumps(list(stats.types))
        a["moeprof_version"] = __version__
        a["created_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        a["wall_s"] = float(meta.wall_s)
        for k, v in meta.extra.items():
            a[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)

        _put(f, "p_grid", np.array(stats.p_grid, dtype=np.float64),
             "top-p values profiled: keep the fewest largest-|v| entries holding this fraction of the L1 mass",
             "fraction of L1 mass")
        edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
        _put(f, "hist_edges", edges, "bin edges of the per-vector sparsity histograms (last bin includes 1)",
             "fraction of entries dropped")
        sites = f.create_group("sites")
        _put(sites, "intermediate_size", np.array(intermediate_sizes, dtype=np.int64),
             "FFN width (per expert for MoE layers) of each layer", "entries")
        _put(sites, "kind", np.array(site_kinds, dtype="S5"), "FFN kind of each layer: moe or dense", "")

        r = f.create_group("routing")
        _put(r, "tokens", stats.routing.tokens.numpy(), "tokens routed to each expert (one per (token, expert) "
             "assignment; a dense layer's single expert gets every token) [layer, expert]", "tokens")
        _put(r, "weight_sum", stats.routing.weight_sum.numpy(),
             "sum of the routing weights given to each expert [layer, expert]", "routing weight")
        _put(r, "layer_tokens", stats.routing.layer_tokens.numpy(), "tokens entering each layer [layer]", "tokens")

        for t in stats.types:
            s = stats.activations[t]
            name = f"{t} ({TYPE_NAMES[t]})"
            g = f.create_group(f"sparsity/{t}")
            _put(g, "mean", s.mean_sparsity().numpy(), f"token-averaged top-p sparsity of {name} at each p "
                 "[layer, expert, p]; NaN where the expert saw no tokens", "fraction of entries dropped")
            _put(g, "std", s.std_sparsity().numpy(), f"per-vector standard deviation of the top-p sparsity of "
                 f"{name} [layer, expert, p]", "fraction of entries dropped")
            _put(g, "hist", s.hist.numpy(), f"histogram of per-vector top-p sparsity of {name} over hist_edges "
                 "[layer, expert, p, bin]", "vectors")
            _put(g, "vectors", s.vectors.numpy(), f"{name} vectors seen [layer, expert]", "vectors")
            _put(g, "width", s.width.numpy(), f"entries per {name} vector [layer]", "entries")
            m = f.create_group(f"magnitude/{t}")
            seen = s.vectors.numpy()
            n = np.where(seen > 0, seen, np.nan)  # experts never routed a token: NaN, as in sparsity/mean
            _put(m, "l1_mean", s.l1_sum.numpy() / n, f"mean L1 norm of {name} [layer, expert]", "activation units")
            _put(m, "l2_mean", s.l2_sum.numpy() / n, f"mean L2 norm of {name} [layer, expert]", "activation units")
            _put(m, "max_abs_mean", s.max_abs_sum.numpy() / n, f"mean of the per-vector max |entry| of {name} "
                 "[layer, expert]", "activation units")
            _put(m, "max_abs", s.max_abs.numpy(), f"largest |entry| of {name} seen [layer, expert]",
                 "activation units")
            _put(m, "peak_ratio_mean", s.peak_ratio_sum.numpy() / n, f"mean of max|v| / rms(v) of {name}: how "
                 "outlier-dominated vectors are [layer, expert]", "ratio")

        _write_outliers(f, stats, site_kinds)

        if trace is not None and trace.recorded:
            n = trace.recorded
            tr = f.create_group("trace")
            tr.attrs["doc"] = "per-token detail of the first tokens profiled (bounded by --trace-tokens)"
            _put(tr, "token_id", trace.token_id[:n].numpy(), "token id [token]", "")
            _put(tr, "sequence", trace.sequence[:n].numpy(), "packed sequence index [token]", "")
            _put(tr, "position", trace.position[:n].numpy(), "position within its sequence [token]", "")
            if token_texts is not None:
                _put(tr, "token_text", np.array(token_texts[:n], dtype=h5py.string_dtype()),
                     "decoded token text [token]", "")
            _put(tr, "expert", trace.expert[:n].numpy(), "expert chosen in each routed slot [token, layer, slot]", "")
            _put(tr, "weight", trace.weight[:n].numpy(), "routing weight of each slot [token, layer, slot]",
                 "routing weight")
            for t, arr in trace.sparsity.items():
                _put(tr, f"sparsity_{t}", arr[:n].numpy(), f"top-p sparsity of {t} ({TYPE_NAMES[t]}) at each p "
                     "[token, layer, slot, p]", "fraction of entries dropped")
    return path


def _write_outliers(f: h5py.File, stats: "ProfileStats", site_kinds: list[str]) -> None:
    """Per-layer routing balance and robust z-scores of per-expert sparsity, under /outliers."""
    from moeprof.outliers import OUTLIER_Z, robust_z, routing_balance

    tokens = stats.routing.tokens.numpy()
    slots = np.ones(tokens.shape, dtype=bool)
    for layer, kind in enumerate(site_kinds):
        if kind == "dense":
            slots[layer, 1:] = False  # a dense layer's one FFN is expert 0; the other slots are padding
    g = f.create_group("outliers")
    g.attrs["doc"] = f"robust z-score (median/MAD within a layer; |z| > {OUTLIER_Z} flagged) and routing balance"
    bal = routing_balance(tokens, slots)
    _put(g, "load_share", bal["load_share"], "fraction of the layer's (token, expert) assignments per expert "
         "[layer, expert]", "fraction")
    _put(g, "entropy_norm", bal["entropy_norm"], "routing entropy over the layer's experts / log E [layer] "
         "(1 = perfectly balanced)", "1")
    _put(g, "max_mean_load", bal["max_mean_load"], "busiest expert's tokens / mean tokens per expert [layer]", "ratio")
    _put(g, "dead", bal["dead"], "experts routed no token [layer, expert]", "bool")
    live = slots & (tokens > 0)
    for t in stats.types:
        mean = stats.activations[t].mean_sparsity().numpy()  # [L, E, P]
        z = np.stack([robust_z(mean[..., j], live) for j in range(mean.shape[-1])], axis=-1)
        _put(g, f"{t}/sparsity_z", z, f"robust z-score of each expert's mean top-p sparsity of {t} within its layer "
             "[layer, expert, p]", "z")
        _put(g, f"{t}/flagged", np.abs(np.nan_to_num(z)) > OUTLIER_Z, f"|sparsity_z| > {OUTLIER_Z} [layer, expert, p]",
             "bool")


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
        fmt = self.file.attrs.get("format")
        if fmt != FORMAT or "schema_version" not in self.file.attrs:
            self.file.close()
            raise StoreError(f"{self.path} is an HDF5 file but not a moeprof store; give a file written by "
                             "`moeprof profile`")
        version = int(self.file.attrs["schema_version"])
        if version > SCHEMA_VERSION:
            self.file.close()
            raise StoreError(f"{self.path} has schema version {version}, newer than this moeprof understands "
                             f"({SCHEMA_VERSION}); upgrade moeprof (pip install -U moeprof)")

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self.file.attrs.items()}

    @property
    def model(self) -> str:
        return str(self.file.attrs["model"])

    @property
    def types(self) -> list[str]:
        return json.loads(self.file.attrs["types"])

    @property
    def p_grid(self) -> np.ndarray:
        return self.file["p_grid"][()]

    @property
    def is_moe(self) -> bool:
        return bool(self.file.attrs["is_moe"])

    @property
    def num_layers(self) -> int:
        return int(self.file.attrs["num_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.file.attrs["num_experts"])

    def require_type(self, type: str) -> None:
        if type not in self.types:
            raise StoreError(f"activation type {type!r} was not profiled in {self.path} (it has "
                             f"{', '.join(self.types)}); profile it with --types {type}")

    def mean(self, type: str) -> np.ndarray:
        """Return token-averaged top-p sparsity [L, E, P] of `type`."""
        self.require_type(type)
        return self.file[f"sparsity/{type}/mean"][()]

    def routing_tokens(self) -> np.ndarray:
        """Return tokens routed to each expert [L, E]."""
        return self.file["routing/tokens"][()]

    def p_index(self, p: float) -> int:
        """Return the index of `p` in the p-grid, or raise naming the values that exist."""
        grid = self.p_grid
        hits = np.flatnonzero(np.isclose(grid, p, atol=1e-9))
        if not hits.size:
            raise StoreError(f"p = {p} is not in the profiled p-grid ({', '.join(f'{q:g}' for q in grid)})")
        return int(hits[0])

    def dataset(self, name: str) -> np.ndarray:
        if name not in self.file:
            raise StoreError(f"{self.path} has no dataset {name!r}")
        return self.file[name][()]

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
    """Open a moeprof store read-only (raises StoreError for anything that is not one)."""
    return Store(path)


@contextlib.contextmanager
def update_store(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Yield a writable copy of an existing store; it replaces the original only if the block succeeds."""
    with open_store(path):
        pass  # validate before copying
    path = Path(path)
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            yield f


def put_dataset(group: h5py.Group, name: str, data: Any, doc: str, units: str) -> h5py.Dataset:
    """Create (or replace) a dataset with its `doc` and `units` attributes."""
    if name in group:
        del group[name]
    return _put(group, name, data, doc, units)

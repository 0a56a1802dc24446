"""Writing a profile store: in memory, then onto its name atomically (`moeprof.atomic`); replacing a store keeps
the groups other commands added (KEPT_GROUPS) when they still describe the model."""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import h5py
import numpy as np

from moeprof import __version__
from moeprof.activation_types import HIST_BINS
from moeprof.atomic import check_creatable, check_space, check_writable, write_bytes
from moeprof.outliers import OUTLIER_Z, model_balance, outlier_arrays, routing_balance
from moeprof.store.reader import is_store, open_store
from moeprof.store.records import ProfileMeta, _value
from moeprof.store.schema import (BALANCE_DATASETS, FORMAT, KEPT_GROUPS, SCHEMA_VERSION, StoreError, _slots,
                                  _str_array, _write, canonical_site_kinds, config_fingerprint, label_dims, member_path,
                                  schema_table)

if TYPE_CHECKING:
    from moeprof.stats import ProfileStats


def check_output(path: str | os.PathLike, *, force: bool = False, flag: str = "--out",
                 example: str = "profile.h5") -> Path:
    """Return the file to write for the output store `path`, or raise before any work is done: StoreError for an
    existing file it must not replace, `moeprof.atomic.OutputError` for a folder where no file can be written.

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
    check_writable(path, flag, example)
    if path.exists() and not force:
        if not is_store(path):
            raise StoreError(f"{flag} {path} exists and is not a moeprof store (is it your data?); choose "
                             "another file name, or pass --force to replace it")
        if not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222:  # (root may write anything)
            raise StoreError(f"{flag} {path} is read-only; make it writable, or pass --force to replace it")
    check_creatable(path, flag)
    return path


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


@contextlib.contextmanager
def update_store(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Yield a writable copy of an existing store; it replaces the original only if the block succeeds."""
    with open_store(path):
        pass  # validate before copying
    path = Path(path)
    with _in_memory(path, path.read_bytes()) as f:
        yield f

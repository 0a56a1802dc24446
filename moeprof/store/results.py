"""Results other commands add to a store, each written atomically as its own group: /critical records (one per
search), /stability, /schedules; and the per-expert table exported as CSV or Parquet."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.atomic import check_writable
from moeprof.store.reader import Store, open_store
from moeprof.store.records import Critical, _value
from moeprof.store.schema import (_FIELDS, _RECORD_SKIP, CRITICAL_DOC, STABILITY_DOC, StoreError, _is_record,
                                  _keyed_records, _put, _write, critical_key, label_dims)
from moeprof.store.writer import update_store


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
    its own key first. Raises StoreError when the store did not profile the record's type, or when the
    per-expert arrays do not fit the store's [layers, experts] (the store profiles another model).
    """
    with open_store(path) as st:
        shape = (st.num_layers, st.num_experts)
        type = record.attrs.get("type")
        if type:
            st.require_type(type)
    per = record.per_expert_sparsity
    if per is not None and tuple(np.shape(per)) != shape:
        raise StoreError(f"per-expert sparsity has shape {np.shape(per)}, the store {shape}: "
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


def _write_record(g, record: Critical, sequence: int) -> None:
    g.attrs["doc"] = CRITICAL_DOC
    for k, v in record.attrs.items():
        g.attrs[k] = v
    g.attrs["sequence"] = sequence
    for name, arr in record.arrays().items():
        field = _FIELDS[f"critical/{name}"]
        parent, _, leaf = name.rpartition("/")
        _put(g.require_group(parent) if parent else g, leaf, arr, field.doc_for(), field.units)


def check_schedule_name(name: str) -> None:
    """Raise StoreError unless `name` can name a schedule under /schedules (a plain HDF5 name)."""
    if not name or "/" in name or name.startswith("."):
        raise StoreError(f"schedule name {name!r} is not usable; give a plain name such as 'wikipedia-0.99'")


def write_schedule(path: str | os.PathLike, name: str, schedule) -> None:
    """Store `schedule` (a `moeprof.schedule.Schedule`) as /schedules/<name>, atomically, replacing one of that name.

    StoreError when its [layers, experts] differ from the store's (a schedule of another model) or the name is
    not a plain HDF5 name.
    """
    check_schedule_name(name)
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


# The first columns of every export, in order: how `export` recognizes a file it wrote itself (and replaces it).
EXPORT_LEAD = ("row", "layer", "kind", "type", "expert", "p")
# Per-expert results of the type's latest /critical record (NaN without one): the sparsity each expert realizes at
# the model's critical p, and its own tolerance (sparsity and p of the sparsest tolerance-grid point in budget).
CRITICAL_COLUMNS = {"critical_sparsity": "per_expert_sparsity", "tolerance_sparsity": "tolerance_sparsity",
                    "tolerance_p": "tolerance_p"}


def export_columns(store: Store, *, types: list[str], p: float | None = 0.9) -> dict[str, list]:
    """Return the export table as columns: `store.expert_table(t, p)` of every type in `types`, one after the
    other, with a `type` column, and `CRITICAL_COLUMNS` from each type's latest /critical record."""
    out: dict[str, list] = {}
    for t in types:
        cols = store.expert_table(t, p)
        n = len(cols["row"])
        table = {"row": cols["row"], "layer": cols["layer"], "kind": cols["kind"], "type": [t] * n,
                 **{k: v for k, v in cols.items() if k not in ("row", "layer", "kind")}}
        record = store.critical(type=t)
        for name, field in CRITICAL_COLUMNS.items():
            arr = None if record is None else getattr(record, field)
            table[name] = ([float("nan")] * n if arr is None else
                           [float(arr[r, e]) for r, e in zip(cols["row"], cols["expert"])])
        for k, v in table.items():
            out.setdefault(k, []).extend(v)
    return out


def is_export(path: str | os.PathLike) -> bool:
    """Return whether `path` is a table `export_table` wrote (its first columns are `EXPORT_LEAD`)."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head == b"PAR1":
            import pyarrow.parquet as pq

            names = tuple(pq.read_schema(path).names)
        else:
            with open(path, encoding="utf-8") as fh:
                names = tuple(fh.readline().strip().split(","))
    except (OSError, UnicodeDecodeError, ImportError, ValueError):
        return False
    return names[:len(EXPORT_LEAD)] == EXPORT_LEAD


def export_table(store: Store, path: str | os.PathLike, *, type: str | list[str] = "i", p: float | None = 0.9,
                 format: str = "csv") -> Path:
    """Write `export_columns` of `type` (one type, a list, or "all": every profiled type) at `p` (None: every grid
    p) to `path` as CSV (no pandas needed) or Parquet (pandas + pyarrow), atomically; return the path."""
    from moeprof.atomic import write_bytes, write_text

    types = store.types if type == "all" else [type] if isinstance(type, str) else list(type)
    cols = export_columns(store, types=types, p=p)
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

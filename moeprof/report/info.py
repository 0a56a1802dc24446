"""What a store holds: its root attributes (model, data, p-grid, types …) and its dataset layout, as rich tables."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from moeprof.activation_types import TYPE_NAMES
from moeprof.report.critical_tables import critical_headline
from moeprof.store import Store

# root attributes shown first, in this order; any others follow alphabetically
_ATTR_ORDER = ("model", "model_type", "architecture", "is_moe", "num_layers", "num_experts", "top_k",
               "hidden_size", "tokens", "data_sources", "seq_len", "batch_size", "types", "dtype", "device",
               "format", "schema_version", "moeprof_version", "created_utc", "wall_s", "model_config")
_MAX_VALUE_CHARS = 400


def _show(key: str, value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if key in ("types", "data_sources"):  # arrays of strings (JSON text in older stores)
        try:
            items = [str(v.decode() if isinstance(v, bytes) else v) for v in
                     (value if isinstance(value, list) else json.loads(value))]
        except (TypeError, ValueError):
            items = None
        if items is not None:
            return (", ".join(f"{t} ({TYPE_NAMES.get(t, '?')})" for t in items) if key == "types"
                    else "\n".join(items))
    if key == "tokens" and isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if key == "wall_s" and isinstance(value, (float, int)):
        return f"{value:.1f} s"
    text = str(value)
    if key == "model_config":
        try:
            text = json.dumps(json.loads(text), separators=(", ", ": "))
        except (TypeError, ValueError):
            pass
    return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS] + " …"


def attrs_table(store: Store) -> Table:
    """Return a two-column table of the store's root attributes, plus its p-grid and histogram bins."""
    attrs = store.attrs
    table = Table(title=escape(str(store.path)), title_justify="left", show_header=True)
    table.add_column("attribute", style="bold")
    table.add_column("value", overflow="fold")
    keys = [k for k in _ATTR_ORDER if k in attrs] + sorted(k for k in attrs if k not in _ATTR_ORDER)
    for k in keys:
        table.add_row(k, Text(_show(k, attrs[k])))
    grid = store.p_grid
    table.add_row("p_grid", f"{len(grid)} values: " + ", ".join(f"{p:g}" for p in grid))
    table.add_row("histogram", f"{len(store.hist_edges) - 1} bins over sparsity [0, 1]")
    return table


def critical_table(store: Store) -> Table | None:
    """Return a table of the `/critical` group's attributes and datasets, or None if the store has none."""
    record = store.critical()
    if record is None:
        return None
    headline = critical_headline(record)
    table = Table(title="critical sparsity (/critical)", title_justify="left",
                  caption=Text(headline) if headline else None,
                  caption_justify="left")
    table.add_column("attribute", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in {**record.attrs, **record.arrays()}.items():
        if isinstance(v, np.ndarray) and v.ndim >= 2:
            finite = v[np.isfinite(v)]
            summary = (f"[{', '.join(map(str, v.shape))}] mean {finite.mean():.3f}, min {finite.min():.3f}, "
                       f"max {finite.max():.3f}" if finite.size else f"[{', '.join(map(str, v.shape))}] all NaN")
            table.add_row(k, summary)
        else:
            table.add_row(k, Text(_show(k, v)))
    return table


def layout_table(store: Store) -> Table:
    """Return a table of every dataset: name, shape, dtype, units and doc (`Store.layout()`)."""
    table = Table(title="datasets", title_justify="left")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("shape", justify="right", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    table.add_column("units")
    table.add_column("doc", overflow="fold")
    for name, shape, dtype, doc, units in store.layout():
        table.add_row("/" + name, Text("[" + ", ".join(str(n) for n in shape) + "]"), dtype, Text(units), Text(doc))
    return table


def info_renderables(store: Store) -> list:
    """Return rich renderables describing the store: root attributes, /critical (if any), dataset layout."""
    out = [attrs_table(store)]
    crit = critical_table(store)
    if crit is not None:
        out.append(crit)
    out.extend(schedule_verdicts(store))
    out.append(layout_table(store))
    return out


def schedule_verdicts(store: Store) -> list[str]:
    """Return one block of text per stored schedule that keeps a verdict (`moeprof.optimize.verdict`)."""
    from moeprof.optimize.verdict import verdict_lines

    out = []
    for name in store.schedule_names():
        lines = verdict_lines(store.schedule(name).provenance)
        if lines:
            out.append("\n".join([f"schedule {name}: verdict"] + ["  " + escape(line) for line in lines]))
    return out

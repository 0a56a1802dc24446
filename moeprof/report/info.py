"""What a store holds: a short summary (`moeprof info`), and with --verbose its root attributes (model, data,
p-grid, types …), /critical and every dataset's documentation, as rich tables."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from moeprof.activation_types import TYPE_NAMES
from moeprof.errors import MoeprofError
from moeprof.report.critical_tables import critical_headline
from moeprof.schedule.data import stored_verdict_lines
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


SUMMARY_P = 0.9


def headline_sparsity(store: Store, type: str, p: float = SUMMARY_P) -> tuple[float, float]:
    """Return (p used, the model's top-p sparsity of `type` at it): the mean over experts of each expert's mean
    sparsity, weighted by the vectors it saw (= the mean over every vector the profile saw), at the grid p nearest
    `p`; NaN when no expert saw a vector."""
    grid = store.p_grid
    j = int(np.argmin(np.abs(grid - p)))
    sp = store.sparsity(type)
    mean, w = sp.mean[..., j].astype(np.float64), sp.vectors.astype(np.float64)
    ok = np.isfinite(mean) & (w > 0)
    return float(grid[j]), (float((mean[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else float("nan"))


def _size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""


def summary_rows(store: Store) -> list[tuple[str, str]]:
    """Return the (what, value) rows `moeprof info` prints first: model, shape, tokens, data, types, p-grid,
    sparsity per type at p 0.9, each /critical record's p* and sparsity, each schedule held with its verdict, the
    file size."""
    a = store.attrs
    shape = f"{store.num_layers} layers × {store.num_experts} experts" if store.is_moe else \
        f"{store.num_layers} layers (dense)"
    if store.is_moe and "top_k" in a:
        shape += f", top-{a['top_k']}"
    rows = [("model", f"{store.model} ({a.get('architecture', '?')})"), ("shape", shape)]
    if "tokens" in a:
        rows.append(("tokens", f"{int(a['tokens']):,}"))
    rows.append(("data", ", ".join(store.data_sources) or "?"))
    rows.append(("types", ", ".join(f"{t} ({TYPE_NAMES.get(t, '?')})" for t in store.types)))
    grid = store.p_grid
    rows.append(("p-grid", f"{len(grid)} values, {grid.min():g} … {grid.max():g}"))
    for t in store.types:
        q, s = headline_sparsity(store, t)
        rows.append((f"sparsity of {t} at p {q:g}", f"{s:.3f} (mean over every profiled vector)"))
    for record in store.criticals():
        ra = record.attrs
        try:
            what = (f"p* {float(ra['critical_p']):.4f} → sparsity {float(ra['critical_sparsity_token']):.3f} token / "
                    f"{float(ra['critical_sparsity_flop']):.3f} FLOP")
        except (KeyError, TypeError, ValueError):
            what = critical_headline(record) or "?"
        rows.append((f"critical {ra.get('type', '?')} on {ra.get('task', '?')}", what))
    names = store.schedule_names()
    if not names:
        rows.append(("schedules", "none"))
    for name, lines in schedule_verdict_lines(store).items():
        rows.append((f"schedule {name}", "\n".join(lines) if lines else "held (no verdict kept)"))
    rows.append(("file size", _size(os.path.getsize(store.path))))
    return rows


def summary_table(store: Store) -> Table:
    """Return `summary_rows` as a two-column table titled with the store's path."""
    table = Table(title=escape(str(store.path)), title_justify="left", show_header=False, box=None,
                  caption="moeprof info --verbose (or --schema): every attribute and each dataset's documentation",
                  caption_justify="left")
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for k, v in summary_rows(store):
        table.add_row(escape(k), Text(v))
    return table


def info_renderables(store: Store, *, verbose: bool = False) -> list:
    """Return rich renderables describing the store: the summary; verbose: root attributes, /critical (if any),
    dataset layout with each dataset's documentation instead."""
    if not verbose:
        return [summary_table(store)]
    out = [attrs_table(store)]
    crit = critical_table(store)
    if crit is not None:
        out.append(crit)
    out.extend(schedule_verdicts(store))
    out.append(layout_table(store))
    return out


def schedule_verdict_lines(store: Store) -> dict[str, list[str]]:
    """Return {name: the lines of its stored verdict} for every schedule held ([] where none is kept; one line
    saying why for a schedule that cannot be read, so that a summary never fails on one damaged record)."""
    out = {}
    for name in store.schedule_names():
        try:
            out[name] = stored_verdict_lines(store.schedule(name).provenance)
        except (MoeprofError, ValueError, KeyError, OSError) as exc:  # a damaged record: JSON, a missing attribute
            out[name] = [f"unreadable: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"]
    return out


def schedule_verdicts(store: Store) -> list[str]:
    """Return one block of text per stored schedule that keeps a verdict (`schedule_verdict_lines`)."""
    return ["\n".join([f"schedule {name}: verdict"] + ["  " + escape(line) for line in lines])
            for name, lines in schedule_verdict_lines(store).items() if lines]

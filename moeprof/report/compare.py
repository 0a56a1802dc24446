"""`moeprof compare`: the scaling study across stores — parameters, sparsity at p, critical sparsity; figures.

Pure functions of stores (no model is loaded). Per store: its parameters (total / active per token, recorded at
profile time), the token-weighted top-p sparsity of each type at p (`plots.sparsity_curve`, the mean over every
vector of the model) and, where the store has /critical, its critical sparsity (token-weighted and FLOP-weighted)
for the type it was searched on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.markup import escape
from rich.table import Table

from moeprof.activation_types import ACTIVATION_TYPES, TYPE_NAMES
from moeprof.report.plots import DPI, _labels, _out_dir, _save, plot_curves, sparsity_curve
from moeprof.store import Store, StoreError, open_store


def compare_rows(stores: Sequence[Store], p: float = 0.9) -> list[dict]:
    """Return one dict per store: model, params_total, params_active (None: not recorded), sparsity {type: S at
    p}, critical {type, sparsity_token, sparsity_flop, critical_p, task} of the latest search or None, and
    criticals {type: the same, of the latest search of that type} (a store may hold searches of several types)."""
    rows = []
    for st in stores:
        params = st.parameters() or {}
        pi = st.p_index(p)
        sparsity = {t: float(sparsity_curve(st, t)[1][pi]) for t in st.types}
        criticals = {t: _critical(st.critical(type=t)) for t in st.types}
        rows.append(dict(model=st.model, params_total=params.get("total"), params_active=params.get("active"),
                         sparsity=sparsity, critical=_critical(st.critical()),
                         criticals={t: c for t, c in criticals.items() if c is not None}))
    return rows


def _critical(crit) -> dict | None:
    if crit is None or "critical_sparsity_token" not in crit.attrs:
        return None
    a = crit.attrs
    c = {k: a.get(k) for k in ("type", "critical_p", "task")}
    c.update(sparsity_token=float(a["critical_sparsity_token"]),
             sparsity_flop=float(a.get("critical_sparsity_flop", np.nan)))
    return c


def _params(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def compare_table(stores: Sequence[Store], p: float = 0.9) -> Table:
    """Return a rich table of `compare_rows`: one row per model, smallest active size first."""
    rows = sorted(compare_rows(stores, p), key=lambda r: (r["params_active"] or 0))
    types = [t for t in ACTIVATION_TYPES if any(t in r["sparsity"] for r in rows)]
    table = Table(title=f"models compared: top-p sparsity at p = {p:g} (token-weighted) and critical sparsity")
    for h in ["model", "params", "active"] + [f"S_{t}" for t in types] + ["critical S (tok / flop)"]:
        table.add_column(h, justify="left" if h == "model" else "right", no_wrap=True)
    for r in rows:
        c = r["critical"]
        crit = "—" if c is None else (f"{c['type']}: {c['sparsity_token']:.3f} / {c['sparsity_flop']:.3f} "
                                      f"(p={float(c['critical_p']):.3g}, {c['task']})")
        table.add_row(escape(r["model"]), _params(r["params_total"]), _params(r["params_active"]),
                      *(f"{r['sparsity'][t]:.3f}" if t in r["sparsity"] else "—" for t in types), escape(crit))
    table.caption = ("S_t = fraction of entries top-p drops, mean over every vector of the model; active = "
                     "parameters one token uses (all but the unchosen experts); critical S: largest realized "
                     "sparsity keeping ≥ target × dense score, token- / FLOP-weighted (where /critical exists)")
    return table


def scaling_series(rows: list[dict], names: Sequence[str]) -> dict[str, list[dict]]:
    """Return what `compare-scaling.png` draws: {"sparsity": [...], "critical": [...]}, one series per line, each
    {"label", "type", "task", "x" (active parameters), "y", "names" (the model of each point)}, points in x order.

    Sparsity at p: one series per type. Critical sparsity: one series per (type, task), so that a line joins only
    searches of the same type on the same task (ppl:domains and ppl:wikipedia are different scores)."""
    out: dict[str, list[dict]] = {"sparsity": [], "critical": []}
    for t in ACTIVATION_TYPES:
        pts = sorted((r["params_active"], r["sparsity"][t], n) for r, n in zip(rows, names)
                     if r["params_active"] and t in r["sparsity"])
        if pts:
            x, y, who = map(list, zip(*pts))
            out["sparsity"].append(dict(label=f"{t} ({TYPE_NAMES[t]})", type=t, task=None, x=x, y=y, names=who))
        tasks = sorted({str(r["criticals"][t]["task"]) for r in rows if r["params_active"] and t in r["criticals"]})
        for task in tasks:
            pts = sorted((r["params_active"], r["criticals"][t]["sparsity_token"], n) for r, n in zip(rows, names)
                         if r["params_active"] and t in r["criticals"] and str(r["criticals"][t]["task"]) == task)
            x, y, who = map(list, zip(*pts))
            out["critical"].append(dict(label=f"{t} ({TYPE_NAMES[t]}) on {task}", type=t, task=task, x=x, y=y,
                                        names=who))
    return out


def _axis_fraction(ax, x: float) -> float:
    """Where `x` lies across a log x axis, 0 (left edge) to 1 (right edge)."""
    lo, hi = ax.get_xlim()
    return float(np.log(x / lo) / np.log(hi / lo))


def spaced_ticks(fractions: Sequence[float], min_gap: float = 0.12) -> list[int]:
    """Return the indices of the (sorted) tick positions to label: the first, then each one at least `min_gap` of
    the axis width after the last labelled one (two models of nearly the same size would print over each other)."""
    kept: list[int] = []
    for i, f in enumerate(fractions):
        if not kept or f - fractions[kept[-1]] >= min_gap:
            kept.append(i)
    return kept


def _annotate_inside(ax, x: float, y: float, text: str, stack: int = 0) -> None:
    """Label a point so the text stays inside the panel: to the left of the point when it is in the right half;
    `stack` > 0 moves it up by that many text lines (points of nearly the same x)."""
    right_half = _axis_fraction(ax, x) > 0.5
    ax.annotate(text, (x, y), fontsize=7, textcoords="offset points",
                xytext=(-4 if right_half else 4, 4 + 10 * stack), ha="right" if right_half else "left",
                annotation_clip=True)


def scaling_figure(stores: Sequence[Store], p: float = 0.9, labels: Sequence[str] | None = None) -> Figure:
    """Return the `compare-scaling.png` figure: per type, sparsity at p (left) and critical sparsity per (type,
    task) (right, where present) against active parameters (log scale), every point labelled with its model."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    rows = compare_rows(stores, p)
    series = scaling_series(rows, _labels(stores, labels))
    fig = Figure(figsize=(11.0, 4.4), dpi=DPI)
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    markers = "so^Dv<>"
    tasks = sorted({s["task"] for s in series["critical"]})
    for ax, key in ((left, "sparsity"), (right, "critical")):
        for s in series[key]:
            marker = "o" if key == "sparsity" else markers[tasks.index(s["task"]) % len(markers)]
            ax.plot(s["x"], s["y"], marker=marker, label=s["label"])
        xs = sorted({x for s in series[key] for x in s["x"]})
        if xs:
            ax.set_xscale("log")
            lo, hi = xs[0] / 1.6, xs[-1] * 1.6  # room for the labels at both ends
            ax.set_xlim(lo, hi)
            # one labelled tick per model size (the log axis's own minor labels overlap within a decade)
            ticks = [xs[i] for i in spaced_ticks([_axis_fraction(ax, x) for x in xs])]
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(ticks, [_params(int(x)) for x in ticks], fontsize=7)
            top = {}  # one label per model, above its highest point in this panel
            for s in series[key]:
                for x, y, name in zip(s["x"], s["y"], s["names"]):
                    top[(x, name)] = max(top.get((x, name), -np.inf), y)
            ymax = max(top.values())
            placed: list[float] = []
            for (x, name), y in sorted(top.items()):
                f = _axis_fraction(ax, x)
                stack = sum(1 for g in placed if abs(f - g) < 0.3)  # near another label: one line higher
                placed.append(f)
                _annotate_inside(ax, x, ymax if stack else y, name, stack)
            ax.set_ylim(top=ax.get_ylim()[1] + 0.06 * (1 + len(placed)) * (ax.get_ylim()[1] - ax.get_ylim()[0]))
    for ax, title in ((left, f"top-p sparsity at p = {p:g}"),
                      (right, "critical sparsity (token-weighted), one line per type and task")):
        ax.set_xlabel("active parameters per token")
        ax.set_ylabel("fraction of entries dropped")
        ax.set_title(title, fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no store has /critical\n(run `moeprof critical`)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
    fig.tight_layout()
    return fig


def plot_scaling(stores: Sequence[Store], out_dir: str | os.PathLike, p: float = 0.9,
                 labels: Sequence[str] | None = None) -> Path:
    """Write `compare-scaling.png` (`scaling_figure`) and return its path."""
    return _save(scaling_figure(stores, p, labels), _out_dir(out_dir) / "compare-scaling.png")


def compare(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, p: float = 0.9) -> tuple[Table, list[Path]]:
    """Open the stores, return (the comparison table, [overlaid p-curves PNG, scaling PNG])."""
    if len(paths) < 2:
        raise StoreError("compare needs at least two stores: moeprof compare A.h5 B.h5 ... [-o DIR]")
    stores = [open_store(x) for x in paths]
    try:
        table = compare_table(stores, p)
        pngs = list(plot_curves(stores, out_dir)) + [plot_scaling(stores, out_dir, p)]
        return table, pngs
    finally:
        for st in stores:
            st.close()

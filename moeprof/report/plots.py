"""Figures of profile stores: sparsity-vs-p curves (several stores overlaid) and layer × expert heatmaps.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly, so nothing here touches pyplot's
global state or needs a display, and every PNG is written under a temporary name and renamed into place.
Sizes are fixed (`DPI`, `curves_figsize`, `heatmap_figsize`), so a PNG's pixel size is predictable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import matplotlib

from moeprof.report.leaderboard import expert_slots, live_dead
from moeprof.activations import ACTIVATION_TYPES, TYPE_NAMES
from moeprof.store import Store, StoreError, atomic_path, open_store

DPI = 100
BAND = (10, 90)  # percentiles of expert sparsity drawn as the shaded band around each curve
DEAD_COLOR = "#b0b0b0"


def curves_figsize(num_types: int) -> tuple[float, float]:
    """Return the figure size (inches) of a curves figure with `num_types` panels."""
    return (max(4.5 * num_types, 6.0), 4.0)


def heatmap_figsize(num_layers: int, num_experts: int) -> tuple[float, float]:
    """Return the figure size (inches) of a layer × expert heatmap."""
    width = min(max(3.0 + 0.12 * num_experts, 5.0), 16.0)
    height = min(max(1.5 + 0.2 * num_layers, 3.5), 12.0)
    return (width, height)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create output folder {out}: {e.strerror}; choose another output folder") from None
    return out


def _labels(stores: Sequence[Store], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(stores):
            raise ValueError(f"got {len(labels)} labels for {len(stores)} stores; give one label per store")
        return [str(x) for x in labels]
    names = [s.model for s in stores]
    # the same model twice (e.g. two corpora): tell them apart by file name
    return [f"{n} ({s.path.stem})" if names.count(n) > 1 else n for n, s in zip(names, stores)]


def sparsity_curve(store: Store, type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (p_grid [P], token-weighted sparsity [P], band low [P], band high [P]) of one activation type.

    The curve averages every expert's mean sparsity weighted by the vectors it saw (= the mean over all
    vectors of the model); the band spans the 10th–90th percentile of the live experts' mean sparsity.
    """
    store.require_type(type)
    grid = store.p_grid
    sp = store.sparsity(type)
    mean = sp.mean  # [L, E, P]
    vectors = sp.vectors.astype(np.float64)  # [L, E]
    live, _ = live_dead(store)
    ok = live & (vectors > 0) & np.isfinite(mean).all(-1)  # [L, E]
    if not ok.any():
        nan = np.full(grid.shape, np.nan)
        return grid, nan, nan, nan
    m = mean[ok]  # [N, P]
    w = vectors[ok]  # [N]
    curve = (m * w[:, None]).sum(0) / w.sum()
    lo, hi = np.percentile(m, BAND, axis=0)
    return grid, curve, lo, hi


def _open_all(stores) -> tuple[list[Store], list[Store]]:
    opened, owned = [], []
    for s in stores:
        if isinstance(s, Store):
            opened.append(s)
        else:
            st = open_store(s)
            opened.append(st)
            owned.append(st)
    return opened, owned


def _curves_name(stores: Sequence[Store]) -> str:
    stems = [s.path.stem for s in stores]
    if len(stems) == 1:
        return f"{stems[0]}_curves.png"
    name = "curves_" + "_vs_".join(stems) + ".png"
    return name if len(name) <= 120 else f"curves_{len(stems)}_stores.png"


def plot_curves(stores: Sequence[Store | str | os.PathLike], out_dir: str | os.PathLike, *,
                labels: Sequence[str] | None = None) -> list[Path]:
    """Write one PNG of sparsity-vs-p curves (one panel per activation type, stores overlaid); return its path.

    Each store draws its token-weighted curve with a shaded band for the spread across experts (10th–90th
    percentile). Panels cover every type any store profiled; a store lacking a type is absent from that panel.
    """
    if isinstance(stores, (Store, str, os.PathLike)):
        stores = [stores]
    if not stores:
        raise ValueError("plot_curves needs at least one store")
    opened, owned = _open_all(stores)
    try:
        out = _out_dir(out_dir)
        names = _labels(opened, labels)
        types = [t for t in ACTIVATION_TYPES if any(t in s.types for s in opened)]
        fig = Figure(figsize=curves_figsize(len(types)), dpi=DPI, layout="constrained")
        axes = fig.subplots(1, len(types), squeeze=False)[0]
        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, t in zip(axes, types):
            for k, (s, label) in enumerate(zip(opened, names)):
                if t not in s.types:
                    continue
                grid, curve, lo, hi = sparsity_curve(s, t)
                c = colors[k % len(colors)]
                ax.plot(grid, curve, marker="o", markersize=3, color=c, label=label)
                ax.fill_between(grid, lo, hi, color=c, alpha=0.2, linewidth=0)
            ax.set_title(f"{TYPE_NAMES[t]} ({t})")
            ax.set_xlabel("p (fraction of L1 mass kept)")
            ax.set_ylabel("sparsity (fraction of entries dropped)")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="small", loc="lower left")
        title = " vs ".join(names) if len(names) <= 3 else f"{len(names)} models"
        fig.suptitle(f"Top-p sparsity vs p — {title}\n(token-weighted; band: {BAND[0]}–{BAND[1]}th percentile "
                     "of experts)", fontsize="medium")
        return [_save(fig, out / _curves_name(opened))]
    finally:
        for s in owned:
            s.close()


def plot_heatmap(store: Store | str | os.PathLike, out_dir: str | os.PathLike, *, type: str = "i",
                 p: float = 0.9, name: str | None = None) -> Path:
    """Write a layer × expert heatmap PNG of top-p sparsity at one p (dead experts grey); return its path.

    The file is `<store stem>_heatmap_<type>_p<p>.png` in `out_dir` unless `name` is given.
    """
    opened, owned = _open_all([store])
    s = opened[0]
    try:
        s.require_type(type)
        pi = s.p_index(p)
        out = _out_dir(out_dir)
        sparsity = s.mean(type)[:, :, pi]  # [L, E]
        live, dead = live_dead(s)
        slots = expert_slots(s)
        L, E = sparsity.shape
        fig = Figure(figsize=heatmap_figsize(L, E), dpi=DPI, layout="constrained")
        ax = fig.subplots()
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad=DEAD_COLOR)
        data = np.ma.masked_where(~(live & np.isfinite(sparsity)), sparsity)
        # colour range = the live experts' range, so differences between experts stay visible (the colour bar
        # carries the values; comparing models is the curves' job)
        shown = sparsity[live & np.isfinite(sparsity)]
        lo, hi = (float(shown.min()), float(shown.max())) if shown.size else (0.0, 1.0)
        if hi - lo < 1e-3:
            lo, hi = max(lo - 0.05, 0.0), min(hi + 0.05, 1.0)
        im = ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest", origin="lower")
        if (~slots).any():  # padding slots of dense layers in an MoE model: white, not dead
            ax.imshow(np.ma.masked_where(slots, np.ones_like(sparsity)), cmap=ListedColormap(["white"]),
                      aspect="auto", interpolation="nearest", origin="lower")
        fig.colorbar(im, ax=ax, label=f"sparsity at p = {p:g} (fraction dropped)")
        ax.set_xlabel("expert" if E > 1 else "(dense FFN)")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if E == 1:
            ax.set_xticks([])
        n_dead = int(dead.sum())
        note = f"; grey: {n_dead} dead expert{'s' if n_dead != 1 else ''} (0 tokens)" if n_dead else ""
        if (~slots).any():
            note += "; white: dense layer"
        ax.set_title(f"{s.model}\ntop-p sparsity of {TYPE_NAMES.get(type, type)} ({type}) at p = {p:g}{note}",
                     fontsize="small")
        return _save(fig, out / (name or f"{s.path.stem}_heatmap_{type}_p{p:g}.png"))
    finally:
        for st in owned:
            st.close()


def _default_type(store: Store, type: str | None) -> str:
    if type is not None:
        return type
    return "i" if "i" in store.types else store.types[0]


def _default_p(store: Store, p: float | None) -> float:
    if p is not None:
        return p
    grid = store.p_grid
    return float(grid[np.argmin(np.abs(grid - 0.9))])


def plot_all(paths: Sequence[str | os.PathLike | Store], out_dir: str | os.PathLike, *,
             labels: Sequence[str] | None = None, type: str | None = None, p: float | None = None) -> list[Path]:
    """Write the overlaid curves of all stores plus one heatmap per store; return the PNG paths.

    Heatmaps use `type` (default: "i" where profiled, else the store's first type) and `p` (default: the grid
    value nearest 0.9).
    """
    if isinstance(paths, (Store, str, os.PathLike)):
        paths = [paths]
    opened, owned = _open_all(paths)
    try:
        written = plot_curves(opened, out_dir, labels=labels)
        seen: set[str] = set()
        for k, s in enumerate(opened):
            t, q = _default_type(s, type), _default_p(s, p)
            name = f"{s.path.stem}_heatmap_{t}_p{q:g}.png"
            if name in seen:  # two stores with the same file name in different folders
                name = f"{s.path.stem}_{k}_heatmap_{t}_p{q:g}.png"
            seen.add(name)
            written.append(plot_heatmap(s, out_dir, type=t, p=q, name=name))
        return written
    finally:
        for s in owned:
            s.close()


def plot_stability(store: Store | str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `<store name>.png` into out_dir: same-expert Jaccard of top-p masks against the step gap, one line per layer
    (solid: g steps apart; dashed panel: against the expert's first step); return its path."""
    st = store if isinstance(store, Store) else open_store(store)
    try:
        rec = st.stability()
        if rec is None:
            raise StoreError(f"{st.path} has no /stability; run `moeprof stability MODEL --prompts FILE --out "
                             f"{st.path}` first")
        attrs, arrays = rec
        out = _out_dir(out_dir)
        fig = Figure(figsize=(10.0, 4.0), dpi=DPI)
        FigureCanvasAgg(fig)
        gaps = np.arange(1, arrays["gap_jaccard"].shape[1] + 1)
        for k, (name, title) in enumerate((("gap_jaccard", "consecutive masks g steps apart"),
                                            ("drift_gap_jaccard", "drift: g steps after the first"))):
            ax = fig.add_subplot(1, 2, k + 1)
            sites = st.sites()  # rows are sites: a layer may hold several ("3 shared"; DiffusionGemma: L + l)
            for r, row in enumerate(arrays[name]):
                ax.plot(gaps, row, marker="o", ms=3, label=f"layer {sites.label(r)}")
            ax.set_xlabel("step gap g")
            ax.set_ylabel("mean Jaccard of kept-sets")
            ax.set_ylim(0, 1.02)
            ax.set_title(title, fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if st.num_layers <= 12:
            fig.axes[0].legend(fontsize=7)
        fig.suptitle(f"{st.model}: mask stability of {attrs.get('type')} at p = {attrs.get('p'):g} "
                     f"({attrs.get('mode')})", fontsize=10)
        fig.tight_layout()
        return _save(fig, out / f"{st.path.stem}.png")
    finally:
        if st is not store:
            st.close()


def plot_schedule(schedule, out_dir: str | os.PathLike, *, name: str = "schedule") -> Path:
    """Write a layer × expert heatmap PNG of a schedule's p (`moeprof.schedule.Schedule`; dense experts grey) and
    return its path `<out_dir>/<name>_heatmap_p.png`. Reads the schedule only (no model, no store)."""
    out = _out_dir(out_dir)
    table = np.asarray(schedule.p, dtype=np.float64)  # [L, E]
    L, E = table.shape
    fig = Figure(figsize=heatmap_figsize(L, E), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad=DEAD_COLOR)
    finite = table[np.isfinite(table)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-3:
        lo, hi = max(lo - 0.05, 0.0), min(hi + 0.05, 1.0)
    im = ax.imshow(np.ma.masked_invalid(table), cmap=cmap, vmin=lo, vmax=hi, aspect="auto",
                   interpolation="nearest", origin="lower")
    fig.colorbar(im, ax=ax, label=f"scheduled p ({schedule.rule})")
    ax.set_xlabel("expert" if E > 1 else "(dense FFN)")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if E == 1:
        ax.set_xticks([])
    prov = schedule.provenance
    sub = (f"; FLOP-weighted sparsity {prov['sparsity_flop']:.3f}" if prov.get("sparsity_flop") is not None else "")
    ax.set_title(f"{schedule.model}\nschedule of {TYPE_NAMES.get(schedule.type, schedule.type)} ({schedule.type})"
                 f"{sub}; grey: dense", fontsize="small")
    return _save(fig, out / f"{name}_heatmap_p.png")

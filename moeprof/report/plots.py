"""Figures of profile stores: sparsity-vs-p curves (several stores overlaid), layer × expert heatmaps beside a
sparsity-vs-load scatter (dense models: sparsity against layer as lines), and the critical search.

Each figure has a builder that returns the `Figure` (`curves_figure`, `heatmap_figure`, `critical_figure`: tests and
notebooks read their data, e.g. `fig.axes[0].lines`) and a `plot_*` function that writes it as a PNG.

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
from matplotlib.colors import CenteredNorm, ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import matplotlib

from moeprof.errors import InvalidArgument
from moeprof.report.leaderboard import expert_slots, live_dead
from moeprof.activation_types import ACTIVATION_TYPES, TYPE_NAMES
from moeprof.outliers import routing_mutual_information
from moeprof.atomic import atomic_path, check_writable
from moeprof.store import Store, StoreError, open_store

DPI = 100
BAND = (10, 90)  # percentiles of expert sparsity drawn as the shaded band around each curve
DEAD_COLOR = "#b0b0b0"
X_AXES = ("p", "log1mp")  # the curves' x axis: p itself, or 1 − p on a log scale (where most of the grid sits)
SCALES = ("range", "fixed", "centred")  # heatmap colours: the live experts' range, [0, 1], or centred on the median
# Heatmap cell values are printed only where they can be read: a font of at least this many points that fits the
# cell ("0.00": 4 characters ≈ 0.6 em wide each, one line ≈ 1.3 em high); else colour only, read off the colour bar.
CELL_FONT_MIN_PT, CELL_FONT_MAX_PT = 6.0, 9.0
_LOG_TICKS = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)


def display_name(model: str) -> str:
    """Return the model's name for titles and legends: its id, or the last component of a local path (a
    checkpoint folder or a cache path says nothing more)."""
    text = str(model)
    if text.startswith(("/", "~", "./", "../")):
        return Path(text.rstrip("/")).name.removesuffix(".gguf") or text
    return text


def curves_figsize(num_types: int) -> tuple[float, float]:
    """Return the figure size (inches) of a curves figure with `num_types` panels."""
    return (max(4.5 * num_types, 6.0), 4.0)


def heatmap_figsize(num_layers: int, num_experts: int) -> tuple[float, float]:
    """Return the figure size (inches) of a layer × expert heatmap with its sparsity-vs-load panel (an MoE), or of
    the sparsity-vs-layer lines (a dense model: one expert per layer)."""
    if num_experts == 1:
        return (6.5, 4.0)
    # ~0.3 in per expert up to 32 experts: room for a readable value in each cell; beyond, colour only
    width = min(max(3.0 + (0.3 if num_experts <= 32 else 0.12) * num_experts, 5.0), 16.0) + 4.0  # + the scatter
    height = min(max(1.5 + 0.2 * num_layers, 3.5), 12.0)
    return (width, height)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(check_writable(path)) as tmp:
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
            raise InvalidArgument(f"got {len(labels)} labels for {len(stores)} stores; give one label per store")
        return [str(x) for x in labels]
    names = [display_name(s.model) for s in stores]
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


def curves_figure(stores: Sequence[Store], *, labels: Sequence[str] | None = None, x_axis: str = "p") -> Figure:
    """Return the sparsity-vs-p figure of open stores: one panel per activation type, one line per store (its
    token-weighted curve, x = the p-grid or 1 − p) with its 10–90th percentile band; the legend sits below the
    panels (never over the p ≥ 0.95 tails); a store lacking a type is named in that panel, not drawn."""
    if x_axis not in X_AXES:
        raise InvalidArgument(f"x axis {x_axis!r} is not one of {', '.join(X_AXES)}")
    names = _labels(stores, labels)
    types = [t for t in ACTIVATION_TYPES if any(t in s.types for s in stores)]
    fig = Figure(figsize=curves_figsize(len(types)), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(types), squeeze=False)[0]
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = {}
    shown_x = np.concatenate([s.p_grid for s in stores])
    shown_x = shown_x if x_axis == "p" else 1.0 - shown_x[shown_x < 1.0]
    for ax, t in zip(axes, types):
        missing = []
        for k, (s, label) in enumerate(zip(stores, names)):
            if t not in s.types:
                missing.append(label)
                continue
            grid, curve, lo, hi = sparsity_curve(s, t)
            x = grid if x_axis == "p" else 1.0 - grid
            keep = x > 0 if x_axis == "log1mp" else np.ones(x.shape, dtype=bool)  # p = 1 has no log(1 − p)
            c = colors[k % len(colors)]
            (line,) = ax.plot(x[keep], curve[keep], marker="o", markersize=3, color=c, label=label)
            ax.fill_between(x[keep], lo[keep], hi[keep], color=c, alpha=0.2, linewidth=0)
            handles[label] = line
        if missing:  # skipped, and said so (an unlabelled gap would read as a curve hidden behind another)
            ax.text(0.02, 0.02, f"{t} not profiled in: {', '.join(missing)}", transform=ax.transAxes, fontsize=7,
                    color="0.35", ha="left", va="bottom")
        ax.set_title(f"{TYPE_NAMES[t]} ({t})")
        if x_axis == "log1mp":
            ax.set_xscale("log")
            lo_x, hi_x = (float(shown_x.min()), float(shown_x.max())) if shown_x.size else (1e-3, 0.5)
            ticks = [q for q in _LOG_TICKS if lo_x * 0.999 <= 1 - q <= hi_x * 1.001]
            ax.set_xticks([1 - q for q in ticks], [f"{q:g}" for q in ticks])
            ax.minorticks_off()
            ax.set_xlim(hi_x * 1.15, lo_x / 1.15)  # reversed: p grows to the right, as on the linear axis
            ax.set_xlabel("p (log scale of 1 − p)")
        else:
            ax.set_xlabel("p (fraction of L1 mass kept)")
        ax.set_ylabel("sparsity (fraction of entries dropped)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", fontsize="small",
                   ncols=min(len(handles), 4), frameon=False)
    title = " vs ".join(names) if len(names) <= 3 else f"{len(names)} models"
    units = {"layers" if s.num_experts == 1 else "experts" for s in stores}
    fig.suptitle(f"Top-p sparsity vs p — {title}\n(token-weighted; band: {BAND[0]}–{BAND[1]}th percentile of "
                 f"{' / '.join(sorted(units))})", fontsize="medium")
    return fig


def plot_curves(stores: Sequence[Store | str | os.PathLike], out_dir: str | os.PathLike, *,
                labels: Sequence[str] | None = None, x_axis: str = "p") -> list[Path]:
    """Write one PNG of sparsity-vs-p curves (`curves_figure`: one panel per activation type, stores overlaid);
    return its path. `x_axis="log1mp"` puts 1 − p on a log scale."""
    if isinstance(stores, (Store, str, os.PathLike)):
        stores = [stores]
    if not stores:
        raise InvalidArgument("plot_curves needs at least one store")
    opened, owned = _open_all(stores)
    try:
        out = _out_dir(out_dir)
        fig = curves_figure(opened, labels=labels, x_axis=x_axis)
        name = _curves_name(opened)
        if x_axis != "p":
            name = name.replace(".png", f"_{x_axis}.png")
        return [_save(fig, out / name)]
    finally:
        for s in owned:
            s.close()


def _color_norm(values: np.ndarray, scale: str) -> tuple[Normalize, str, str]:
    """Return (norm, colormap name, words for the title) of a heatmap's colour scale over the shown values."""
    if scale not in SCALES:
        raise InvalidArgument(f"colour scale {scale!r} is not one of {', '.join(SCALES)}")
    if scale == "fixed" or not values.size:
        return Normalize(0.0, 1.0), "viridis", "colour scale fixed at 0–1"
    if scale == "centred":
        mid = float(np.median(values))
        half = max(float(np.max(np.abs(values - mid))), 1e-3)
        return CenteredNorm(vcenter=mid, halfrange=half), "RdBu_r", f"colours centred on the median {mid:.3f}"
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-3:
        lo, hi = max(lo - 0.05, 0.0), min(hi + 0.05, 1.0)
    return Normalize(lo, hi), "viridis", f"colour range = the experts' range {lo:.3f}–{hi:.3f} (not 0–1)"


def _label_site_rows(ax, sites, rows: int) -> None:
    """Label the y axis of a [site row, expert] image: plain layer numbers when each layer has one site, else each
    row by its decoder layer and kind ("1", "1 shared", "0 dense": the leaderboard's names)."""
    one_per_layer = sites.layer is None or np.array_equal(np.asarray(sites.layer), np.arange(rows))
    if one_per_layer:
        ax.set_ylabel("layer")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        return
    ax.set_ylabel("layer (site)")
    step = max(1, rows // 40)  # at most ~40 labels
    ticks = list(range(0, rows, step))
    ax.set_yticks(ticks)
    ax.set_yticklabels([sites.label(r) for r in ticks], fontsize=7 if rows > 12 else None)


def cell_font_pt(fig: Figure, ax, rows: int, cols: int) -> float | None:
    """Return the font size (points) at which a heatmap cell's "0.00" fits its cell after the figure's layout, at
    most CELL_FONT_MAX_PT; None when even CELL_FONT_MIN_PT does not fit (colour only)."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()  # lays the figure out: the axes' size is final
    box = ax.get_window_extent()
    cell_w, cell_h = box.width / cols * 72 / fig.dpi, box.height / rows * 72 / fig.dpi  # points
    size = min(CELL_FONT_MAX_PT, 0.9 * cell_w / (4 * 0.6), 0.9 * cell_h / 1.3)
    return size if size >= CELL_FONT_MIN_PT else None


def heatmap_figure(store: Store, *, type: str = "i", p: float = 0.9, scale: str = "range",
                   annotate: bool | None = None) -> Figure:
    """Return the per-expert figure of one type at one p.

    MoE: a layer × expert heatmap of top-p sparsity (dead experts grey, a dense layer's padding white; each cell's
    value printed where it can be read, at a font that fits the cell (`cell_font_pt`), or as `annotate` says;
    else colour only, with the colour bar) beside a scatter of each live expert's
    sparsity against its load ÷ ideal (utilization), coloured by layer. Dense: sparsity against layer as lines,
    one per p of a few grid values, the chosen p bold. `scale`: "range" (the live experts' range), "fixed" (0–1)
    or "centred" (diverging, centred on the median); the title says which.
    """
    store.require_type(type)
    pi = store.p_index(p)
    model = display_name(store.model)
    sparsity = store.mean(type)[:, :, pi]  # [L, E]
    L, E = sparsity.shape
    fig = Figure(figsize=heatmap_figsize(L, E), dpi=DPI, layout="constrained")
    if E == 1:
        return _layer_lines(fig, store, type, pi, model)
    live, dead = live_dead(store)
    slots = expert_slots(store)
    ax, ax_load = fig.subplots(1, 2, width_ratios=(3, 2))
    shown = live & np.isfinite(sparsity)
    norm, cmap_name, scale_words = _color_norm(sparsity[shown], scale)
    cmap = matplotlib.colormaps[cmap_name].with_extremes(bad=DEAD_COLOR)
    data = np.ma.masked_where(~shown, sparsity)
    im = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest", origin="lower")
    if (~slots).any():  # padding slots of dense layers in an MoE model: white, not dead
        ax.imshow(np.ma.masked_where(slots, np.ones_like(sparsity)), cmap=ListedColormap(["white"]),
                  aspect="auto", interpolation="nearest", origin="lower")
    fig.colorbar(im, ax=ax, label=f"sparsity at p = {p:g} (fraction dropped)")
    ax.set_xlabel("expert")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _label_site_rows(ax, store.sites(), L)
    n_dead = int(dead.sum())
    note = f"; grey: {n_dead} dead expert{'s' if n_dead != 1 else ''} (0 tokens)" if n_dead else ""
    if (~slots).any():
        note += "; white: dense layer"
    ax.set_title(f"top-p sparsity of {TYPE_NAMES.get(type, type)} ({type}) at p = {p:g}{note}\n{scale_words}",
                 fontsize="small")
    util = store.balance().utilization
    ok = shown & np.isfinite(util)
    rows = np.nonzero(ok)[0]
    layer_cmap = matplotlib.colormaps["viridis"].resampled(max(L, 2))  # one colour per layer
    points = ax_load.scatter(util[ok], sparsity[ok], c=rows, cmap=layer_cmap, s=14, vmin=-0.5, vmax=max(L, 2) - 0.5)
    ax_load.axvline(1.0, color="0.5", lw=0.8, ls="--")
    ax_load.set_xlabel("load ÷ ideal (tokens / the layer's mean per expert)")
    ax_load.set_ylabel(f"sparsity at p = {p:g}")
    ax_load.set_title("sparsity vs load (colour: layer)", fontsize="small")
    ax_load.grid(alpha=0.3)
    bar = fig.colorbar(points, ax=ax_load, label="layer")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.suptitle(model, fontsize="medium")
    font = cell_font_pt(fig, ax, L, E)  # after the layout: the cells' real size
    if annotate is None:
        annotate = font is not None
    if annotate:
        for l, e in zip(*np.nonzero(shown)):
            rgba = cmap(norm(sparsity[l, e]))
            dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
            ax.text(e, l, f"{sparsity[l, e]:.2f}", ha="center", va="center", fontsize=font or CELL_FONT_MIN_PT,
                    color="white" if dark else "black")
    return fig


def _layer_lines(fig: Figure, store: Store, type: str, pi: int, model: str) -> Figure:
    """Dense model: sparsity of `type` against layer, one line per p of a few grid values (grid index pi bold)."""
    ax = fig.subplots()
    mean = store.mean(type)[:, 0, :]  # [L, P]
    grid = store.p_grid
    picks = sorted({j for j, q in enumerate(grid) if any(np.isclose(q, w) for w in (0.5, 0.8, 0.95, 0.99))} | {pi})
    layers = np.arange(mean.shape[0])
    for j in picks:
        ax.plot(layers, mean[:, j], marker="o", markersize=3, lw=2.2 if j == pi else 1.0,
                alpha=1.0 if j == pi else 0.6, label=f"p = {grid[j]:g}")
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (fraction of entries dropped)")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"{model}\ntop-p sparsity of {TYPE_NAMES.get(type, type)} ({type}) against layer (dense FFN)",
                 fontsize="small")
    return fig


def plot_heatmap(store: Store | str | os.PathLike, out_dir: str | os.PathLike, *, type: str = "i",
                 p: float = 0.9, name: str | None = None, scale: str = "range", annotate: bool | None = None) -> Path:
    """Write `heatmap_figure` as a PNG (MoE: layer × expert heatmap and sparsity vs load; dense: sparsity against
    layer as lines); return its path, `<store stem>_heatmap_<type>_p<p>.png` in `out_dir` unless `name` is given."""
    opened, owned = _open_all([store])
    s = opened[0]
    try:
        fig = heatmap_figure(s, type=type, p=p, scale=scale, annotate=annotate)  # checks type and p first
        out = _out_dir(out_dir)
        return _save(fig, out / (name or f"{s.path.stem}_heatmap_{type}_p{p:g}.png"))
    finally:
        for st in owned:
            st.close()


def critical_figure(store: Store, record=None) -> Figure:
    """Return the critical search of a /critical record (default: the store's latest): the score ratio against the
    realized token-weighted sparsity at every evaluated point (passed green, failed red, each labelled with its p),
    the target as a line, and p* marked. StoreError when the store has no search or the record no points."""
    record = record if record is not None else store.critical()
    if record is None:
        raise StoreError(f"{store.path} has no /critical; run `moeprof critical MODEL --task TASK --out "
                         f"{store.path}` first")
    pts, a = record.points, record.attrs
    if not pts or "ratio" not in pts:
        raise StoreError(f"the /critical record of {store.path} holds no evaluated points; rerun `moeprof critical`")
    x = np.asarray(pts["sparsity_token"], dtype=np.float64)
    y = np.asarray(pts["ratio"], dtype=np.float64)
    passed = np.asarray(pts.get("passed", y >= float(a.get("target", 0.99))), dtype=bool)
    fig = Figure(figsize=(6.5, 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    p_all = np.asarray(pts["p"], dtype=np.float64)
    star = None
    if "critical_p" in a and np.isfinite(float(a["critical_p"])):
        hit = np.flatnonzero(np.isclose(p_all, float(a["critical_p"])))
        star = int(hit[0]) if hit.size else None
    # the refinement crowds points around p*: those go into a zoomed inset, labelled there
    span = float(np.ptp(x)) if x.size > 1 else 1.0
    near = (np.abs(x - x[star]) < 0.04 * span) if star is not None else np.zeros(x.shape, dtype=bool)
    zoom = [ax]
    if near.sum() >= 3:
        inset = ax.inset_axes((0.1, 0.1, 0.42, 0.42))
        inset.set_title("around p*", fontsize=6)
        inset.tick_params(labelsize=6)
        inset.axhline(float(a.get("target", np.nan)), color="0.3", ls="--", lw=0.8)
        zoom.append(inset)
    order = np.argsort(x)
    ax.plot(x[order], y[order], color="0.6", lw=0.8, zorder=1)
    for target_ax in zoom:
        shown = np.ones(x.shape, dtype=bool) if target_ax is ax else near
        target_ax.scatter(x[passed & shown], y[passed & shown], color="tab:green", s=24, zorder=2,
                          label="passed" if target_ax is ax else None)
        target_ax.scatter(x[~passed & shown], y[~passed & shown], color="tab:red", s=24, zorder=2,
                          label="failed" if target_ax is ax else None)
        label_here = shown & ~near if (target_ax is ax and len(zoom) > 1) else shown
        for xi, yi, pi in zip(x[label_here], y[label_here], p_all[label_here]):
            target_ax.annotate(f"p={pi:.3g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=6)
        if star is not None:
            target_ax.scatter([x[star]], [y[star]], marker="*", s=160, color="gold", edgecolor="black", zorder=3,
                              label=f"p* = {float(a['critical_p']):.3g} (sparsity {x[star]:.3f})"
                              if target_ax is ax else None)
    if "target" in a:
        ax.axhline(float(a["target"]), color="0.3", ls="--", lw=0.8, label=f"target {float(a['target']):g}")
    ax.set_xlabel("realized sparsity (token-weighted)")
    ax.set_ylabel("score ÷ dense score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper right")
    ax.set_title(f"{display_name(store.model)}: critical search of {a.get('type', '?')} ({a.get('rule', '?')}) on "
                 f"{a.get('task', '?')}\n{len(x)} evaluated sparse points (+ the dense one)", fontsize="small")
    return fig


def plot_critical(store: Store | str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write `critical_figure` of every /critical record of the store; return the PNG paths
    (`<stem>_critical_<type>_<rule>_<task>.png`)."""
    opened, owned = _open_all([store])
    s = opened[0]
    try:
        written = []
        for rec in s.criticals():
            if not rec.points:
                continue
            fig = critical_figure(s, rec)
            key = "_".join(str(rec.attrs.get(k, "-")) for k in ("type", "rule", "task"))
            key = "".join(c if c.isalnum() or c in "-_.:" else "-" for c in key).replace(":", "-")
            written.append(_save(fig, _out_dir(out_dir) / f"{s.path.stem}_critical_{key}.png"))
        return written
    finally:
        for st in owned:
            st.close()


def text_label(store: Store) -> str:
    """Return what a store was profiled on, for a row label: its data sources ("wikipedia:heldout"), else its file."""
    return " + ".join(store.data_sources) or store.path.stem


def same_model_groups(stores: Sequence[Store]) -> list[list[Store]]:
    """Return the MoE stores grouped by model (id and layer × expert shape) that hold different texts: groups of two
    or more whose data sources are pairwise disjoint. A store whose sources include another's (a `moeprof merge` of
    the others) is left out, and a group where two stores share a source (the same text twice) draws nothing."""
    groups: dict[tuple, list[Store]] = {}
    for s in stores:
        if s.num_experts > 1:
            groups.setdefault((s.model, s.num_layers, s.num_experts), []).append(s)
    out = []
    for group in groups.values():
        sources = [set(s.data_sources) for s in group]
        kept = [(s, src) for s, src in zip(group, sources)
                if not any(other < src for other in sources if other)]  # drop the union of others
        disjoint = all(a and not (a & b) for i, (_, a) in enumerate(kept) for _, b in kept[i + 1:])
        if len(kept) >= 2 and disjoint:
            out.append([s for s, _ in kept])
    return out


def text_routing(stores: Sequence[Store]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return (routed counts [texts, L, E] of the stores, `routing_mutual_information` of them)."""
    counts = np.stack([s.routing().tokens.astype(np.float64) for s in stores])  # [D, L, E]
    return counts, routing_mutual_information(counts)


def _short_model_name(store: Store) -> str:
    """The last component of a store's model id, for file names ("moeprof/tiny-moe" -> "tiny-moe")."""
    return display_name(store.model).rstrip("/").split("/")[-1]


def load_by_text_figure(stores: Sequence[Store], *, labels: Sequence[str] | None = None) -> Figure:
    """Return the per-text expert load of one MoE profiled on several texts (one store per text, e.g. one per domain).

    One panel per layer (site row): a text × expert heatmap of the share of that text's routed tokens each expert
    took (a row sums to 1; uniform = 1/E), titled with the mutual information between text and expert choice
    (`moeprof.outliers.routing_mutual_information`, in bits and as a fraction of H(text)). ValueError unless the
    stores are two or more of one MoE (same id, layers and experts).
    """
    groups = same_model_groups(stores)
    if len(stores) < 2 or len(groups) != 1 or len(groups[0]) != len(stores):
        raise InvalidArgument("the per-text load needs two or more stores of one MoE model (same id, layers and experts), "
                         "each profiled on its own text")
    names = [text_label(s) for s in stores] if labels is None else [str(x) for x in labels]
    if len(set(names)) < len(names):
        names = [f"{n} ({s.path.stem})" for n, s in zip(names, stores)]
    counts, info = text_routing(stores)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / counts.sum(axis=2, keepdims=True)  # [D, L, E]
    D, L, E = share.shape
    cols = min(L, 2 if E > 8 else 4)  # panels per row: the figure stays about 15 inches wide
    rows = -(-L // cols)
    fig = Figure(figsize=(min(3.0 + 0.25 * E, 7.0) * cols + 1.5, (1.2 + 0.35 * D) * rows + 1.0), dpi=DPI,
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    vmax = float(np.nanmax(share)) if np.isfinite(share).any() else 1.0
    norm = Normalize(0.0, max(vmax, 1e-6))
    sites = stores[0].sites()
    im = None
    for layer in range(L):
        ax = axes[layer]
        im = ax.imshow(share[:, layer, :], cmap="magma", norm=norm, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(D))
        ax.set_yticklabels(names if layer % cols == 0 else [], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        mi, frac = info["mi_bits"][layer], info["mi_frac"][layer]
        ax.set_title(f"layer {sites.label(layer)}: MI {mi:.3f} bits ({frac:.0%} of H(text))", fontsize=8)
    for ax in axes[L:]:
        ax.set_visible(False)
    fig.colorbar(im, ax=list(axes[:L]), label=f"share of the text's routed tokens (uniform {1 / E:.3f})",
                 shrink=0.8)
    fig.suptitle(f"{display_name(stores[0].model)}: expert load by text (mean MI {np.nanmean(info['mi_bits']):.3f} "
                 f"bits of H(text) = {np.nanmean(info['domain_entropy_bits']):.3f})", fontsize="medium")
    return fig


def plot_load_by_text(stores: Sequence[Store | str | os.PathLike], out_dir: str | os.PathLike, *,
                      labels: Sequence[str] | None = None, name: str | None = None) -> Path:
    """Write `load_by_text_figure` as `<model>_load_by_text.png` in `out_dir` (unless `name`); return its path."""
    opened, owned = _open_all(stores)
    try:
        fig = load_by_text_figure(opened, labels=labels)
        return _save(fig, _out_dir(out_dir) / (name or f"{_short_model_name(opened[0])}_load_by_text.png"))
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
             labels: Sequence[str] | None = None, type: str | None = None, p: float | None = None,
             x_axis: str = "p", scale: str = "range") -> list[Path]:
    """Write the overlaid curves of all stores, one heatmap figure per store (`heatmap_figure`), the critical
    search of each store that has one, and the per-text expert load (`load_by_text_figure`) of each MoE given on
    two or more stores; return the PNG paths.

    Heatmaps use `type` (default: "i" where profiled, else the store's first type) and `p` (default: the grid
    value nearest 0.9). Type and p are checked in every store before anything is written.
    """
    if isinstance(paths, (Store, str, os.PathLike)):
        paths = [paths]
    opened, owned = _open_all(paths)
    try:
        for s in opened:
            s.require_type(_default_type(s, type))
            s.p_index(_default_p(s, p))
        written = plot_curves(opened, out_dir, labels=labels, x_axis=x_axis)
        seen: set[str] = set()
        for k, s in enumerate(opened):
            t, q = _default_type(s, type), _default_p(s, p)
            name = f"{s.path.stem}_heatmap_{t}_p{q:g}.png"
            if name in seen:  # two stores with the same file name in different folders
                name = f"{s.path.stem}_{k}_heatmap_{t}_p{q:g}.png"
            seen.add(name)
            written.append(plot_heatmap(s, out_dir, type=t, p=q, name=name, scale=scale))
            written += plot_critical(s, out_dir)
        for group in same_model_groups(opened):
            model = _short_model_name(group[0])
            name = f"{model}_load_by_text.png"
            if name in seen:
                name = f"{model}_{len(seen)}_load_by_text.png"
            seen.add(name)
            written.append(plot_load_by_text(group, out_dir, name=name))
        return written
    finally:
        for s in owned:
            s.close()


def stability_figure(st: Store) -> Figure:
    """Return the stability figure of a store with /stability: same-expert Jaccard of top-p masks against the step
    gap, one line per layer (left: g steps apart; right: against the expert's first step), and the chance level
    (`moeprof.report.chance`: two independent masks of the same sparsity) as a dashed grey line at its mean over
    the rows, a band where the rows' chance levels differ."""
    from moeprof.report.chance import chance_levels

    rec = st.stability()
    if rec is None:
        raise StoreError(f"{st.path} has no /stability; run `moeprof stability MODEL --prompts FILE --out "
                         f"{st.path}` first")
    attrs, arrays = rec
    chance = chance_levels(st, str(attrs.get("type")), float(attrs.get("p")))
    fig = Figure(figsize=(10.0, 4.0), dpi=DPI)
    FigureCanvasAgg(fig)
    gaps = np.arange(1, arrays["gap_jaccard"].shape[1] + 1)
    for k, (name, title) in enumerate((("gap_jaccard", "consecutive masks g steps apart"),
                                        ("drift_gap_jaccard", "drift: g steps after the first"))):
        ax = fig.add_subplot(1, 2, k + 1)
        sites = st.sites()  # rows are sites: a layer may hold several ("3 shared"; DiffusionGemma: L + l)
        for r, row in enumerate(arrays[name]):
            ax.plot(gaps, row, marker="o", ms=3, label=f"layer {sites.label(r)}")
        if np.isfinite(chance).any():
            level = float(np.nanmean(chance))
            ax.axhline(level, color="0.4", ls="--", lw=1.2,
                       label=f"chance: independent masks of the same sparsity ({level:.3f})")
            lo, hi = float(np.nanmin(chance)), float(np.nanmax(chance))
            if hi - lo > 1e-3:
                ax.axhspan(lo, hi, color="0.85", alpha=0.5, zorder=0)
        ax.set_xlabel("step gap g")
        ax.set_ylabel("mean Jaccard of kept-sets")
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if st.num_layers <= 12:
        fig.axes[0].legend(fontsize=7)
    else:  # the chance line's legend entry only
        handles = [h for h in fig.axes[0].lines if h.get_label().startswith("chance")]
        fig.axes[0].legend(handles=handles, fontsize=7)
    fig.suptitle(f"{display_name(st.model)}: mask stability of {attrs.get('type')} at p = {attrs.get('p'):g} "
                 f"({attrs.get('mode')})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_stability(store: Store | str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `<store name>.png` into out_dir (`stability_figure`); return its path."""
    st = store if isinstance(store, Store) else open_store(store)
    try:
        fig = stability_figure(st)
        return _save(fig, _out_dir(out_dir) / f"{st.path.stem}.png")
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
    if hi - lo < 1e-3:  # one value: a band around it (p stays within [0, 1]; a threshold τ has no top)
        pad = 0.05 * max(abs(hi), 1.0) if schedule.rule == "threshold" else 0.05
        lo, hi = max(lo - pad, 0.0), (hi + pad if schedule.rule == "threshold" else min(hi + pad, 1.0))
    im = ax.imshow(np.ma.masked_invalid(table), cmap=cmap, vmin=lo, vmax=hi, aspect="auto",
                   interpolation="nearest", origin="lower")
    fig.colorbar(im, ax=ax, label="scheduled τ (threshold: keep |a| ≥ τ)" if schedule.rule == "threshold"
                 else f"scheduled p ({schedule.rule})")
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

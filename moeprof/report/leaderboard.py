"""Leaderboards of a profile store: which experts are sparsest, busiest, most variable, or odd within their layer.

Legend: L = layers, E = expert slots per layer (1 for a dense model), P = p-grid size, B = histogram bins.

Everything here reads a `Store` and nothing else (no model, no torch tensors). Numbers come out of
`leaderboard_rows` / `layer_summary_rows` as plain dicts; the rich tables are rendered from those rows, so a
test (or a notebook) can check the numbers without parsing a table.

Worked example (one expert, two vectors of width 8 at p = 0.9): v₁ = [5.5, 3, 1.5, 0, …] keeps 3 entries
(S = 0.625), v₂ = [1, 1, 1, 1, 1, 0, 0, 0] keeps 5 (S = 0.375). Row: sparsity 0.5, std 0.125; the histogram
holds one vector in bin [0.35, 0.40) and one in [0.60, 0.65), so interpolating the histogram's CDF gives
q10 = 0.35 + 0.2·0.05 = 0.36 and q90 = 0.60 + 0.8·0.05 = 0.64, a 10–90 % range of 0.28.
"""

from __future__ import annotations

import math

import numpy as np
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from moeprof.errors import InvalidArgument
from moeprof.outliers import OUTLIER_Z
from moeprof.report.critical_tables import critical_headline
from moeprof.store import Store, StoreError

SORT_KEYS = ("sparsity", "tokens", "spread")
QUANTILES = (0.1, 0.9)
# compact tables (no vertical rules, one space of padding) so a leaderboard fits an 80-column terminal
_TABLE_STYLE = dict(title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                    collapse_padding=True)
_DEAD_LAYERS_LISTED = 12  # layers whose dead experts a caption names before "… and N more layers"


# ---------------------------------------------------------------------------------------------------------------
# Reading helpers (shared with plots.py)


def expert_slots(store: Store) -> np.ndarray:
    """Return bool [L, E]: True where (layer, expert) is a real expert (a dense layer's padding slots are not)."""
    return store.sites().slots


def live_dead(store: Store) -> tuple[np.ndarray, np.ndarray]:
    """Return (live [L, E], dead [L, E]) bool masks: experts that got tokens, and dead experts (`Store.dead()`)."""
    dead = store.dead()
    return expert_slots(store) & ~dead, dead


def hist_quantiles(hist: np.ndarray, edges: np.ndarray, qs=QUANTILES) -> np.ndarray:
    """Return quantiles [..., len(qs)] of histograms hist [..., B] over bin edges [B+1] (linear within a bin).

    NaN where a histogram is empty. Quantile q sits where the cumulative count reaches q · N, interpolated
    linearly inside the bin that crosses it.
    """
    hist = np.asarray(hist, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    cum = np.cumsum(hist, axis=-1)  # [..., B]
    total = cum[..., -1:]  # [..., 1]
    out = np.full(hist.shape[:-1] + (len(qs),), np.nan)
    for j, q in enumerate(qs):
        target = q * total  # [..., 1]
        b = np.minimum((cum < target).sum(-1), hist.shape[-1] - 1)  # first bin whose cumulative count reaches it
        below = np.take_along_axis(cum, b[..., None], -1)[..., 0] - np.take_along_axis(hist, b[..., None], -1)[..., 0]
        in_bin = np.take_along_axis(hist, b[..., None], -1)[..., 0]
        frac = np.where(in_bin > 0, (target[..., 0] - below) / np.where(in_bin > 0, in_bin, 1.0), 0.0)
        val = edges[b] + np.clip(frac, 0.0, 1.0) * (edges[b + 1] - edges[b])
        out[..., j] = np.where(total[..., 0] > 0, val, np.nan)
    return out


def _check_layer(store: Store, layer: int | None) -> list[int] | None:
    """Return the site rows of decoder layer `layer` (a layer may hold routed, shared and dense sites), or None
    for every layer; raise ValueError naming the layers there are."""
    if layer is None:
        return None
    sites = store.sites()
    layers = sites.layer if sites.layer is not None else np.arange(store.num_layers)  # row = layer before
    L = int(layers.max()) + 1
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < L:
        raise InvalidArgument(f"layer {layer} is out of range: {store.path} has layers 0..{L - 1}")
    return [int(r) for r in np.flatnonzero(layers == layer)]


def _check_top(top) -> None:
    if top is not None and (isinstance(top, bool) or int(top) != top or top < 0):
        raise InvalidArgument(f"top must be a whole number >= 0 (0 or None: all rows), got {top!r}")


def _count(n: int) -> str:
    if n < 1_000_000:
        return f"{n:,}"
    return f"{n / 1e6:.3g}M" if n < 1_000_000_000 else f"{n / 1e9:.3g}G"


def _fmt(x: float, spec: str = ".3f") -> str:
    return "—" if x is None or not np.isfinite(x) else format(x, spec)


# ---------------------------------------------------------------------------------------------------------------
# Expert leaderboard


def _critical_for(store: Store, type: str):
    """Return the latest /critical record of `type`, else the latest of any type, else None."""
    return store.critical(type=type) or store.critical()


def _expert_arrays(store: Store, type: str, p: float) -> dict[str, np.ndarray]:
    """Return every [L, E] quantity of the leaderboard at one p."""
    store.require_type(type)
    pi = store.p_index(p)
    tokens = store.routing().tokens.astype(np.int64)  # [L, E]
    live, dead = live_dead(store)
    sp = store.sparsity(type)
    q = hist_quantiles(sp.hist[:, :, pi, :], store.hist_edges)  # [L, E, 2]
    out = store.outliers(type)
    mag = store.magnitude(type)
    bal = store.balance()
    return dict(tokens=tokens, live=live, dead=dead, utilization=bal.utilization, weight_share=bal.weight_share, sparsity=sp.mean[:, :, pi].astype(np.float64),
                std=sp.std[:, :, pi].astype(np.float64), q10=q[..., 0], q90=q[..., 1],
                load=np.where(live, out.load_share, np.nan), z=np.where(live, out.sparsity_z[:, :, pi], np.nan),
                outlier=live & out.flagged[:, :, pi],
                max_abs=mag.max_abs.astype(np.float64), peak_ratio=mag.peak_ratio_mean.astype(np.float64))


def leaderboard_rows(store: Store, *, type: str = "i", p: float = 0.9, by: str = "sparsity",
                     layer: int | None = None, top: int | None = 20, ascending: bool = False) -> list[dict]:
    """Return the ranked live experts as dicts, best first (at most `top`; None or 0 = all); `ascending` ranks
    the other way round (`by="tokens", ascending=True`: the least-used experts first), NaN still last.

    Keys: rank, layer, expert, tokens, load_frac (share of its layer's routed tokens), sparsity (mean top-p
    sparsity at p), utilization (tokens / the layer's mean: load ÷ ideal), weight_share (the expert's share of
    its layer's routing-weight mass), std, q10, q90, q_range (q90 − q10 from the histogram), z (robust z-score of sparsity within
    the layer, from /outliers), outlier (|z| > 3.5), max_abs, peak_ratio, critical_sparsity (realized at the
    critical p) and tolerance (the expert's own tolerance: the sparsest tolerance-grid point within the error
    budget; both NaN unless the store has /critical), effective_rank (exp entropy of the normalized singular
    values of the expert's activations of `type`; NaN unless profiled with --rank). Ranking: descending sparsity, tokens or spread (= std);
    NaN last; ties by (layer, expert). Experts with zero tokens are not ranked: see `dead_experts`.
    """
    if by not in SORT_KEYS:
        raise InvalidArgument(f"cannot sort by {by!r}; choose one of {', '.join(SORT_KEYS)}")
    _check_top(top)
    rows_of_layer = _check_layer(store, layer)
    a = _expert_arrays(store, type, p)
    crit = _critical_for(store, type)
    nan = np.full(a["tokens"].shape, np.nan)
    crit_s = nan if crit is None or crit.per_expert_sparsity is None else crit.per_expert_sparsity
    tol = nan if crit is None or crit.tolerance_sparsity is None else crit.tolerance_sparsity
    rank = store.effective_rank(type)
    erank = rank[0] if rank is not None else nan

    rows = []
    for l, e in zip(*np.nonzero(a["live"])):
        if rows_of_layer is not None and l not in rows_of_layer:
            continue
        z = float(a["z"][l, e])
        rows.append(dict(
            layer=int(l), expert=int(e), tokens=int(a["tokens"][l, e]), load_frac=float(a["load"][l, e]),
            sparsity=float(a["sparsity"][l, e]), std=float(a["std"][l, e]), q10=float(a["q10"][l, e]),
            q90=float(a["q90"][l, e]), q_range=float(a["q90"][l, e] - a["q10"][l, e]), z=z,
            outlier=bool(a["outlier"][l, e]), max_abs=float(a["max_abs"][l, e]),
            utilization=float(a["utilization"][l, e]), weight_share=float(a["weight_share"][l, e]),
            peak_ratio=float(a["peak_ratio"][l, e]), critical_sparsity=float(crit_s[l, e]),
            tolerance=float(tol[l, e]), effective_rank=float(erank[l, e])))
    value = {"sparsity": "sparsity", "tokens": "tokens", "spread": "std"}[by]
    sign = 1 if ascending else -1
    # rounded so that values equal up to float noise (e.g. one std computed two ways) tie and fall back to
    # (layer, expert) order: the ranking is reproducible
    rows.sort(key=lambda r: (math.inf if not np.isfinite(r[value]) else sign * round(r[value], 12), r["layer"],
                             r["expert"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows if not top else rows[:int(top)]


def dead_experts(store: Store, *, layer: int | None = None) -> list[tuple[int, int]]:
    """Return (layer, expert) of every expert that was routed no tokens (optionally of one layer)."""
    rows_of_layer = _check_layer(store, layer)
    _, dead = live_dead(store)
    return [(int(l), int(e)) for l, e in zip(*np.nonzero(dead)) if rows_of_layer is None or l in rows_of_layer]


def _ranges(ids: list[int]) -> str:
    """[1, 2, 3, 7] -> "1–3, 7"."""
    parts, start = [], None
    for k, e in enumerate(ids):
        if start is None:
            start = e
        if k + 1 == len(ids) or ids[k + 1] != e + 1:
            parts.append(f"{start}" if start == e else f"{start}–{e}")
            start = None
    return ", ".join(parts)


def _dead_line(dead: list[tuple[int, int]], sites) -> str:
    by_layer: dict[int, list[int]] = {}
    for row, e in dead:  # named by decoder layer (a row after a layer holding shared experts is not its layer)
        by_layer.setdefault(int(sites.layer[row]), []).append(e)
    layers = list(by_layer)
    names = "; ".join(f"L{l} E{_ranges(by_layer[l])}" for l in layers[:_DEAD_LAYERS_LISTED])
    more = (f"; … and {len(layers) - _DEAD_LAYERS_LISTED} more layers" if len(layers) > _DEAD_LAYERS_LISTED
            else "")
    return f"dead (0 tokens, not ranked): {len(dead)}: {names}{more}"


def schedule_columns(store: Store, schedule, rows: list[dict]) -> None:
    """Add each row's scheduled p (`sched_p`, NaN = dense) and the sparsity the schedule realized on calibration
    (`sched_s`, from its provenance; NaN when absent) — a `moeprof.schedule.Schedule` of this store's shape."""
    from moeprof.schedule.data import ScheduleError

    shape = (store.num_layers, store.num_experts)
    if tuple(schedule.p.shape) != shape:
        raise ScheduleError(f"the schedule is [layers, experts] = {list(schedule.p.shape)}, the store "
                            f"{list(shape)}: it was made for another model")
    realized = schedule.provenance.get("per_expert_sparsity")
    realized = (np.full(shape, np.nan) if realized is None
                else np.array([[np.nan if v is None else v for v in row] for row in realized], dtype=np.float64))
    for r in rows:
        r["sched_p"] = float(schedule.p[r["layer"], r["expert"]])
        r["sched_s"] = float(realized[r["layer"], r["expert"]])


def leaderboard(store: Store, *, type: str = "i", p: float = 0.9, by: str = "sparsity", layer: int | None = None,
                top: int | None = 20, schedule=None, ascending: bool = False) -> Table:
    """Return a rich table of the experts ranked by `by` (see `leaderboard_rows`), dead experts in the caption;
    with `schedule` (a `moeprof.schedule.Schedule`) each expert's scheduled p and realized sparsity beside it."""
    _check_top(top)
    all_rows = leaderboard_rows(store, type=type, p=p, by=by, layer=layer, top=None, ascending=ascending)
    if schedule is not None:
        schedule_columns(store, schedule, all_rows)
    rows = all_rows if not top else all_rows[:int(top)]
    dead = dead_experts(store, layer=layer)
    crit = _critical_for(store, type)
    sites = store.sites()  # the layer column names shared and dense sites ("3 shared")
    moe = store.num_experts > 1
    where = f", layer {layer}" if layer is not None else ""
    order = (" (ascending: least-used first)" if by == "tokens" else " (ascending)") if ascending else ""
    table = Table(title=escape(f"{store.model}: top-p sparsity of {type} at p = {p:g}{where}, by {by}{order}"),
                  **_TABLE_STYLE)
    show_crit = crit is not None and crit.per_expert_sparsity is not None
    show_tol = crit is not None and crit.tolerance_sparsity is not None
    rank = store.effective_rank(type)
    # (header, shown?, cell) — compact headers keep the table within an 80-column terminal
    columns = [
        ("#", True, lambda r: str(r["rank"])),
        ("layer", True, lambda r: sites.label(r["layer"])),
        ("expert", moe, lambda r: str(r["expert"])),
        ("tokens", True, lambda r: _count(r["tokens"])),
        ("load", moe, lambda r: _fmt(r["load_frac"] * 100, ".1f") + "%"),
        ("util", moe, lambda r: _fmt(r["utilization"], ".2f")),
        ("w.mass", moe, lambda r: _fmt(r["weight_share"] * 100, ".1f") + "%"),
        (f"S@{p:g}", True, lambda r: Text(_fmt(r["sparsity"]), style="bold")),
        ("std", True, lambda r: _fmt(r["std"])),
        ("q-range", True, lambda r: _fmt(r["q_range"], ".2f")),
        ("z", moe, lambda r: Text(_fmt(r["z"], "+.2f") + "!", style="bold red") if r["outlier"]
         else _fmt(r["z"], "+.2f")),
        ("max|v|", True, lambda r: _fmt(r["max_abs"], ".3g")),
        ("pk/rms", True, lambda r: _fmt(r["peak_ratio"], ".2f")),
        ("crit S", show_crit, lambda r: _fmt(r["critical_sparsity"])),
        ("toler.", show_tol, lambda r: _fmt(r["tolerance"])),
        ("eff.rank", rank is not None, lambda r: _fmt(r["effective_rank"], ".1f")),
        ("sched τ" if getattr(schedule, "rule", "") == "threshold" else "sched p", schedule is not None,
         lambda r: "dense" if math.isnan(r["sched_p"]) else _fmt(
             r["sched_p"], ".4g" if getattr(schedule, "rule", "") == "threshold" else ".3f")),
        ("sched S", schedule is not None, lambda r: _fmt(r["sched_s"])),
    ]
    columns = [c for c in columns if c[1]]
    for header, _, _ in columns:
        table.add_column(header, justify="right", no_wrap=True, style="dim" if header == "#" else None)
    for r in rows:
        table.add_row(*(cell(r) for _, _, cell in columns))

    lines = [f"{len(rows)} of {len(all_rows)} {'experts' if moe else 'layers'} shown. S = top-p sparsity (fraction of "
             "entries dropped), mean over vectors; std and q-range (q90 − q10, from the histogram) over vectors; "
             "pk/rms = mean max|v| / rms(v)"]
    if moe:
        n_out = sum(r["outlier"] for r in all_rows)
        lines.append("load = share of the layer's routed tokens; util = load ÷ ideal (tokens / the layer's mean per "
                     "expert; 1 = balanced); w.mass = share of the layer's routing-weight mass")
        lines.append(f"z = robust z-score of S within its layer (median/MAD); outliers (|z| > {OUTLIER_Z}, marked !): "
                     f"{n_out}")
        if dead:
            lines.append(_dead_line(dead, sites))
        else:
            lines.append("dead experts (0 tokens): none")
    elif dead:
        lines.append(_dead_line(dead, sites))
    headline = critical_headline(crit)
    if headline:
        lines.append(headline)
    for other in store.criticals():  # every other search the store holds, one line each
        line = critical_headline(other)
        if line and line != headline:
            lines.append(line)
    if rank is not None:
        lines.append(f"eff.rank = exp(entropy of the normalized singular values) of the expert's {type} matrix "
                     f"(dense, p = 1); method: {rank[1]}")
    table.caption = Text("\n".join(lines))
    return table


# ---------------------------------------------------------------------------------------------------------------
# Per-layer summary


def layer_summary_rows(store: Store, type: str = "i", p: float = 0.9) -> list[dict]:
    """Return one dict per layer.

    Keys: layer, kind ("routed" | "shared" | "dense"), experts (expert slots), live, dead, tokens (tokens entering
    the layer), mean_sparsity / min_sparsity / max_sparsity (over live experts, unweighted), weighted_sparsity
    (weighted by vectors seen), entropy_norm (routing entropy / log E over the layer's experts; NaN for one expert),
    max_mean_load (max / mean tokens per expert, dead ones included), and the expert-load metrics of
    `moeprof.outliers.routing_balance` from the exact counts: perplexity_frac (exp(H) / E), jain (Jain's fairness
    index), load_cv (std / mean tokens per expert), dead_frac (dead / experts).
    """
    a = _expert_arrays(store, type, p)
    sites = store.sites()
    slots, kinds = sites.slots, sites.kind
    vectors = store.sparsity(type).vectors.astype(np.float64)  # [L, E]
    layer_tokens = store.routing().layer_tokens
    balance = store.balance()
    rows = []
    for l in range(store.num_layers):
        live, n = a["live"][l], int(slots[l].sum())
        s = a["sparsity"][l][live & np.isfinite(a["sparsity"][l])]
        w = vectors[l][live & np.isfinite(a["sparsity"][l])]
        rows.append(dict(
            layer=l, kind=kinds[l] if l < len(kinds) else "?", experts=n, live=int(live.sum()),
            dead=int(a["dead"][l].sum()), tokens=int(layer_tokens[l]),
            mean_sparsity=float(s.mean()) if s.size else math.nan,
            min_sparsity=float(s.min()) if s.size else math.nan,
            max_sparsity=float(s.max()) if s.size else math.nan,
            weighted_sparsity=float((s * w).sum() / w.sum()) if w.sum() > 0 else math.nan,
            entropy_norm=float(balance.entropy_norm[l]), max_mean_load=float(balance.max_mean_load[l]),
            perplexity_frac=float(balance.perplexity_frac[l]), jain=float(balance.jain[l]),
            load_cv=float(balance.load_cv[l]), dead_frac=float(balance.dead_frac[l])))
    return rows


def model_balance_line(store: Store) -> str | None:
    """Return the model-level expert-load line (aggregates over the routed layers), or None for a dense model."""
    m = store.balance().model
    if not np.isfinite(m["jain_mean"]):
        return None
    return (f"model (mean over routed layers): Jain {m['jain_mean']:.3f}, CV {m['load_cv_mean']:.3f}, H/log E "
            f"{m['entropy_norm_mean']:.3f}, exp(H)/E {m['perplexity_frac_mean']:.3f}; dead experts "
            f"{m['dead_frac'] * 100:.1f}%; utilization {m['utilization_min']:.2f}–{m['utilization_max']:.2f} of ideal")


def layer_summary(store: Store, type: str = "i", p: float = 0.9, top: int | None = None) -> Table:
    """Return a rich table with one row per layer (see `layer_summary_rows`), the first `top` layers (None or 0:
    all). A dense model shows only the columns that differ between its layers (its mean / min / max equal S, and
    every layer sees the same tokens)."""
    _check_top(top)
    all_rows = layer_summary_rows(store, type, p)
    rows = all_rows[:int(top)] if top else all_rows
    layers = store.sites().layer  # a row's decoder layer (a layer may hold routed, shared and dense sites)
    moe = store.num_experts > 1
    table = Table(title=escape(f"{store.model}: per-layer top-p sparsity of {type} at p = {p:g}"), **_TABLE_STYLE)
    mixed = len({r["kind"] for r in all_rows}) > 1  # e.g. DeepSeek: dense first layers, MoE after
    same_tokens = len({r["tokens"] for r in all_rows}) == 1
    # (header, shown?, cell)
    columns = [
        ("layer", True, lambda r: str(int(layers[r["layer"]]))),
        ("kind", mixed, lambda r: r["kind"]),
        ("tokens", moe or not same_tokens, lambda r: _count(r["tokens"])),
        ("experts", moe, lambda r: str(r["experts"])),
        ("dead", moe, lambda r: Text(str(r["dead"]), style="red") if r["dead"] else "0"),
        ("S", True, lambda r: Text(_fmt(r["weighted_sparsity"]), style="bold")),
        ("mean", moe, lambda r: _fmt(r["mean_sparsity"])),
        ("min", moe, lambda r: _fmt(r["min_sparsity"])),
        ("max", moe, lambda r: _fmt(r["max_sparsity"])),
        ("H/log E", moe, lambda r: _fmt(r["entropy_norm"])),
        ("e^H/E", moe, lambda r: _fmt(r["perplexity_frac"])),
        ("Jain", moe, lambda r: _fmt(r["jain"])),
        ("CV", moe, lambda r: _fmt(r["load_cv"], ".2f")),
        ("max/mean", moe, lambda r: _fmt(r["max_mean_load"], ".2f")),
    ]
    columns = [c for c in columns if c[1]]
    for name, _, _ in columns:
        table.add_column(name, justify="left" if name == "kind" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(cell(r) for _, _, cell in columns))
    caption = [f"{len(rows)} of {len(all_rows)} layers shown. S = top-p sparsity (fraction of entries dropped) "
               "averaged over every vector of the layer" + ("; mean/min/max over its live experts" if moe else "")]
    if not moe and same_tokens and all_rows:
        caption.append(f"every layer saw {_count(all_rows[0]['tokens'])} tokens")
    if moe:
        caption.append("H/log E = routing entropy over the layer's experts (1 = perfectly balanced); e^H/E = exp(H) "
                       "/ E, the fraction of experts effectively used; Jain = (Σt)² / (E·Σt²), Jain's fairness index "
                       "(1 = balanced, 1/E = one expert); CV = std / mean tokens per expert; max/mean = busiest "
                       "expert's tokens over the mean; dead = experts routed 0 tokens")
        line = model_balance_line(store)
        if line:
            caption.append(line)
    headline = critical_headline(store.critical())
    if headline:
        caption.append(headline)
    table.caption = Text("\n".join(caption))
    return table


# ---------------------------------------------------------------------------------------------------------------
# Token leaderboard (from the per-token trace)


def token_leaderboard_rows(store: Store, *, type: str = "i", p: float = 0.9, layer: int | None = None,
                           top: int = 5) -> list[dict]:
    """Return, per layer, the `top` sparsest and the `top` densest traced tokens by their top-p sparsity of `type`
    at p (mean over the token's routed slots in that layer).

    Keys: layer, kind ("sparsest" | "densest"), rank (1 = most extreme), index (row of the trace), token (text, or
    the id when no text was stored), token_id, sequence, position, sparsity, experts (the slots' experts).
    Ties by trace order. Needs a store profiled with --trace-tokens.
    """
    store.require_type(type)
    _check_top(top)
    rows_of_layer = _check_layer(store, layer)
    tr = store.trace()
    if type not in tr.sparsity:
        raise StoreError(f"the trace of {store.path} holds no {type}; profile with --types {type} --trace-tokens N")
    pi = store.p_index(p)
    s = tr.sparsity[type][..., pi].astype(np.float64)  # [N, L, K]
    with np.errstate(invalid="ignore"):
        n = np.isfinite(s).sum(-1)
        per_token = np.where(n > 0, np.nansum(s, -1) / np.maximum(n, 1), np.nan)  # [N, L]
    rows = []
    for l in range(per_token.shape[1]) if rows_of_layer is None else rows_of_layer:
        col = per_token[:, l]
        idx = np.flatnonzero(np.isfinite(col))
        for kind, order in (("sparsest", idx[np.argsort(-col[idx], kind="stable")]),
                            ("densest", idx[np.argsort(col[idx], kind="stable")])):
            for r, i in enumerate(order[:int(top) or None], 1):  # top 0: every token
                rows.append(dict(layer=int(l), kind=kind, rank=r, index=int(i),
                                 token=tr.token_text[i] if tr.token_text is not None else str(int(tr.token_id[i])),
                                 token_id=int(tr.token_id[i]), sequence=int(tr.sequence[i]),
                                 position=int(tr.position[i]), sparsity=float(col[i]),
                                 experts=[int(e) for e in tr.expert[i, l] if e >= 0]))
    return rows


def token_leaderboard(store: Store, *, type: str = "i", p: float = 0.9, layer: int | None = None,
                      top: int = 5) -> Table:
    """Return a rich table of the sparsest and densest traced tokens per layer (see `token_leaderboard_rows`)."""
    rows = token_leaderboard_rows(store, type=type, p=p, layer=layer, top=top)
    moe = store.num_experts > 1
    sites = store.sites()  # the layer column names shared and dense sites ("3 shared")
    table = Table(title=escape(f"{store.model}: traced tokens by top-p sparsity of {type} at p = {p:g}"),
                  **_TABLE_STYLE)
    for h in ("layer", "", "#", "token", "seq", "pos", f"S@{p:g}") + (("experts",) if moe else ()):
        table.add_column(h, justify="left" if h in ("token", "") else "right", no_wrap=True)
    for r in rows:
        table.add_row(sites.label(r["layer"]), r["kind"], str(r["rank"]), escape(repr(r["token"])), str(r["sequence"]),
                      str(r["position"]), Text(_fmt(r["sparsity"]), style="bold"),
                      *((",".join(map(str, r["experts"])),) if moe else ()))
    n = len(store.trace().token_id)
    table.caption = Text(f"{n} traced tokens; S = the token's top-p sparsity in the layer (mean over its routed "
                         "slots); sparsest = most entries dropped, densest = fewest")
    return table

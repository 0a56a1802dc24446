"""`moeprof report`: one self-contained, interactive HTML page of a study (stores, and schedules), for a browser.

Legend: L = site rows (layers), E = expert slots per layer, P = p-grid size, T = profiled types, D = texts.

The page is one file: plotly.js (a bundle of the trace types it draws, in `assets/`, see assets/PLOTLY.md), the
page's own script and style, and the study's numbers as one JSON document (`<script type="application/json"
id="moeprof-data">`) are all inlined, so it opens from disk with no network. Every number comes from the store's
typed readers and the report functions beside this module (`leaderboard`, `plots`, `compare`, `critical`); nothing
loads a model.

What the JSON holds (`report_data`): per store a summary, per-expert columns (exact JSON numbers, NaN = null),
per type the [P, L, E] arrays of mean sparsity, its std and the robust z (encoded, see below), the p-curve
(`plots.sparsity_curve`) and per-layer lines, per-layer load metrics (`Store.balance`), the critical records, the
schedules; for the whole study the load by text (`plots.same_model_groups` / `text_routing`) and the comparison of
models (`compare.compare_rows`).

Encoding of the [P, L, E] arrays (a 48 × 128 store with 4 types and 16 p values holds 1.2 M such numbers; as JSON
text they alone would pass 10 MB): little-endian 16-bit words in base64.
- "u16" (sparsity mean and std, which lie in [0, 1]): word q = round(v · 65534), value q / 65534 (abs. error ≤
  7.7e-6, far below the 3 decimals shown); 65535 = NaN.
- "f16" (z): IEEE half precision (relative error ≤ 2⁻¹¹, NaN and ±inf kept).
`decode_array` is the Python twin of the page's decoder (tests compare both with the readers).
"""

from __future__ import annotations

import base64
import html
import importlib.resources
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moeprof.activation_types import ACTIVATION_TYPES, TYPE_NAMES
from moeprof.errors import MoeprofError
from moeprof.report.compare import compare_rows
from moeprof.report.critical_tables import ci_text, critical_headline, record_warnings, run_settings
from moeprof.report.leaderboard import live_dead, model_balance_line
from moeprof.report.plots import (
    BAND,
    _default_p,
    _default_type,
    display_name,
    same_model_groups,
    sparsity_curve,
    text_label,
    text_routing,
)
from moeprof.schedule.data import stored_verdict_lines
from moeprof.store import Store, StoreError, open_store

REPORT_VERSION = 1
U16_NAN = 65535
U16_SCALE = 65534
_ASSETS = ("report.html", "report.css", "report.js")


class ReportError(MoeprofError, ValueError):
    """A report that cannot be written (the message names the fix)."""


# ---------------------------------------------------------------------------------------------------------------
# Numbers in JSON


def _num(x) -> float | int | None:
    """Return a JSON number: None for NaN / ±inf (JSON has neither)."""
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else None


def json_list(a) -> list:
    """Return array `a` as nested lists of JSON numbers (NaN / ±inf -> None)."""
    a = np.asarray(a)
    if a.dtype == bool:
        return a.astype(int).tolist()
    if np.issubdtype(a.dtype, np.integer):
        return a.tolist()
    flat = [v if math.isfinite(v) else None for v in a.astype(np.float64).ravel().tolist()]
    return np.array(flat, dtype=object).reshape(a.shape).tolist() if a.ndim > 1 else flat


def _jsonable(obj: Any) -> Any:
    """Return `obj` with numpy values, NaN and tuples made JSON-safe (for attrs and provenance)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    if isinstance(obj, (bool, np.bool_, int, np.integer, float, np.floating)):
        return _num(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def encode_array(a: np.ndarray, kind: str) -> dict:
    """Return {"enc", "shape", "b64"}: `a` as 16-bit words ("u16" for values in [0, 1], "f16" otherwise)."""
    a = np.asarray(a, dtype=np.float64)
    if kind == "u16":
        finite = np.isfinite(a)
        if (finite & ((a < 0) | (a > 1))).any():
            raise ValueError("u16 encodes values in [0, 1] only")
        words = np.where(finite, np.rint(np.where(finite, a, 0.0) * U16_SCALE), U16_NAN).astype("<u2")
    elif kind == "f16":
        with np.errstate(over="ignore"):
            words = a.astype("<f2")
    else:
        raise ValueError(f"unknown encoding {kind!r}")
    return {"enc": kind, "shape": list(a.shape), "b64": base64.b64encode(words.tobytes()).decode("ascii")}


def decode_array(d: dict) -> np.ndarray:
    """Return the float64 array of an `encode_array` dict (what the page's `decode` computes)."""
    raw = base64.b64decode(d["b64"])
    if d["enc"] == "u16":
        q = np.frombuffer(raw, dtype="<u2").astype(np.float64)
        out = np.where(q == U16_NAN, np.nan, q / U16_SCALE)
    elif d["enc"] == "f16":
        out = np.frombuffer(raw, dtype="<f2").astype(np.float64)
    else:
        raise ValueError(f"unknown encoding {d['enc']!r}")
    return out.reshape(d["shape"])


# ---------------------------------------------------------------------------------------------------------------
# One store


def layer_lines(store: Store, type: str) -> np.ndarray:
    """Return [L, P]: each layer's top-p sparsity of `type` at every p, weighted by the vectors each live expert saw
    (the `S` column of `layer_summary_rows`, at every p at once); NaN for a layer with no live expert."""
    sp = store.sparsity(type)
    live, _ = live_dead(store)
    mean = sp.mean.astype(np.float64)  # [L, E, P]
    ok = live[:, :, None] & np.isfinite(mean)  # [L, E, P]
    w = np.where(ok, sp.vectors.astype(np.float64)[:, :, None], 0.0)  # [L, E, P]
    num = (np.where(ok, mean, 0.0) * w).sum(1)  # [L, P]
    den = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _critical_record(rec) -> dict:
    a = rec.attrs
    keep = ("type", "rule", "task", "target", "critical_p", "critical_sparsity_token", "critical_sparsity_flop",
            "critical_score", "critical_ratio", "dense_score", "ratio_ci_low", "ratio_ci_high", "ci_level",
            "num_evaluations", "monotone", "at_bound")
    low, high = a.get("ratio_ci_low"), a.get("ratio_ci_high")
    ci = ci_text(float(low), float(high), float(a.get("ci_level", math.nan))) if low is not None and high is not None \
        else ""
    return {
        "attrs": {k: _jsonable(a[k]) for k in keep if k in a},
        "headline": critical_headline(rec) or "",
        "ci": ci, "ran": run_settings(a), "warnings": record_warnings(rec),
        "points": {k: json_list(v) for k, v in rec.points.items()},
        "per_expert_sparsity": None if rec.per_expert_sparsity is None else json_list(rec.per_expert_sparsity),
        "tolerance_sparsity": None if rec.tolerance_sparsity is None else json_list(rec.tolerance_sparsity),
    }


def _record_index(type: str, records) -> int | None:
    """Index in `records` (writing order) of the record the leaderboard uses for `type`: the latest of that type,
    else the latest of any (`Store.critical(type=...) or Store.critical()`, as `leaderboard._critical_for`)."""
    for k in range(len(records) - 1, -1, -1):
        if records[k].attrs.get("type") == type:
            return k
    return len(records) - 1 if records else None


def store_data(store: Store) -> dict:
    """Return the JSON-able section of one store (see the module doc)."""
    L, E = store.num_layers, store.num_experts
    sites = store.sites()
    routing, bal = store.routing(), store.balance()
    live, dead = live_dead(store)
    records = store.criticals()
    types = [t for t in ACTIVATION_TYPES if t in store.types]
    per_type = {}
    for t in types:
        sp = store.sparsity(t)
        z = store.outliers(t).sparsity_z
        grid, curve, lo, hi = sparsity_curve(store, t)
        per_type[t] = {
            # [P, L, E]: one p's layer x expert table is contiguous
            "mean": encode_array(np.moveaxis(sp.mean, -1, 0), "u16"),
            "std": encode_array(np.moveaxis(sp.std, -1, 0), "u16"),
            "z": encode_array(np.moveaxis(np.where(live[:, :, None], z, np.nan), -1, 0), "f16"),
            "curve": {"mean": json_list(curve), "lo": json_list(lo), "hi": json_list(hi)},
            "layer_lines": json_list(layer_lines(store, t)),
            "critical_record": _record_index(t, records),
        }
    a = store.attrs
    params = store.parameters()
    return {
        "file": store.path.name, "model": store.model, "name": display_name(store.model),
        "tokens": _num(a.get("tokens")), "data_sources": store.data_sources, "types": types,
        "type_names": {t: TYPE_NAMES[t] for t in types},
        "p_grid": json_list(store.p_grid), "layers": L, "experts": E, "is_moe": bool(E > 1),
        "default_type": _default_type(store, None), "default_p": _default_p(store, None),
        "site_labels": [sites.label(r) for r in range(L)], "site_kinds": list(sites.kind),
        "parameters": params, "band": list(BAND),
        "experts_table": {
            "slot": json_list(sites.slots), "tokens": json_list(routing.tokens.astype(np.int64)),
            "dead": json_list(dead), "live": json_list(live),
            "load": json_list(np.where(live, bal.load_share, np.nan)),
            "utilization": json_list(bal.utilization), "weight_share": json_list(bal.weight_share),
        },
        "per_type": per_type,
        "layer_metrics": {k: json_list(getattr(bal, k)) for k in (
            "jain", "load_cv", "perplexity_frac", "dead_frac", "entropy_norm", "max_mean_load")},
        "layer_tokens": json_list(routing.layer_tokens.astype(np.int64)),
        "balance_line": model_balance_line(store) if E > 1 else None,
        "criticals": [_critical_record(r) for r in records],
        "schedules": [],  # filled by report_data (the store's own /schedules and matching --schedule files)
    }


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def schedule_verdict(schedule) -> list[str]:
    """Return the lines that say what a schedule bought, from its provenance: a verdict it keeps (`verdict`), the
    held-out ratio against the target, and its sparsity against the uniform anchor on calibration ([] when the
    provenance holds none of these, e.g. a uniform or hand-made schedule)."""
    prov = schedule.provenance or {}
    lines = stored_verdict_lines(prov)

    def f(key):
        v = prov.get(key)
        return None if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) else float(v)

    target, held = f("target"), f("heldout_ratio")
    if held is not None and target is not None and not lines:  # a stored verdict already says it
        ci = prov.get("heldout_ratio_ci")
        ci_part = ""
        if isinstance(ci, (list, tuple)) and len(ci) >= 2 and all(isinstance(c, (int, float)) for c in ci[:2]):
            ci_part = f" (CI [{ci[0]:.4f}, {ci[1]:.4f}])"
        ok = "meets" if held >= target else "MISSES"
        spars = f"; held-out FLOP sparsity {f('heldout_sparsity_flop'):.3f}" if f("heldout_sparsity_flop") is not None \
            else ""
        lines.append(f"held-out ratio {held:.4f}{ci_part} {ok} the target {target:g}{spars}")
    s, u, anchor_p = f("sparsity_flop"), f("anchor_sparsity_flop"), f("anchor_p")
    if s is not None and u is not None and anchor_p is not None:
        gain = (s - u) * 100
        lines.append(f"calibration: FLOP sparsity {s:.3f} vs uniform p {anchor_p:.4g} at {u:.3f} "
                     f"({gain:+.1f} points); chosen: {prov.get('chosen', '?')}")
    return lines


def schedule_data(schedule, name: str, source: str) -> dict:
    """Return the JSON-able section of one schedule (its table [L, E], NaN = dense, and its verdict lines)."""
    prov = schedule.provenance or {}
    return {
        "name": name, "source": source, "type": schedule.type, "rule": schedule.rule, "model": schedule.model,
        "p": json_list(schedule.p), "dense_fraction": _num(schedule.dense_fraction),
        "method": str(prov.get("method", "")), "task": _jsonable(prov.get("task")),
        "sparsity_flop": _num(prov.get("sparsity_flop")) if isinstance(prov.get("sparsity_flop"), (int, float))
        else None,
        "verdict": schedule_verdict(schedule),
    }


def _fits(store: Store, schedule) -> bool:
    return tuple(schedule.p.shape) == (store.num_layers, store.num_experts)


# ---------------------------------------------------------------------------------------------------------------
# The study


def _compare_p(stores: Sequence[Store]) -> float | None:
    """The p of the comparison table: the p every store profiled nearest 0.9, None when they share none."""
    common = set(np.round(stores[0].p_grid, 9))
    for s in stores[1:]:
        common &= set(np.round(s.p_grid, 9))
    if not common:
        return None
    return float(min(common, key=lambda q: (abs(q - 0.9), -q)))


def _labels(stores: Sequence[Store]) -> list[str]:
    names = [display_name(s.model) for s in stores]
    return [f"{n} ({s.path.stem})" if names.count(n) > 1 else n for n, s in zip(names, stores)]


def report_data(stores: Sequence[Store], schedules: Sequence[tuple[str, Any]] = ()) -> dict:
    """Return the page's JSON document for open stores and (name, `moeprof.schedule.Schedule`) pairs.

    Each schedule goes to every store of its [layers, experts] shape (ReportError when none has it); a store's own
    /schedules go to it. Several stores of one MoE on disjoint texts give the load by text; stores of two or more
    models give the comparison.
    """
    if not stores:
        raise ReportError("a report needs at least one store: moeprof report STORE.h5 [STORE.h5 ...] -o report.html")
    out = [store_data(s) for s in stores]
    labels = _labels(stores)
    for d, label in zip(out, labels):
        d["label"] = label
    for k, s in enumerate(stores):
        for name in s.schedule_names():
            out[k]["schedules"].append(schedule_data(s.schedule(name), name, f"{s.path.name}:/schedules/{name}"))
    for name, sched in schedules:
        hits = [k for k, s in enumerate(stores) if _fits(s, sched)]
        if not hits:
            shapes = ", ".join(f"{s.path.name} [{s.num_layers}, {s.num_experts}]" for s in stores)
            raise ReportError(f"schedule {name} is [layers, experts] = {list(sched.p.shape)}, but no store has that "
                              f"shape ({shapes}); give the store of the model it was made for")
        for k in hits:
            out[k]["schedules"].append(schedule_data(sched, Path(name).stem, name))

    texts = []
    for group in same_model_groups(stores):
        counts, info = text_routing(group)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = counts / counts.sum(axis=2, keepdims=True)  # [D, L, E]
        names = [text_label(s) for s in group]
        if len(set(names)) < len(names):
            names = [f"{n} ({s.path.stem})" for n, s in zip(names, group)]
        texts.append({"model": group[0].model, "name": display_name(group[0].model), "texts": names,
                      "files": [s.path.name for s in group], "share": json_list(share),
                      "site_labels": [group[0].sites().label(r) for r in range(group[0].num_layers)],
                      **{k: json_list(v) for k, v in info.items()}})

    compare = None
    if len({s.model for s in stores}) >= 2:
        p = _compare_p(stores)
        rows = compare_rows(stores, p) if p is not None else []
        compare = {"p": p, "labels": labels, "rows": _jsonable(rows)}
    return {"format": "moeprof-report", "version": REPORT_VERSION, "stores": out, "texts": texts,
            "compare": compare}


# ---------------------------------------------------------------------------------------------------------------
# The page


PLOTLY_ASSET = "plotly-moeprof.min.js"


def plotly_js() -> str:
    """Return plotly.js as the page inlines it: plotly.js with the scatter, bar and heatmap traces only, shipped in
    `assets/` (assets/PLOTLY.md: how it is built, version, sha256, licence)."""
    return _asset(PLOTLY_ASSET)


def _asset(name: str) -> str:
    return (importlib.resources.files("moeprof.report") / "assets" / name).read_text(encoding="utf-8")


def _script_safe(text: str) -> str:
    """Return JavaScript text that cannot close its <script> element early."""
    return text.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")


def data_json(data: dict) -> str:
    """Return the JSON text embedded in the page ('<' escaped, so no string inside can end the script element)."""
    return json.dumps(data, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")


def render(data: dict, *, title: str | None = None) -> str:
    """Return the page: the template with plotly.js, the style, the script and the JSON document inlined."""
    page = _asset("report.html")
    if title is None:
        names = [s["label"] for s in data["stores"]]
        title = "moeprof report: " + (", ".join(names) if len(names) <= 3 else f"{len(names)} stores")
    parts = {
        "/*@CSS@*/": _asset("report.css"),
        "/*@PLOTLY@*/": _script_safe(plotly_js()),
        "/*@SCRIPT@*/": _script_safe(_asset("report.js")),
        "@DATA@": data_json(data),
        "@TITLE@": html.escape(title),
    }
    for key, value in parts.items():  # one pass per key on the template only (values are never re-scanned)
        head, sep, tail = page.partition(key)
        if not sep:
            raise RuntimeError(f"report template lacks {key}")
        page = head + value + tail
    return page


def write_report(stores: Sequence[str | os.PathLike | Store], out: str | os.PathLike, *,
                 schedules: Sequence[str | os.PathLike] = ()) -> Path:
    """Write the report page of `stores` (paths or open stores) and schedule files to `out`, atomically; return
    its path."""
    from moeprof.atomic import write_text
    from moeprof.schedule.data import Schedule

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"-o {out}: the report is an HTML page; give a file name ending in .html")
    opened, owned = [], []
    try:
        for s in stores:
            if isinstance(s, Store):
                opened.append(s)
            else:
                if Path(s).resolve() == out.resolve():
                    raise ReportError(f"-o {out} is one of the stores; write the report to another file")
                st = open_store(s)
                opened.append(st)
                owned.append(st)
        loaded = [(str(p), Schedule.load(p)) for p in schedules]
        page = render(report_data(opened, loaded))
    finally:
        for st in owned:
            st.close()
    if out.parent and not out.parent.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the folder of {out}: {e.strerror}; choose another -o") from None
    return write_text(out, page)


GENERATOR_TAG = b'<meta name="generator" content="moeprof report">'


def is_report(path: str | os.PathLike) -> bool:
    """True when `path` is a page written by `moeprof report` (its head names the generator)."""
    try:
        with open(path, "rb") as f:
            return GENERATOR_TAG in f.read(2048)
    except OSError:
        return False


def embedded_data(page: str) -> dict:
    """Return the JSON document embedded in a report page (its text, as written by `render`)."""
    start_tag = '<script type="application/json" id="moeprof-data">'
    start = page.find(start_tag)
    if start < 0:
        raise ReportError("not a moeprof report page (no moeprof-data script)")
    start += len(start_tag)
    end = page.find("</script>", start)
    return json.loads(page[start:end])

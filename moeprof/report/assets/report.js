// moeprof report: draws the study embedded as JSON (id "moeprof-data") with plotly.js; works offline from disk.
// Sections carry data-* counts (rows, cells, traces) that the browser test reads back.
"use strict";
(function () {
  performance.mark("moeprof-script-start");
  const DATA = JSON.parse(document.getElementById("moeprof-data").textContent);
  performance.measure("moeprof-json", "moeprof-script-start");
  const PAGE_ROWS = 50;
  const DEAD_COLOR = "#b0b0b0";
  const CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };
  const FONT = { family: "system-ui, DejaVu Sans, sans-serif", size: 12 };
  const state = { store: 0, type: null, p: null, sortKey: "sparsity", sortDir: -1, filters: {}, page: 0,
                  schedule: 0, textLayer: {} };
  const cache = new Map();
  const pending = [];

  // ---------------------------------------------------------------------------------------------- decoding
  function bytesOf(b64) {
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function half(h) {  // IEEE 754 binary16 -> number
    const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
    if (exp === 0) return sign * Math.pow(2, -14) * (frac / 1024);
    if (exp === 31) return frac ? NaN : sign * Infinity;
    return sign * Math.pow(2, exp - 15) * (1 + frac / 1024);
  }
  // the twin of moeprof.report.html.decode_array: u16 = q / 65534 (65535 = NaN), f16 = half precision
  function decode(d) {
    const bytes = bytesOf(d.b64), view = new DataView(bytes.buffer), n = bytes.length / 2;
    const out = new Float64Array(n);
    if (d.enc === "u16") for (let i = 0; i < n; i++) { const q = view.getUint16(2 * i, true); out[i] = q === 65535 ? NaN : q / 65534; }
    else if (d.enc === "f16") for (let i = 0; i < n; i++) out[i] = half(view.getUint16(2 * i, true));
    else throw new Error("unknown encoding " + d.enc);
    return out;
  }
  function arr(store, type, name) {  // Float64Array [P * L * E] of one store's type (decoded once)
    const key = store + "/" + type + "/" + name;
    if (!cache.has(key)) cache.set(key, decode(DATA.stores[store].per_type[type][name]));
    return cache.get(key);
  }

  // ---------------------------------------------------------------------------------------------- helpers
  const isNum = (x) => typeof x === "number" && !Number.isNaN(x);
  function fmt(x, d) { return isNum(x) ? (Number.isFinite(x) ? x.toFixed(d === undefined ? 3 : d) : String(x)) : "—"; }
  function fmtSigned(x, d) { return isNum(x) && Number.isFinite(x) ? (x >= 0 ? "+" : "") + x.toFixed(d) : fmt(x, d); }
  const THOUSANDS = new Intl.NumberFormat("en-US");  // one formatter: toLocaleString builds one per call (slow)
  function count(n) {
    if (!isNum(n)) return "—";
    if (n < 1e6) return THOUSANDS.format(n);
    return n < 1e9 ? (n / 1e6).toPrecision(3) + "M" : (n / 1e9).toPrecision(3) + "G";
  }
  function params(n) {
    if (n === null || n === undefined) return "—";
    for (const [u, s] of [["B", 1e9], ["M", 1e6], ["K", 1e3]]) if (n >= s) return (n / s).toPrecision(3) + u;
    return String(n);
  }
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  function section(id, title) {
    const s = el("section", { id: id, "data-section": id }, el("h2", { text: title }));
    document.getElementById("main").append(s);
    document.getElementById("nav").append(el("a", { href: "#" + id, text: title }));
    return s;
  }
  function plot(div, traces, layout) {
    const full = Object.assign({ font: FONT, margin: { l: 60, r: 20, t: 40, b: 50 }, paper_bgcolor: "#fff",
                                 plot_bgcolor: "#fff", xaxis: {}, yaxis: {} }, layout);
    // plotly's default ("hide past div") measures every tick label's box, forcing a layout each (~40% of the
    // drawing time of the 48 × 128 page); the labels stay inside the margins anyway
    for (const k of Object.keys(full)) if (/^[xy]axis\d*$/.test(k)) full[k] = Object.assign({ ticklabeloverflow: "allow" }, full[k]);
    const done = Plotly.react(div, traces, full, CONFIG);
    pending.push(done);
    return done;
  }
  function viridis(t) {  // a few stops of viridis, linearly interpolated (t in [0, 1])
    const s = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    const x = Math.min(Math.max(t, 0), 1) * (s.length - 1), i = Math.min(Math.floor(x), s.length - 2), f = x - i;
    const c = s[i].map((v, k) => Math.round(v + f * (s[i + 1][k] - v)));
    return "rgb(" + c.join(",") + ")";
  }
  const S = () => DATA.stores[state.store];
  const pIndex = () => S().p_grid.indexOf(state.p);
  const typeLabel = (st, t) => st.type_names[t] + " (" + t + ")";
  function siteAxis(st) {
    const plain = st.site_labels.every((l, r) => l === String(r));
    return plain ? { title: { text: "layer" }, tick0: 0, dtick: Math.max(1, Math.ceil(st.layers / 24)) }
                 : { title: { text: "layer (site)" }, tickmode: "array", tickvals: st.site_labels.map((_, r) => r),
                     ticktext: st.site_labels };
  }

  // ---------------------------------------------------------------------------------------------- expert rows
  // one row per live expert (as moeprof.report.leaderboard_rows), at the selected store, type and p
  function expertRows() {
    const st = S(), t = state.type, pi = pIndex(), L = st.layers, E = st.experts, n = L * E;
    const mean = arr(state.store, t, "mean"), std = arr(state.store, t, "std"), z = arr(state.store, t, "z");
    const ex = st.experts_table, rec = st.per_type[t].critical_record;
    const crit = rec === null ? null : st.criticals[rec];
    const sched = st.schedules.length ? st.schedules[Math.min(state.schedule, st.schedules.length - 1)] : null;
    const rows = [];
    for (let l = 0; l < L; l++) for (let e = 0; e < E; e++) {
      if (!ex.live[l][e]) continue;
      const k = pi * n + l * E + e;
      const zv = z[k];
      rows.push({
        row: l, layer: st.site_labels[l], expert: e, tokens: ex.tokens[l][e], load: ex.load[l][e],
        utilization: ex.utilization[l][e], sparsity: mean[k], std: std[k], z: zv,
        outlier: isNum(zv) && Math.abs(zv) > 3.5,
        critical: crit && crit.per_expert_sparsity ? crit.per_expert_sparsity[l][e] : null,
        tolerance: crit && crit.tolerance_sparsity ? crit.tolerance_sparsity[l][e] : null,
        sched: sched ? sched.p[l][e] : undefined,
      });
    }
    return rows;
  }
  const COLUMNS = [
    { key: "layer", label: "layer", text: true, show: () => true, cell: (r) => r.layer },
    { key: "expert", label: "expert", show: (st) => st.is_moe, cell: (r) => String(r.expert) },
    { key: "tokens", label: "tokens", show: () => true, cell: (r) => count(r.tokens) },
    { key: "load", label: "load", show: (st) => st.is_moe, cell: (r) => isNum(r.load) ? (100 * r.load).toFixed(1) + "%" : "—" },
    { key: "utilization", label: "util", show: (st) => st.is_moe, cell: (r) => fmt(r.utilization, 2) },
    { key: "sparsity", label: "S@p", show: () => true, cell: (r) => fmt(r.sparsity) },
    { key: "std", label: "std", show: () => true, cell: (r) => fmt(r.std) },
    { key: "z", label: "z", show: (st) => st.is_moe, cell: (r) => fmtSigned(r.z, 2) + (r.outlier ? "!" : ""), cls: "z" },
    { key: "critical", label: "crit S", show: (st) => critOf(st) && critOf(st).per_expert_sparsity, cell: (r) => fmt(r.critical) },
    { key: "tolerance", label: "toler.", show: (st) => critOf(st) && critOf(st).tolerance_sparsity, cell: (r) => fmt(r.tolerance) },
    { key: "sched", label: "sched p", show: (st) => st.schedules.length > 0,
      cell: (r) => r.sched === null ? "dense" : fmt(r.sched, 3) },
  ];
  function critOf(st) { const k = st.per_type[state.type].critical_record; return k === null ? null : st.criticals[k]; }

  // filter syntax per column: "3" (equal; text: contains), ">0.5", "<=10", "2..5"
  function matcher(spec, text) {
    spec = spec.trim();
    if (!spec) return null;
    let m = spec.match(/^(-?[\d.eE+-]+)\s*\.\.\s*(-?[\d.eE+-]+)$/);
    if (m) { const a = +m[1], b = +m[2]; return (v) => isNum(v) && v >= a && v <= b; }
    m = spec.match(/^(<=|>=|<|>|=)\s*(-?[\d.eE+-]+)$/);
    if (m) {
      const x = +m[2];
      return { "<": (v) => v < x, ">": (v) => v > x, "<=": (v) => v <= x, ">=": (v) => v >= x, "=": (v) => v === x }[m[1]];
    }
    if (text || Number.isNaN(+spec)) { const s = spec.toLowerCase(); return (v) => String(v).toLowerCase().includes(s); }
    const x = +spec;
    return (v) => isNum(v) && Math.abs(v - x) < 1e-9;
  }
  function filteredRows(all) {
    const tests = [];
    for (const c of COLUMNS) {
      const f = matcher(state.filters[c.key] || "", c.text);
      if (f) tests.push([c.key === "sched" ? "sched" : c.key, f]);
    }
    let rows = (all || expertRows()).filter((r) => tests.every(([k, f]) => f(r[k])));
    const key = state.sortKey, dir = state.sortDir;
    rows.sort((a, b) => {
      let x = a[key], y = b[key];
      if (key === "layer") { x = a.row; y = b.row; }
      const nx = !isNum(x), ny = !isNum(y);
      if (nx !== ny) return nx ? 1 : -1;  // NaN last, either direction
      if (!nx && x !== y) return dir * (x - y);
      return a.row - b.row || a.expert - b.expert;
    });
    return rows;
  }

  // ---------------------------------------------------------------------------------------------- sections
  function renderSummary() {
    const s = section("summary", "Summary");
    s.prepend(el("h1", { text: document.title }));
    for (const st of DATA.stores) {
      const crit = st.criticals.map((c) => c.headline).filter(Boolean);
      const kv = el("table", { class: "kv" });
      const add = (k, v) => kv.append(el("tr", {}, el("th", { text: k }), el("td", {}, v)));
      add("model", st.model);
      add("file", st.file);
      add("shape", st.is_moe ? st.layers + " layers × " + st.experts + " experts" : st.layers + " layers (dense FFN)");
      if (st.parameters) add("parameters", params(st.parameters.total) + " total, " + params(st.parameters.active) + " active per token");
      add("tokens", count(st.tokens));
      add("data", st.data_sources.join(", ") || "—");
      add("types", st.types.map((t) => typeLabel(st, t)).join(", "));
      add("p-grid", st.p_grid.map((p) => String(p)).join(", ") + " (" + st.p_grid.length + " values)");
      add("critical records", crit.length ? el("div", {}, ...crit.map((h) => el("div", { text: h }))) : "none");
      add("schedules", st.schedules.length ? st.schedules.map((x) => x.name + " (" + x.type + ", " + x.rule + ")").join("; ") : "none");
      if (st.balance_line) add("expert load", st.balance_line);
      s.append(el("h3", { text: st.label }), kv);
    }
    s.dataset.stores = String(DATA.stores.length);
  }

  function renderLeaderboard() {
    const s = section("leaderboard", "Expert leaderboard");
    s.append(el("p", { class: "note", text: "One row per live expert at the selected type and p. Click a header to sort; " +
      "type in the boxes below the headers to filter (3, >0.5, <=10, 2..5; text columns: contains). S = top-p sparsity " +
      "(fraction of entries dropped), mean over vectors; load = share of the layer's routed tokens; util = load ÷ ideal; " +
      "z = robust z-score of S within its layer (|z| > 3.5 marked !)." }));
    const controls = el("div", { class: "pager" });
    const table = el("table", { class: "grid", id: "leaderboard-table" });
    const pager = el("div", { class: "pager" });
    s.append(controls, table, pager);
    s._draw = () => drawLeaderboard(s, table, pager, controls);
    s._draw();
  }
  function drawLeaderboard(s, table, pager, controls) {
    const st = S(), cols = COLUMNS.filter((c) => c.show(st));
    controls.replaceChildren();
    if (st.schedules.length > 1) {
      const sel = el("select", { id: "sel-schedule", onchange: (ev) => { state.schedule = +ev.target.value; s._draw(); } },
        ...st.schedules.map((x, k) => el("option", { value: k, text: x.name })));
      sel.value = String(state.schedule);
      controls.append(el("label", {}, "sched p from ", sel));
    }
    const head = el("tr", {}), filt = el("tr", { class: "filters" });
    for (const c of cols) {
      const arrow = state.sortKey === c.key ? (state.sortDir < 0 ? " ▼" : " ▲") : "";
      head.append(el("th", { class: "sortable" + (c.text ? " text" : ""), "data-key": c.key, onclick: () => {
        if (state.sortKey === c.key) state.sortDir = -state.sortDir; else { state.sortKey = c.key; state.sortDir = c.text || c.key === "expert" ? 1 : -1; }
        state.page = 0; s._draw();
      } }, c.key === "sparsity" ? "S@" + state.p : c.label, el("span", { class: "arrow", text: arrow })));
      const input = el("input", { type: "text", "data-key": c.key, placeholder: "filter", value: state.filters[c.key] || "" });
      input.addEventListener("change", () => { state.filters[c.key] = input.value; state.page = 0; s._draw(); });
      filt.append(el("th", {}, input));
    }
    const all = expertRows(), rows = filteredRows(all), total = all.length;
    const pages = Math.max(1, Math.ceil(rows.length / PAGE_ROWS));
    state.page = Math.min(state.page, pages - 1);
    const shown = rows.slice(state.page * PAGE_ROWS, (state.page + 1) * PAGE_ROWS);
    const body = el("tbody");
    for (const r of shown) {
      const tr = el("tr", { class: r.outlier ? "outlier" : "" });
      for (const c of cols) tr.append(el("td", { class: (c.text ? "text " : "") + (c.cls || ""), text: c.cell(r) }));
      body.append(tr);
    }
    table.replaceChildren(el("thead", {}, head, filt), body);
    pager.replaceChildren(
      el("button", { text: "◀", onclick: () => { state.page = Math.max(0, state.page - 1); s._draw(); } }),
      el("span", { text: "page " + (state.page + 1) + " of " + pages + " · " + rows.length + " of " + total +
        " experts match" + (rows.length ? " (showing " + (state.page * PAGE_ROWS + 1) + "–" + (state.page * PAGE_ROWS + shown.length) + ")" : "") }),
      el("button", { text: "▶", onclick: () => { state.page = Math.min(pages - 1, state.page + 1); s._draw(); } }));
    s.dataset.rowsTotal = String(total);
    s.dataset.rowsMatched = String(rows.length);
    s.dataset.rowsShown = String(shown.length);
  }

  function heatmapTraces() {
    const st = S(), t = state.type, pi = pIndex(), L = st.layers, E = st.experts, n = L * E;
    const mean = arr(state.store, t, "mean"), std = arr(state.store, t, "std"), z = arr(state.store, t, "z");
    const ex = st.experts_table, crit = critOf(st);
    const sched = st.schedules.length ? st.schedules[Math.min(state.schedule, st.schedules.length - 1)] : null;
    const zz = [], dead = [], info = [];
    let lo = Infinity, hi = -Infinity, cells = 0, deadCells = 0;
    for (let l = 0; l < L; l++) {
      const zr = [], dr = [], ir = [];
      for (let e = 0; e < E; e++) {
        const k = pi * n + l * E + e, live = ex.live[l][e], v = mean[k];
        zr.push(live && isNum(v) ? v : null);
        dr.push(ex.dead[l][e] ? 1 : null);
        if (live && isNum(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); cells++; }
        if (ex.dead[l][e]) deadCells++;
        ir.push([st.site_labels[l], count(ex.tokens[l][e]), isNum(ex.load[l][e]) ? (100 * ex.load[l][e]).toFixed(1) + "%" : "—",
                 fmt(ex.utilization[l][e], 2), fmt(v), fmt(std[k]), fmtSigned(z[k], 2),
                 crit && crit.per_expert_sparsity ? fmt(crit.per_expert_sparsity[l][e]) : "—",
                 crit && crit.tolerance_sparsity ? fmt(crit.tolerance_sparsity[l][e]) : "—",
                 sched ? (sched.p[l][e] === null ? "dense" : fmt(sched.p[l][e])) : "—"]);
      }
      zz.push(zr); dead.push(dr); info.push(ir);
    }
    if (!(hi > lo)) { lo = Math.max((isFinite(lo) ? lo : 0.5) - 0.05, 0); hi = Math.min((isFinite(hi) ? hi : 0.5) + 0.05, 1); }
    const hover = "layer %{customdata[0]}, expert %{x}<br>tokens %{customdata[1]}<br>load %{customdata[2]}, util %{customdata[3]}" +
      "<br>S@" + state.p + " %{customdata[4]} (std %{customdata[5]})<br>z %{customdata[6]}<br>crit S %{customdata[7]}, toler. %{customdata[8]}" +
      "<br>sched p %{customdata[9]}<extra></extra>";
    const traces = [
      // hoverongaps false on both traces: each cell answers from the one trace that holds it (plotly's default
      // would let the grey overlay's empty cells answer "dead" over every live expert)
      { type: "heatmap", z: zz, customdata: info, hovertemplate: hover, colorscale: "Viridis", zmin: lo, zmax: hi,
        colorbar: { title: { text: "S@" + state.p, side: "right" } }, xgap: 0, ygap: 0, hoverongaps: false },
    ];
    if (deadCells) traces.push({ type: "heatmap", z: dead, customdata: info, showscale: false, colorscale: [[0, DEAD_COLOR], [1, DEAD_COLOR]],
      hoverongaps: false, hovertemplate: "layer %{customdata[0]}, expert %{x}: dead (0 tokens)<extra></extra>" });
    return { traces, cells, deadCells, lo, hi };
  }
  function renderHeatmap() {
    const s = section("heatmap", "Layer × expert heatmap");
    const note = el("p", { class: "note" });
    const div = el("div", { class: "plot", id: "heatmap-plot" });
    s.append(note, div);
    s._draw = () => {
      const st = S(), h = heatmapTraces();
      const height = Math.min(Math.max(260, 14 * st.layers + 120), 900);
      plot(div, h.traces, { height: height, xaxis: { title: { text: st.is_moe ? "expert" : "(dense FFN)" }, tick0: 0, dtick: Math.max(1, Math.ceil(st.experts / 32)) },
        yaxis: siteAxis(st), title: { text: st.name + ": top-p sparsity of " + typeLabel(st, state.type) + " at p = " + state.p, font: { size: 14 } } });
      note.textContent = "Colour range = the live experts' range " + fmt(h.lo) + "–" + fmt(h.hi) + " (not 0–1)" +
        (h.deadCells ? "; grey: " + h.deadCells + " dead expert(s), routed 0 tokens" : "") +
        ". Hover a cell for every leaderboard column of that expert; change p and type in the bar above.";
      s.dataset.cells = String(h.cells + h.deadCells);
      s.dataset.liveCells = String(h.cells);
    };
    s._draw();
  }

  function renderCurves() {
    const s = section("curves", "Sparsity vs p");
    s.append(el("p", { class: "note", text: "Per type: the token-weighted curve (bold), the " + S().band[0] + "–" + S().band[1] +
      "th percentile band of the live experts' mean sparsity (shaded), and one thin line per layer (colour: depth, dark = first layers, yellow = last)." }));
    const box = el("div", { class: "plots" });
    s.append(box);
    s._draw = () => {
      const st = S(), L = st.layers;
      box.replaceChildren();
      let lines = 0;
      for (const t of st.types) {
        const d = st.per_type[t], div = el("div", { class: "plot", "data-type": t });
        div.style.width = st.types.length > 1 ? "calc(50% - 8px)" : "100%";
        div.style.minWidth = "420px";
        box.append(div);
        const traces = [
          { x: st.p_grid, y: d.curve.hi, mode: "lines", line: { width: 0 }, hoverinfo: "skip", showlegend: false },
          { x: st.p_grid, y: d.curve.lo, mode: "lines", line: { width: 0 }, fill: "tonexty", fillcolor: "rgba(43,108,176,0.2)",
            name: st.band[0] + "–" + st.band[1] + "th pct", hoverinfo: "skip" },
        ];
        // one trace per colour group of layers (lines split by nulls): a trace per layer is slow at 48 layers
        const groups = Math.min(L, 8);
        for (let g = 0; g < groups; g++) {
          const xs = [], ys = [], texts = [];
          for (let l = 0; l < L; l++) {
            if (Math.floor(l * groups / L) !== g || !d.layer_lines[l].some(isNum)) continue;
            xs.push(...st.p_grid, null); ys.push(...d.layer_lines[l], null);
            texts.push(...st.p_grid.map(() => "layer " + st.site_labels[l]), null);
            lines++;
          }
          traces.push({ x: xs, y: ys, text: texts, mode: "lines", line: { width: 1, color: viridis(groups > 1 ? g / (groups - 1) : 0) },
            opacity: 0.6, showlegend: g === 0, name: "per layer", connectgaps: false,
            hovertemplate: "%{text}: p %{x}, S %{y:.3f}<extra></extra>" });
        }
        traces.push({ x: st.p_grid, y: d.curve.mean, mode: "lines+markers", line: { width: 3, color: "#111" }, marker: { size: 5 },
          name: "token-weighted", hovertemplate: "p %{x}: S %{y:.3f}<extra>token-weighted</extra>" });
        plot(div, traces, { height: 340, title: { text: typeLabel(st, t), font: { size: 13 } },
          xaxis: { title: { text: "p (fraction of L1 mass kept)" } }, yaxis: { title: { text: "sparsity" }, range: [0, 1] },
          legend: { orientation: "h", y: -0.25 } });
      }
      s.dataset.plots = String(st.types.length);
      s.dataset.layerLines = String(lines);
    };
    s._draw();
  }

  function renderLayers() {
    const s = section("layers", "Per-layer expert load");
    const note = el("p", { class: "note" });
    const div = el("div", { class: "plot" });
    s.append(note, div);
    s._draw = () => {
      const st = S(), m = st.layer_metrics, x = st.site_labels.map((_, r) => r);
      if (!st.is_moe) { note.textContent = st.label + " is a dense model: no expert load."; Plotly.purge(div); s.dataset.traces = "0"; return; }
      const traces = [
        { x, y: m.jain, name: "Jain", mode: "lines+markers" },
        { x, y: m.perplexity_frac, name: "e^H / E", mode: "lines+markers" },
        { x, y: m.entropy_norm, name: "H / log E", mode: "lines+markers" },
        { x, y: m.dead_frac, name: "dead fraction", mode: "lines+markers" },
        { x, y: m.load_cv, name: "CV (right axis)", mode: "lines+markers", yaxis: "y2", line: { dash: "dot" } },
      ];
      plot(div, traces, { height: 360, margin: { l: 60, r: 80, t: 40, b: 50 }, xaxis: siteAxis(st), yaxis: { title: { text: "fraction (1 = balanced)" }, range: [0, 1.05] },
        yaxis2: { title: { text: "CV of tokens per expert" }, overlaying: "y", side: "right", rangemode: "tozero" },
        legend: { orientation: "h", y: -0.2 }, title: { text: st.name + ": expert load per layer", font: { size: 13 } } });
      note.textContent = "Jain = (Σt)² / (E·Σt²), 1 = balanced, 1/E = one expert; e^H/E = fraction of experts effectively used; " +
        "CV = std / mean tokens per expert; dead = experts routed 0 tokens. " + (st.balance_line || "");
      s.dataset.traces = String(traces.length);
    };
    s._draw();
  }

  function renderCritical() {
    const s = section("critical", "Critical sparsity search");
    const box = el("div");
    s.append(box);
    s._draw = () => {
      const st = S();
      box.replaceChildren();
      let evals = 0;
      if (!st.criticals.length) box.append(el("p", { class: "note", text: st.label + " holds no critical search (run `moeprof critical`)." }));
      st.criticals.forEach((c, k) => {
        const a = c.attrs, pts = c.points, n = (pts.p || []).length;
        const div = el("div", { class: "plot" });
        const passed = pts.passed || (pts.ratio || []).map((r) => r >= (a.target || 0.99));
        const idx = [...Array(n).keys()];
        const traces = [
          { x: idx.filter((i) => passed[i]).map((i) => pts.sparsity_token[i]), y: idx.filter((i) => passed[i]).map((i) => pts.ratio[i]),
            text: idx.filter((i) => passed[i]).map((i) => "p=" + fmt(pts.p[i], 4)), mode: "markers", name: "passed",
            marker: { color: "#2ca02c", size: 9 }, hovertemplate: "%{text}<br>S %{x:.3f}, ratio %{y:.4f}<extra>passed</extra>" },
          { x: idx.filter((i) => !passed[i]).map((i) => pts.sparsity_token[i]), y: idx.filter((i) => !passed[i]).map((i) => pts.ratio[i]),
            text: idx.filter((i) => !passed[i]).map((i) => "p=" + fmt(pts.p[i], 4)), mode: "markers", name: "failed",
            marker: { color: "#d62728", size: 9 }, hovertemplate: "%{text}<br>S %{x:.3f}, ratio %{y:.4f}<extra>failed</extra>" },
        ];
        if (isNum(a.critical_p)) {
          const star = { x: [a.critical_sparsity_token], y: [isNum(a.critical_ratio) ? a.critical_ratio : null], mode: "markers",
            name: "p* = " + a.critical_p, marker: { symbol: "star", size: 16, color: "gold", line: { color: "#000", width: 1 } } };
          if (isNum(a.ratio_ci_low) && isNum(a.ratio_ci_high) && isNum(a.critical_ratio))
            star.error_y = { type: "data", symmetric: false, array: [a.ratio_ci_high - a.critical_ratio],
                             arrayminus: [a.critical_ratio - a.ratio_ci_low], color: "#444" };
          traces.push(star);
        }
        const shapes = isNum(a.target) ? [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: a.target, y1: a.target, line: { dash: "dash", color: "#555", width: 1 } }] : [];
        box.append(el("h3", { text: (a.task || "?") + ": " + (a.type || "?") + " (" + (a.rule || "?") + ")" }),
                   el("p", { class: "note", text: c.headline + (c.ci ? "; " + c.ci : "") }));
        for (const w of c.warnings) box.append(el("p", { class: "note warn", text: "⚠ " + w }));
        const tbl = el("table", { class: "grid critical-evals" });
        tbl.append(el("tr", {}, ...["#", "p", "score", "ratio", "S (tok)", "S (FLOP)", "pass"].map((h) => el("th", { text: h }))));
        tbl.append(el("tr", {}, ...["1", "dense", fmt(a.dense_score, 5), "1.0000", "—", "—", "dense"].map((v) => el("td", { text: v }))));
        for (let i = 0; i < n; i++)
          tbl.append(el("tr", {}, ...[String(i + 2), fmt(pts.p[i], 4), fmt(pts.score[i], 5), fmt(pts.ratio[i], 4),
            fmt(pts.sparsity_token[i]), fmt(pts.sparsity_flop ? pts.sparsity_flop[i] : null), passed[i] ? "yes" : "no"].map((v) => el("td", { text: v }))));
        div.style.width = "620px";
        box.append(el("div", { class: "row" }, div, tbl));
        plot(div, traces, { height: 380, shapes, xaxis: { title: { text: "realized sparsity (token-weighted)" } },
          yaxis: { title: { text: "score ÷ dense score" } }, legend: { orientation: "h", y: -0.25 },
          title: { text: n + " sparse evaluations (+ dense)", font: { size: 13 } } });
        evals += n + 1;
      });
      s.dataset.records = String(st.criticals.length);
      s.dataset.evaluations = String(evals);
    };
    s._draw();
  }

  function renderSchedules() {
    const s = section("schedule", "Schedules");
    const box = el("div");
    s.append(box);
    s._draw = () => {
      const st = S();
      box.replaceChildren();
      let cells = 0;
      if (!st.schedules.length) box.append(el("p", { class: "note", text: st.label + " has no schedule (give --schedule S.json, or store one with `moeprof schedule --from`)." }));
      for (const x of st.schedules) {
        const tau = x.rule === "threshold", div = el("div", { class: "plot" });
        box.append(el("h3", { text: x.name + ": " + x.type + ", rule " + x.rule + " (" + x.source + ")" }));
        box.append(el("p", { class: "note", text: (x.method ? "method: " + x.method + "; " : "") +
          (100 * (x.dense_fraction || 0)).toFixed(1) + "% of the table dense (grey)" + (isNum(x.sparsity_flop) ? "; FLOP-weighted sparsity on calibration " + fmt(x.sparsity_flop) : "") }));
        if (x.verdict.length) box.append(el("ul", { class: "verdict" }, ...x.verdict.map((v) => el("li", { class: /MISSES|below/.test(v) ? "warn" : "", text: v }))));
        else box.append(el("p", { class: "note", text: "no verdict in its provenance (a uniform or hand-made schedule)" }));
        box.append(div);
        const dense = x.p.map((row, l) => row.map((v, e) => (v === null && st.experts_table.slot[l][e]) ? 1 : null));
        let n = 0;
        for (const row of x.p) for (const v of row) n++;
        cells += n;
        plot(div, [
          { type: "heatmap", z: x.p, colorscale: "Viridis", reversescale: true, colorbar: { title: { text: tau ? "τ" : "p", side: "right" } },
            hoverongaps: false, hovertemplate: "layer %{y}, expert %{x}: " + (tau ? "τ" : "p") + " %{z:.4f}<extra></extra>" },
          { type: "heatmap", z: dense, showscale: false, colorscale: [[0, DEAD_COLOR], [1, DEAD_COLOR]], hoverongaps: false,
            hovertemplate: "layer %{y}, expert %{x}: dense<extra></extra>" },
        ], { height: Math.min(Math.max(240, 12 * x.p.length + 120), 800), xaxis: { title: { text: "expert" } }, yaxis: { title: { text: "layer" } },
             title: { text: "scheduled " + (tau ? "τ" : "p") + " of " + x.type, font: { size: 13 } } });
      }
      s.dataset.schedules = String(st.schedules.length);
      s.dataset.cells = String(cells);
    };
    s._draw();
  }

  function renderTexts() {
    const s = section("texts", "Expert load by text");
    s.append(el("p", { class: "note", text: "Several stores of one MoE, each profiled on its own text: the share of each text's " +
      "routed tokens per expert (a row sums to 1), and the mutual information between text and expert choice per layer." }));
    DATA.texts.forEach((g, k) => {
      const D = g.texts.length, L = g.share[0].length, E = g.share[0][0].length;
      const sel = el("select", { "data-group": k }, ...g.site_labels.map((lab, l) => el("option", { value: l, text: "layer " + lab })));
      const heat = el("div", { class: "plot" }), mi = el("div", { class: "plot" });
      heat.style.width = "62%"; mi.style.width = "36%";
      const meanMi = g.mi_bits.filter(isNum).reduce((a, b) => a + b, 0) / Math.max(1, g.mi_bits.filter(isNum).length);
      s.append(el("h3", { text: g.name + " on " + D + " texts: mean MI " + fmt(meanMi) + " bits of H(text) = " + fmt(g.domain_entropy_bits[0]) + " bits" }), el("label", {}, "layer ", sel),
               el("div", { class: "row" }, heat, mi));
      const draw = () => {
        const l = +sel.value;
        plot(heat, [{ type: "heatmap", z: g.share.map((d) => d[l]), y: g.texts, colorscale: "Magma", zmin: 0,
          colorbar: { title: { text: "share", side: "right" } },
          hovertemplate: "%{y}, expert %{x}: %{z:.4f} of the text's routed tokens<extra></extra>" }],
          { height: Math.max(220, 40 * D + 120), margin: { l: 160, r: 20, t: 40, b: 50 }, xaxis: { title: { text: "expert" } },
            title: { text: "layer " + g.site_labels[l] + ": MI " + fmt(g.mi_bits[l]) + " bits (" + fmt(100 * g.mi_frac[l], 0) + "% of H(text)); uniform " + fmt(1 / E), font: { size: 13 } } });
        s.dataset.cells = String(D * E);
      };
      sel.addEventListener("change", draw);
      draw();
      plot(mi, [{ x: g.site_labels.map((_, r) => r), y: g.mi_bits, type: "bar", name: "MI (bits)",
        hovertemplate: "layer %{x}: %{y:.4f} bits<extra></extra>" }],
        { height: Math.max(220, 40 * D + 120), xaxis: { title: { text: "layer" } }, yaxis: { title: { text: "MI (bits)" } },
          title: { text: "MI(text; expert) per layer", font: { size: 13 } } });
    });
    s.dataset.groups = String(DATA.texts.length);
  }

  function renderCompare() {
    const c = DATA.compare, s = section("compare", "Models compared");
    const types = ["x", "u", "g", "i"].filter((t) => c.rows.some((r) => t in r.sparsity));
    s.append(el("p", { class: "note", text: c.p === null ? "The stores share no p value: the table shows no S column." :
      "S_t = fraction of entries top-p drops at p = " + c.p + ", mean over every vector of the model; critical S: largest realized sparsity keeping ≥ target × dense score (token / FLOP-weighted)." }));
    const tbl = el("table", { class: "grid", id: "compare-table" });
    tbl.append(el("tr", {}, ...["model", "params", "active", ...types.map((t) => "S_" + t), "critical S (tok / flop)"].map((h) => el("th", { class: h === "model" ? "text" : "", text: h }))));
    c.rows.forEach((r, k) => {
      const cr = r.critical;
      tbl.append(el("tr", {}, el("td", { class: "text", text: c.labels[k] }), el("td", { text: params(r.params_total) }), el("td", { text: params(r.params_active) }),
        ...types.map((t) => el("td", { text: t in r.sparsity ? fmt(r.sparsity[t]) : "—" })),
        el("td", { text: cr ? cr.type + ": " + fmt(cr.sparsity_token) + " / " + fmt(cr.sparsity_flop) + " (p=" + cr.critical_p + ", " + cr.task + ")" : "—" })));
    });
    const box = el("div", { class: "plots" });
    s.append(tbl, box);
    let plots = 0;
    for (const t of types) {
      const div = el("div", { class: "plot" });
      div.style.width = "calc(50% - 8px)"; div.style.minWidth = "420px";
      box.append(div);
      const traces = [];
      DATA.stores.forEach((st, k) => {
        if (!(t in st.per_type)) return;
        traces.push({ x: st.p_grid, y: st.per_type[t].curve.mean, mode: "lines+markers", name: st.label });
      });
      plot(div, traces, { height: 360, margin: { l: 60, r: 20, t: 40, b: 90 }, title: { text: "sparsity vs p: " + t, font: { size: 13 } },
        xaxis: { title: { text: "p" } }, yaxis: { title: { text: "sparsity (token-weighted)" }, range: [0, 1] },
        legend: { orientation: "h", y: -0.3 } });
      plots++;
    }
    const withParams = c.rows.filter((r) => r.params_active);
    if (withParams.length && c.p !== null) {
      const div = el("div", { class: "plot" });
      div.style.width = "calc(50% - 8px)"; div.style.minWidth = "420px";
      box.append(div);
      plot(div, types.map((t) => {
        const pts = c.rows.map((r, k) => [r.params_active, r.sparsity[t], c.labels[k]]).filter((q) => q[0] && q[1] !== undefined).sort((a, b) => a[0] - b[0]);
        return { x: pts.map((q) => q[0]), y: pts.map((q) => q[1]), text: pts.map((q) => q[2]), mode: "lines+markers", name: t,
                 hovertemplate: "%{text}: %{y:.3f}<extra>" + t + "</extra>" };
      }), { height: 330, title: { text: "sparsity at p = " + c.p + " vs active parameters", font: { size: 13 } },
            xaxis: { type: "log", title: { text: "active parameters per token" } }, yaxis: { title: { text: "sparsity" } } });
      plots++;
    }
    s.dataset.rows = String(c.rows.length);
    s.dataset.plots = String(plots);
  }

  // ---------------------------------------------------------------------------------------------- controls
  const perStore = [];
  function fillControls() {
    const st = S();
    const selType = document.getElementById("sel-type"), selP = document.getElementById("sel-p");
    if (!st.types.includes(state.type)) state.type = st.default_type;
    if (!st.p_grid.includes(state.p)) state.p = st.default_p;
    selType.replaceChildren(...st.types.map((t) => el("option", { value: t, text: typeLabel(st, t) })));
    selType.value = state.type;
    selP.replaceChildren(...st.p_grid.map((p) => el("option", { value: String(p), text: String(p) })));
    selP.value = String(state.p);
  }
  function redraw(which) { for (const s of which) if (s && s._draw) s._draw(); }

  // performance.measure("moeprof-<step>") around each step of the first drawing (benchmarks/report/scale.py reads them)
  function timed(name, f) { const t = performance.now(), r = f(); performance.measure("moeprof-" + name, { start: t }); return r; }

  // The first screen (summary, leaderboard, heatmap) is drawn in one task; each later section in a task of its
  // own, so the browser paints the first screen and answers input while the rest is drawn. "ready" (readyMs,
  // body[data-ready]) = every section drawn and every plot's promise settled.
  const nextTask = () => new Promise((resolve) => setTimeout(resolve, 0));
  async function init() {
    const selStore = document.getElementById("sel-store");
    selStore.replaceChildren(...DATA.stores.map((st, k) => el("option", { value: k, text: st.label })));
    if (DATA.stores.length < 2) document.getElementById("store-pick").style.display = "none";
    fillControls();
    timed("summary", renderSummary);
    const lb = timed("leaderboard", renderLeaderboardSection), hm = timed("heatmap", renderHeatmapSection);
    selStore.addEventListener("change", () => { state.store = +selStore.value; state.page = 0; state.schedule = 0; fillControls(); redraw([lb, hm, ...perStore]); });
    document.getElementById("sel-type").addEventListener("change", (ev) => { state.type = ev.target.value; state.page = 0; redraw([lb, hm]); });
    document.getElementById("sel-p").addEventListener("change", (ev) => { state.p = +ev.target.value; state.page = 0; redraw([lb, hm]); });
    window.moeprof.firstScreenMs = performance.now();
    const later = [["curves", renderCurves, true]];
    if (DATA.stores.some((st) => st.is_moe)) later.push(["layers", renderLayers, true]);
    if (DATA.stores.some((st) => st.criticals.length)) later.push(["critical", renderCritical, true]);
    if (DATA.stores.some((st) => st.schedules.length)) later.push(["schedule", renderSchedules, true]);
    if (DATA.texts.length) later.push(["texts", renderTexts, false]);
    if (DATA.compare) later.push(["compare", renderCompare, false]);
    for (const [name, render, followsStore] of later) {
      await nextTask();
      timed(name, render);
      if (followsStore) perStore.push(document.getElementById(name));
    }
    return Promise.all(pending);
  }
  function renderLeaderboardSection() { renderLeaderboard(); return document.getElementById("leaderboard"); }
  function renderHeatmapSection() { renderHeatmap(); return document.getElementById("heatmap"); }

  window.moeprof = { data: DATA, decode, state, expertRows, filteredRows,
                     select(kind, value) { const s = document.getElementById("sel-" + kind); s.value = String(value); s.dispatchEvent(new Event("change")); } };
  init().then(() => {
    window.moeprof.readyMs = performance.now();
    document.body.dataset.ready = "1";
  }, (err) => { console.error("moeprof report: " + err); });
})();

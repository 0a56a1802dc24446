"""`moeprof report`: the page's embedded numbers equal the store's typed readers, and the page works in a real
headless Chromium (from disk, network off): no console error, every section drawn with the expected number of
heatmap cells, table rows and lines; one screenshot per section under outputs/report-test/.

The study: an MoE profiled on two texts (two stores: load by text), one of them with a critical search and a
stored schedule, a schedule file given with --schedule, and a dense model (the comparison of models). Stores are
random activations written through the store's own writer (`ProfileStats` -> `write_profile`).

Needs Debian's `chromium` (CI installs it; README "Tests"): without it the browser tests fail, they never skip.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import moeprof.report.html as html_module
from moeprof.cli import main
from moeprof.report.browser import Browser, find_browser
from moeprof.report.html import ReportError, decode_array, embedded_data, is_report, render, write_report
from moeprof.report.leaderboard import layer_summary_rows, leaderboard_rows, live_dead
from moeprof.report.plots import sparsity_curve
from moeprof.schedule import Schedule
from moeprof.stats import ProfileStats, VectorSummary
from moeprof.store import Critical, ProfileMeta, open_store, write_critical, write_profile, write_schedule

P_GRID = (0.5, 0.8, 0.9, 0.95)
L, E, K = 4, 6, 2
SHOTS = Path("outputs/report-test")
SECTIONS = ("summary", "leaderboard", "heatmap", "curves", "layers", "critical", "schedule", "texts", "compare")


def _store(path, *, model: str, source: str, layers: int, experts: int, types=("x", "i"), seed: int = 0):
    """Random activations; expert e of layer l sees |N(0,1)|^a vectors (a per expert); the last expert of layer 0
    is never routed (dead)."""
    g = torch.Generator().manual_seed(seed)
    stats = ProfileStats(layers, experts, P_GRID, types)
    tokens = 40
    for l in range(layers):
        if experts > 1:
            scores = torch.randn(tokens, experts, generator=g) + torch.linspace(1.0, 0.0, experts)
            if l == 0:
                scores[:, -1] = -1e9
            ids = scores.topk(K, dim=-1).indices  # [T, K]
            stats.routing.add(l, ids, None)
            ids = ids.reshape(-1)
        else:
            ids = torch.zeros(tokens, dtype=torch.long)
            stats.routing.add(l, ids[:, None], None)
        alpha = 1.0 + 2.0 * torch.rand(experts, generator=g)
        for t in types:
            v = torch.randn(ids.numel(), 16, generator=g).abs() ** alpha[ids][:, None]
            stats.activations[t].add(l, ids, VectorSummary.of(v, P_GRID))
    meta = ProfileMeta(model=model, model_type="test", architecture="Test", is_moe=experts > 1, top_k=K,
                       hidden_size=16, model_config={"hidden_size": 16}, data_sources=[source], tokens=tokens,
                       seq_len=tokens, batch_size=1, dtype="float32", device="cpu")
    return write_profile(path, stats, meta, intermediate_sizes=[16] * layers,
                         site_kinds=["moe" if experts > 1 else "dense"] * layers)


def _critical(path) -> None:
    ps = np.array([0.9, 0.7, 0.8, 0.85])
    s, r = 1 - ps ** 1.5, 1 - 0.08 * (1 - ps ** 1.5) ** 2
    rng = np.random.default_rng(1)
    write_critical(path, Critical.from_items(
        dict(type="i", rule="topp", task="ppl:test", target=0.99, critical_p=0.8, critical_sparsity_token=float(s[2]),
             critical_sparsity_flop=float(s[2]), dense_score=0.05, critical_score=float(0.05 * r[2]),
             critical_ratio=float(r[2]), ratio_ci_low=float(r[2] - 0.002), ratio_ci_high=float(r[2] + 0.002),
             ci_level=0.95, num_evaluations=5),
        {"per_expert_sparsity": rng.uniform(0.2, 0.6, (L, E)), "tolerance_sparsity": rng.uniform(0.1, 0.8, (L, E)),
         "points/p": ps, "points/score": 0.05 * r, "points/ratio": r, "points/sparsity_token": s,
         "points/sparsity_flop": s, "points/passed": r >= 0.99}))


def _schedule(seed: int, provenance=None) -> Schedule:
    table = np.round(np.random.default_rng(seed).uniform(0.7, 0.95, (L, E)), 3)
    table[0, 0] = np.nan
    return Schedule(table, "i", "topp", "test/moe", provenance=provenance or {})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    wiki = _store(root / "moe-wiki.h5", model="test/moe", source="wikipedia:heldout", layers=L, experts=E, seed=0)
    code = _store(root / "moe-code.h5", model="test/moe", source="code:heldout", layers=L, experts=E, seed=1)
    dense = _store(root / "dense.h5", model="test/dense", source="wikipedia:heldout", layers=3, experts=1, seed=2)
    _critical(wiki)
    write_schedule(wiki, "stored", _schedule(3))
    sched_file = _schedule(4, {"method": "test", "target": 0.99, "heldout_ratio": 0.9862,
                               "heldout_ratio_ci": [0.9829, 0.9896], "sparsity_flop": 0.41, "anchor_p": 0.85,
                               "anchor_sparsity_flop": 0.38, "chosen": "multiplier"}).save(root / "s.json")
    page = write_report([wiki, code, dense], root / "report.html", schedules=[sched_file])
    return {"wiki": wiki, "code": code, "dense": dense, "schedule": sched_file, "page": page}


# ------------------------------------------------------------------------------------------------ the JSON


def test_embedded_arrays_equal_the_typed_readers(study):
    data = embedded_data(study["page"].read_text())
    for path, d in zip((study["wiki"], study["code"], study["dense"]), data["stores"]):
        with open_store(path) as st:
            assert d["model"] == st.model and d["p_grid"] == st.p_grid.tolist() and d["types"] == st.types
            live, dead = live_dead(st)
            ex = d["experts_table"]
            assert np.array_equal(ex["tokens"], st.routing().tokens)
            assert np.array_equal(ex["dead"], dead) and np.array_equal(ex["live"], live)
            bal = st.balance()
            np.testing.assert_array_equal(np.array(ex["utilization"], dtype=float), bal.utilization)
            np.testing.assert_array_equal(np.array(ex["load"], dtype=float), np.where(live, bal.load_share, np.nan))
            for k in ("jain", "load_cv", "perplexity_frac", "dead_frac"):
                np.testing.assert_array_equal(np.array(d["layer_metrics"][k], dtype=float), getattr(bal, k))
            for t in st.types:
                sp, pt = st.sparsity(t), d["per_type"][t]
                mean = np.moveaxis(decode_array(pt["mean"]), 0, -1)  # [L, E, P]
                std = np.moveaxis(decode_array(pt["std"]), 0, -1)
                assert np.array_equal(np.isnan(mean), np.isnan(sp.mean))
                np.testing.assert_allclose(mean, sp.mean, atol=0.5 / 65534, rtol=0)
                np.testing.assert_allclose(std, sp.std, atol=0.5 / 65534, rtol=0)
                z = np.moveaxis(decode_array(pt["z"]), 0, -1)
                want = np.where(live[:, :, None], st.outliers(t).sparsity_z, np.nan).astype(np.float16)
                np.testing.assert_array_equal(z, want.astype(np.float64))
                _, curve, lo, hi = sparsity_curve(st, t)
                np.testing.assert_array_equal(np.array(pt["curve"]["mean"], dtype=float), curve)
                np.testing.assert_array_equal(np.array(pt["curve"]["lo"], dtype=float), lo)
                np.testing.assert_array_equal(np.array(pt["curve"]["hi"], dtype=float), hi)
                for j, p in enumerate(st.p_grid):  # per-layer lines = the layer summary's S at every p
                    ref = [r["weighted_sparsity"] for r in layer_summary_rows(st, t, float(p))]
                    np.testing.assert_allclose(np.array(pt["layer_lines"], dtype=float)[:, j], ref, rtol=1e-12)
            assert len(d["criticals"]) == len(st.criticals())
            for rec, page_rec in zip(st.criticals(), d["criticals"]):
                for k, v in rec.points.items():
                    np.testing.assert_array_equal(np.array(page_rec["points"][k], dtype=v.dtype), v)
                np.testing.assert_array_equal(np.array(page_rec["per_expert_sparsity"], dtype=float),
                                              rec.per_expert_sparsity)
    wiki = data["stores"][0]
    assert [s["name"] for s in wiki["schedules"]] == ["stored", "s"]
    with open_store(study["wiki"]) as st:
        stored = st.schedule("stored")
    for s, ref in zip(wiki["schedules"], (stored, Schedule.load(study["schedule"]))):
        np.testing.assert_array_equal(np.array(s["p"], dtype=float), ref.p)
    # a schedule of the MoE's shape goes to both of its stores, not to the dense model
    assert [s["name"] for s in data["stores"][1]["schedules"]] == ["s"] and data["stores"][2]["schedules"] == []


def test_schedule_verdict_says_held_out_miss_and_gain_over_uniform(study):
    verdict = embedded_data(study["page"].read_text())["stores"][0]["schedules"][1]["verdict"]
    assert verdict[0] == "held-out ratio 0.9862 (CI [0.9829, 0.9896]) MISSES the target 0.99"
    assert verdict[1] == "calibration: FLOP sparsity 0.410 vs uniform p 0.85 at 0.380 (+3.0 points); chosen: multiplier"


def test_load_by_text_and_comparison_come_from_the_report_functions(study):
    from moeprof.report.compare import compare_rows
    from moeprof.report.plots import text_routing

    data = embedded_data(study["page"].read_text())
    (group,) = data["texts"]
    assert group["texts"] == ["wikipedia:heldout", "code:heldout"]
    with open_store(study["wiki"]) as a, open_store(study["code"]) as b, open_store(study["dense"]) as c:
        counts, info = text_routing([a, b])
        np.testing.assert_array_equal(np.array(group["mi_bits"], dtype=float), info["mi_bits"])
        np.testing.assert_allclose(np.array(group["share"], dtype=float), counts / counts.sum(2, keepdims=True))
        rows = compare_rows([a, b, c], 0.9)
    assert data["compare"]["p"] == 0.9
    assert [r["sparsity"] for r in data["compare"]["rows"]] == [r["sparsity"] for r in rows]


def test_a_schedule_of_no_store_shape_is_refused(study, tmp_path):
    bad = Schedule(np.full((2, 2), 0.9), "i", "topp", "other").save(tmp_path / "bad.json")
    with pytest.raises(ReportError, match=r"no store has that shape"):
        write_report([study["wiki"]], tmp_path / "r.html", schedules=[bad])
    assert not (tmp_path / "r.html").exists()


def test_cli_writes_the_page_and_refuses_mistakes_in_one_line(study, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(study["wiki"]), "--schedule", str(study["schedule"]), "-o", str(out)]) == 0
    assert is_report(out) and "wrote" in capsys.readouterr().out
    assert main(["report", str(study["wiki"]), "-o", str(out)]) == 0  # its own page is replaced
    mine = tmp_path / "notes.html"
    mine.write_text("<p>my notes</p>")
    for argv, words in (([str(study["wiki"]), "-o", str(mine)], "is not a moeprof report"),
                        ([str(tmp_path / "none.h5"), "-o", str(out)], "does not exist"),
                        ([str(study["wiki"]), "-o", str(tmp_path / "r.txt")], "ending in .html")):
        assert main(["report", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert mine.read_text() == "<p>my notes</p>"


# ------------------------------------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def page(study):
    if find_browser() is None:
        pytest.fail("no Chromium: install Debian's chromium (apt-get install -y chromium); the report's browser "
                    "tests never skip")
    with Browser() as b:
        pg = b.open(study["page"], timeout_s=120)
        yield pg


def _data(page, section: str) -> dict:
    return json.loads(page.evaluate(f"JSON.stringify(document.getElementById({section!r}).dataset)"))


def test_page_loads_offline_without_errors_and_shows_every_section(page):
    assert page.errors == []
    assert page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)") == list(SECTIONS)
    SHOTS.mkdir(parents=True, exist_ok=True)
    for section in SECTIONS:
        shot = page.screenshot_element(f"#{section}", SHOTS / f"{section}.png")
        assert shot.stat().st_size > 5_000  # a drawn section, not an empty strip


def test_heatmap_has_one_cell_per_expert_and_follows_the_p_selector(page, study):
    with open_store(study["wiki"]) as st:
        live, dead = live_dead(st)
        mean = st.sparsity("i").mean
        assert _data(page, "heatmap")["cells"] == str(int(live.sum() + dead.sum()))
        for j, p in enumerate(st.p_grid):
            page.evaluate(f"window.moeprof.select('p', {float(p)})")
            z = np.array(page.evaluate("document.getElementById('heatmap-plot').data[0].z"), dtype=float)
            assert np.array_equal(np.isfinite(z), live)
            np.testing.assert_allclose(z[live], mean[:, :, j][live], atol=0.5 / 65534, rtol=0)
    page.evaluate("window.moeprof.select('p', 0.9)")


def _hover(page, selector: str, x: int, y: int) -> str:
    """Return the hover label plotly shows for the cell (x, y) of the plot at `selector`."""
    return page.evaluate(f"""(async () => {{ const gd = document.querySelector({selector!r});
        await new Promise(r => setTimeout(r, 100)); Plotly.Fx.hover(gd, {{ xval: {x}, yval: {y} }});
        await new Promise(r => setTimeout(r, 100)); const t = gd.querySelector('.hoverlayer').textContent;
        Plotly.Fx.unhover(gd); return t; }})()""")


def test_heatmap_hover_answers_from_the_cell_under_the_pointer(page, study):
    with open_store(study["wiki"]) as st:
        live, dead = live_dead(st)
    assert live.any() and dead.any()
    (l, e), (dl, de) = np.argwhere(live)[0], np.argwhere(dead)[0]
    text = _hover(page, "#heatmap-plot", e, l)
    assert text.startswith(f"layer {l}, expert {e}") and "tokens" in text and "S@0.9" in text and "dead" not in text
    assert _hover(page, "#heatmap-plot", de, dl) == f"layer {dl}, expert {de}: dead (0 tokens)"


def test_leaderboard_ranks_filters_and_sorts_as_leaderboard_rows(page, study):
    with open_store(study["wiki"]) as st:
        ref = leaderboard_rows(st, type="i", p=0.9, top=None)
    q = lambda r: -round(r["sparsity"] * 65534)  # the page ranks the values it holds (3 decimals shown)
    want = [(r["layer"], r["expert"]) for r in sorted(ref, key=lambda r: (q(r), r["layer"], r["expert"]))]
    got = page.evaluate("window.moeprof.filteredRows().map(r => [r.row, r.expert])")
    assert [tuple(x) for x in got] == want
    table = lambda: page.evaluate("document.querySelectorAll('#leaderboard-table tbody tr').length")
    assert _data(page, "leaderboard")["rowsTotal"] == str(len(ref)) and table() == min(50, len(ref))
    page.evaluate("""(() => { const i = document.querySelector('#leaderboard-table input[data-key="layer"]');
        i.value = '1'; i.dispatchEvent(new Event('change')); })()""")
    assert table() == sum(r["layer"] == 1 for r in ref)
    page.evaluate("""(() => { const i = document.querySelector('#leaderboard-table input[data-key="layer"]');
        i.value = ''; i.dispatchEvent(new Event('change'));
        document.querySelector('#leaderboard-table th[data-key="tokens"]').click(); })()""")
    first = page.evaluate("window.moeprof.filteredRows()[0]")
    assert first["tokens"] == max(r["tokens"] for r in ref)


def test_curves_layers_critical_schedule_texts_compare_are_drawn(page, study):
    with open_store(study["wiki"]) as st:
        assert _data(page, "curves") == {"section": "curves", "plots": str(len(st.types)),
                                          "layerLines": str(L * len(st.types))}
        assert page.evaluate("document.querySelectorAll('#curves .plot').length") == len(st.types)
        assert _data(page, "layers")["traces"] == "5"
        points = len(st.critical().points["p"])
        assert _data(page, "critical")["evaluations"] == str(points + 1)
        assert page.evaluate("document.querySelectorAll('#critical table.critical-evals tr').length") == points + 2
    assert _data(page, "schedule") == {"section": "schedule", "schedules": "2", "cells": str(2 * L * E)}
    assert page.evaluate("document.querySelectorAll('#schedule ul.verdict li.warn').length") == 1
    assert _data(page, "texts")["cells"] == str(2 * E)
    assert _data(page, "compare")["rows"] == "3"
    assert page.evaluate("document.querySelectorAll('#compare-table tr').length") == 4


def test_switching_to_the_dense_store_redraws_its_sections(page):
    page.evaluate("window.moeprof.select('store', 2)")
    assert _data(page, "heatmap")["cells"] == "3"
    assert _data(page, "leaderboard")["rowsTotal"] == "3"
    assert _data(page, "layers")["traces"] == "0"
    assert page.errors == []
    page.evaluate("window.moeprof.select('store', 0)")


def test_every_plot_draws_its_trace_types_with_the_inlined_plotly_bundle(page):
    # the page inlines a plotly.js bundle of three trace types (assets/PLOTLY.md): a type it lacks would be drawn
    # as a scatter, silently
    got = page.evaluate("""Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap(gd => gd.data.map((t, i) => {
        const f = gd._fullData.find((x) => x.index === i); return [t.type || 'scatter', f ? f.type : null, f ? f.visible : null]; }))""")
    assert {want for want, _, _ in got} == {"heatmap", "scatter", "bar"}
    assert all(want == drawn and visible is not False for want, drawn, visible in got), got
    unknown = page.evaluate("""(() => { const d = document.createElement('div'); document.body.append(d);
        Plotly.newPlot(d, [{ type: 'box', y: [1, 2, 3] }]);
        const f = d._fullData[0]; const r = [f.type, f.visible]; Plotly.purge(d); d.remove(); return r; })()""")
    assert unknown[0] != "box"  # plotly falls back to scatter: the check above catches a missing type


def test_the_inlined_plotly_bundle_is_the_one_its_note_describes():
    assets = Path(html_module.__file__).parent / "assets"
    note = (assets / "PLOTLY.md").read_text()
    js = (assets / html_module.PLOTLY_ASSET).read_bytes()
    size, digest = re.search(r"file: ([\d,]+) bytes, sha256 `([0-9a-f]{64})`", note).groups()
    assert (len(js), hashlib.sha256(js).hexdigest()) == (int(size.replace(",", "")), digest)
    assert html_module.plotly_js() in render({"stores": [], "texts": [], "compare": None}, title="t")
    assert (assets / "plotly-LICENSE.txt").read_text().startswith("MIT License")

"""Reports of a store: leaderboard numbers, ordering, dead experts, robust z-scores, plots, info, bad input.

Stores are built from hand-made vectors of width 8 whose top-p counts are known exactly (binary-fraction
sparsities that sit mid-bin in the 20-bin histogram):

    A = [5.5, 3, 1.5, 0, 0, 0, 0, 0]  L1 = 10   p = 0.5 → k = 1 (S = 0.875);  p = 0.9 → k = 3 (S = 0.625)
    B = [1, 1, 1, 1, 1, 0, 0, 0]      L1 = 5    p = 0.5 → k = 3 (S = 0.625);  p = 0.9 → k = 5 (S = 0.375)
    C = [1, 0, 0, 0, 0, 0, 0, 0]      L1 = 1    k = 1 at both p             (S = 0.875)
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from conftest import SHARED_EXPERT_TEXT, hand_store, tiny_tokenizer
from moe_families import build
from PIL import Image
from rich.console import Console

from moeprof.cli import main
from moeprof.report import (
    dead_experts,
    hist_quantiles,
    info_renderables,
    layer_summary,
    layer_summary_rows,
    leaderboard,
    leaderboard_rows,
    plot_all,
    plot_curves,
    plot_heatmap,
    robust_z,
)
from moeprof.report.leaderboard import token_leaderboard, token_leaderboard_rows
from moeprof.report.plots import DPI, curves_figsize, heatmap_figsize, sparsity_curve
from moeprof.stats import ProfileStats, VectorSummary
from moeprof.store import ProfileMeta, StoreError, open_store, update_store, write_profile

P_GRID = (0.5, 0.9)
A = [5.5, 3.0, 1.5, 0, 0, 0, 0, 0]
B = [1.0, 1, 1, 1, 1, 0, 0, 0]
C = [1.0, 0, 0, 0, 0, 0, 0, 0]
S90 = {"A": 0.625, "B": 0.375, "C": 0.875}  # sparsity at p = 0.9
VEC = {"A": A, "B": B, "C": C}

# layer → expert → vectors routed to it ("" = dead expert). Layer 1 expert 4 is the outlier.
MOE_PLAN = {
    0: {0: "AB", 1: "AAA", 2: "BBBB", 3: "", 4: "AAB", 5: "BBBAA"},
    1: {0: "AB", 1: "ABB", 2: "AAB", 3: "ABAB", 4: "C", 5: "AABBB"},
}


def _meta(model: str, is_moe: bool, tokens: int) -> ProfileMeta:
    return ProfileMeta(model=model, model_type="test", architecture="Test", is_moe=is_moe, top_k=1 if is_moe else 0,
                       hidden_size=8, model_config={"hidden_size": 8}, data_sources=["hand-made vectors"],
                       tokens=tokens, seq_len=16, batch_size=1, dtype="float32", device="cpu")


def build_store(path, plan: dict, *, model: str, num_experts: int, types=("x", "i"), kinds=None, scale=1.0):
    """Write a store where plan[layer][expert] is a string of vector names routed to that expert."""
    L = len(plan)
    stats = ProfileStats(L, num_experts, P_GRID, types)
    tokens = 0
    for layer, experts in plan.items():
        names = [(e, n) for e, s in experts.items() for n in s]
        ids = torch.tensor([e for e, _ in names], dtype=torch.long)
        v = torch.tensor([VEC[n] for _, n in names], dtype=torch.float32) * scale  # [N, 8]
        summary = VectorSummary.of(v, P_GRID)
        for t in types:
            stats.activations[t].add(layer, ids, summary)
        stats.routing.add(layer, ids[:, None], None)
        tokens = max(tokens, len(names))
    return write_profile(path, stats, _meta(model, num_experts > 1, tokens), intermediate_sizes=[8] * L,
                         site_kinds=kinds or (["moe"] * L if num_experts > 1 else ["dense"] * L))


def _mean(s: str) -> float:
    return float(np.mean([S90[c] for c in s]))


def _std(s: str) -> float:
    return float(np.std([S90[c] for c in s]))


@pytest.fixture
def moe_path(tmp_path):
    return build_store(tmp_path / "moe.h5", MOE_PLAN, model="tiny-moe", num_experts=6)


@pytest.fixture
def dense_path(tmp_path):
    plan = {0: {0: "AAB"}, 1: {0: "B"}, 2: {0: "AB"}}
    return build_store(tmp_path / "dense.h5", plan, model="tiny-dense", num_experts=1)


def _render(renderable) -> str:
    console = Console(width=200, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def _flat(renderable) -> str:
    """Rendered text with all whitespace runs collapsed (captions wrap to the table's width)."""
    return " ".join(_render(renderable).split())


# ---------------------------------------------------------------------------------------------------------------
# leaderboard numbers


def test_leaderboard_row_matches_hand_computed_values(moe_path):
    with open_store(moe_path) as s:
        rows = {(r["layer"], r["expert"]): r for r in leaderboard_rows(s, type="i", p=0.9, top=None)}
    r = rows[(0, 0)]  # vectors A, B
    assert r["tokens"] == 2
    assert r["load_frac"] == pytest.approx(2 / (2 + 3 + 4 + 0 + 3 + 5))
    assert r["sparsity"] == pytest.approx(0.5)
    assert r["std"] == pytest.approx(0.125)
    # histogram: one vector in [0.35, 0.40), one in [0.60, 0.65); CDF interpolation inside the bins
    assert r["q10"] == pytest.approx(0.35 + 0.2 * 0.05)
    assert r["q90"] == pytest.approx(0.60 + 0.8 * 0.05)
    assert r["q_range"] == pytest.approx(0.28)
    assert r["max_abs"] == pytest.approx(5.5)
    peak_a = 5.5 / math.sqrt((5.5**2 + 3**2 + 1.5**2) / 8)
    peak_b = 1 / math.sqrt(5 / 8)
    assert r["peak_ratio"] == pytest.approx((peak_a + peak_b) / 2)
    assert math.isnan(r["critical_sparsity"]) and math.isnan(r["tolerance"])
    # every live expert: mean and std over its own vectors
    for (layer, e), row in rows.items():
        assert row["sparsity"] == pytest.approx(_mean(MOE_PLAN[layer][e]))
        assert row["std"] == pytest.approx(_std(MOE_PLAN[layer][e]), abs=1e-7)
        assert row["tokens"] == len(MOE_PLAN[layer][e])


def test_leaderboard_reads_the_chosen_p(moe_path):
    with open_store(moe_path) as s:
        row = [r for r in leaderboard_rows(s, p=0.5, top=None) if (r["layer"], r["expert"]) == (0, 1)][0]
    assert row["sparsity"] == pytest.approx(0.875)  # A at p = 0.5 keeps 1 of 8


def test_load_shares_sum_to_one_per_layer(moe_path):
    with open_store(moe_path) as s:
        rows = leaderboard_rows(s, top=None)
    for layer in (0, 1):
        assert sum(r["load_frac"] for r in rows if r["layer"] == layer) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# ordering


def _expected_order(key) -> list[tuple[int, int]]:
    live = [(l, e) for l, ex in MOE_PLAN.items() for e, s in ex.items() if s]
    return sorted(live, key=lambda le: (-key(MOE_PLAN[le[0]][le[1]]), le[0], le[1]))


@pytest.mark.parametrize("by, key", [("sparsity", _mean), ("tokens", len), ("spread", _std)])
def test_leaderboard_orders_descending_by_key(moe_path, by, key):
    with open_store(moe_path) as s:
        rows = leaderboard_rows(s, by=by, top=None)
    got = [(r["layer"], r["expert"]) for r in rows]
    values = [key(MOE_PLAN[l][e]) for l, e in got]
    assert values == sorted(values, reverse=True)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    # ties broken by (layer, expert), so the whole order is fixed
    assert got == _expected_order(key)


def test_sparsity_order_puts_outlier_first_and_orders_differ_between_keys(moe_path):
    with open_store(moe_path) as s:
        by_s = [(r["layer"], r["expert"]) for r in leaderboard_rows(s, by="sparsity", top=3)]
        by_t = [(r["layer"], r["expert"]) for r in leaderboard_rows(s, by="tokens", top=3)]
        by_sp = [(r["layer"], r["expert"]) for r in leaderboard_rows(s, by="spread", top=3)]
    assert by_s[0] == (1, 4)  # C alone: S = 0.875
    assert by_t[:2] == [(0, 5), (1, 5)]  # 5 tokens each
    assert by_sp[0] == (0, 0)  # std of {A, B} = 0.125 is the largest; layer 1's ABAB ties it but comes later
    assert len({tuple(by_s), tuple(by_t), tuple(by_sp)}) == 3


def test_top_limits_rows_and_layer_filters(moe_path):
    with open_store(moe_path) as s:
        assert len(leaderboard_rows(s, top=4)) == 4
        assert len(leaderboard_rows(s, top=None)) == 11  # 12 experts, 1 dead
        only1 = leaderboard_rows(s, layer=1, top=None)
    assert {r["layer"] for r in only1} == {1} and len(only1) == 6


# ---------------------------------------------------------------------------------------------------------------
# dead experts, z-scores, outliers


def test_dead_experts_are_listed_apart_not_ranked(moe_path):
    with open_store(moe_path) as s:
        assert dead_experts(s) == [(0, 3)]
        assert dead_experts(s, layer=1) == []
        assert (0, 3) not in {(r["layer"], r["expert"]) for r in leaderboard_rows(s, top=None)}
        text = _flat(leaderboard(s))
    assert "dead (0 tokens, not ranked): 1: L0 E3" in text


def test_dead_experts_are_read_from_outliers_dead_and_recomputed_without_it(moe_path):
    with update_store(moe_path) as f:
        stored = f["outliers/dead"][()]
        stored[1, 2] = True  # a mark only the stored mask has: readers must not recompute it
        f["outliers/dead"][...] = stored
    with open_store(moe_path) as s:
        assert (1, 2) in dead_experts(s) and s.dead()[1, 2]
    with update_store(moe_path) as f:
        del f["outliers"]  # a store written before /outliers existed
    with open_store(moe_path) as s:
        assert dead_experts(s) == [(0, 3)]


def test_dead_experts_caption_groups_consecutive_ids(tmp_path):
    path = build_store(tmp_path / "d.h5", {0: {0: "AB", 4: "A"}, 1: {2: "B"}}, model="m", num_experts=6)
    with open_store(path) as s:
        assert dead_experts(s, layer=0) == [(0, 1), (0, 2), (0, 3), (0, 5)]
        text = _flat(leaderboard(s))
    assert "dead (0 tokens, not ranked): 9: L0 E1–3, 5; L1 E0–1, 3–5" in text


def test_robust_z_matches_numpy_median_mad(moe_path):
    with open_store(moe_path) as s:
        rows = leaderboard_rows(s, top=None)
        mean = s.mean("i")[:, :, s.p_index(0.9)]
    tokens_plan = {(l, e) for l, ex in MOE_PLAN.items() for e, v in ex.items() if v}
    for layer in (0, 1):
        experts = [e for e in range(6) if (layer, e) in tokens_plan]
        x = mean[layer, experts]
        med = np.median(x)
        mad = np.median(np.abs(x - med))
        expected = dict(zip(experts, (x - med) / (1.4826 * mad)))
        for r in rows:
            if r["layer"] == layer:
                assert r["z"] == pytest.approx(expected[r["expert"]])


def test_outlier_flag_marks_only_the_far_expert(moe_path):
    with open_store(moe_path) as s:
        rows = leaderboard_rows(s, top=None)
        text = _flat(leaderboard(s))
    flagged = [(r["layer"], r["expert"]) for r in rows if r["outlier"]]
    assert flagged == [(1, 4)]
    z = [r["z"] for r in rows if (r["layer"], r["expert"]) == (1, 4)][0]
    assert z > 3.5
    assert "outliers (|z| > 3.5, marked !): 1" in text


def test_robust_z_falls_back_when_mad_is_zero():
    values = np.array([[0.5, 0.5, 0.5, 0.9]])
    z = robust_z(values, np.ones_like(values, dtype=bool))
    dev = values[0] - 0.5
    assert z[0] == pytest.approx(dev / (1.2533 * np.mean(np.abs(dev))))
    assert np.isnan(robust_z(np.array([[0.3]]), np.array([[True]]))).all()  # one expert: undefined


def test_hist_quantiles_interpolate_inside_bins():
    edges = np.linspace(0, 1, 5)  # bins of 0.25
    hist = np.array([[0, 4, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0]])
    q = hist_quantiles(hist, edges, (0.1, 0.5, 0.9))
    assert q[0] == pytest.approx([0.25 + 0.1 * 0.25, 0.25 + 0.5 * 0.25, 0.25 + 0.9 * 0.25])
    assert q[1] == pytest.approx([0.2 * 0.25, 0.25, 0.75 + 0.8 * 0.25])
    assert np.isnan(q[2]).all()


# ---------------------------------------------------------------------------------------------------------------
# dense models, layer summary, /critical


def test_dense_store_gives_one_row_per_layer(dense_path):
    with open_store(dense_path) as s:
        rows = leaderboard_rows(s, top=None)
        text = _render(leaderboard(s))
    assert [(r["layer"], r["expert"]) for r in rows] == [(0, 0), (2, 0), (1, 0)]  # by sparsity: .542, .5, .375
    assert rows[0]["sparsity"] == pytest.approx(_mean("AAB"))
    assert all(r["load_frac"] == 1.0 and math.isnan(r["z"]) and not r["outlier"] for r in rows)
    assert "expert" not in text.split("\n")[2]  # no expert column in the header for a dense model


def test_layer_summary_numbers(moe_path):
    with open_store(moe_path) as s:
        rows = layer_summary_rows(s, "i", 0.9)
        text = _render(layer_summary(s, "i", 0.9))
    r0 = rows[0]
    s0 = [_mean(v) for v in MOE_PLAN[0].values() if v]
    t0 = np.array([len(v) for v in MOE_PLAN[0].values()], dtype=float)
    assert (r0["experts"], r0["live"], r0["dead"]) == (6, 5, 1)
    assert r0["mean_sparsity"] == pytest.approx(np.mean(s0))
    assert r0["min_sparsity"] == pytest.approx(min(s0)) and r0["max_sparsity"] == pytest.approx(max(s0))
    all_vectors = "".join(MOE_PLAN[0].values())
    assert r0["weighted_sparsity"] == pytest.approx(_mean(all_vectors))
    share = t0[t0 > 0] / t0.sum()
    assert r0["entropy_norm"] == pytest.approx(-(share * np.log(share)).sum() / np.log(6))
    assert r0["max_mean_load"] == pytest.approx(t0.max() / t0.mean())
    assert rows[1]["dead"] == 0 and rows[1]["entropy_norm"] < 1.0
    assert "H/log E" in text


def test_layer_summary_of_balanced_layer_has_entropy_one(tmp_path):
    path = build_store(tmp_path / "bal.h5", {0: {0: "AB", 1: "BA", 2: "AA", 3: "BB"}}, model="m", num_experts=4)
    with open_store(path) as s:
        (row,) = layer_summary_rows(s, "i", 0.9)
    assert row["entropy_norm"] == pytest.approx(1.0) and row["max_mean_load"] == pytest.approx(1.0)


def test_dense_layer_in_moe_model_is_not_counted_as_dead_experts(tmp_path):
    plan = {0: {0: "AB"}, 1: {0: "AB", 1: "BB", 2: "A"}}
    path = build_store(tmp_path / "mix.h5", plan, model="m", num_experts=3, kinds=["dense", "moe"])
    with open_store(path) as s:
        assert dead_experts(s) == []
        rows = layer_summary_rows(s, "i", 0.9)
    assert rows[0]["experts"] == 1 and rows[0]["dead"] == 0 and math.isnan(rows[0]["entropy_norm"])


def _add_critical(path, *, tolerance: bool):
    with update_store(path) as f:
        g = f.create_group("critical")
        g.attrs.update(critical_p=0.875, critical_sparsity_token=0.61, critical_sparsity_flop=0.58, dense_score=0.4321,
                       task="wikitext", target=0.99, rule="topp", type="i")
        pe = np.arange(12, dtype=np.float64).reshape(2, 6) / 100
        g.create_dataset("per_expert_sparsity", data=pe)
        if tolerance:
            g.create_dataset("tolerance", data=pe + 0.5)
    return pe


def test_critical_group_adds_headline_and_columns(moe_path):
    pe = _add_critical(moe_path, tolerance=True)
    with open_store(moe_path) as s:
        rows = leaderboard_rows(s, top=None)
        text = _flat(leaderboard(s))
        summary = _flat(layer_summary(s))
    for r in rows:
        assert r["critical_sparsity"] == pytest.approx(pe[r["layer"], r["expert"]])
        assert r["tolerance"] == pytest.approx(pe[r["layer"], r["expert"]] + 0.5)
    assert "p* = 0.875" in text and "0.610 token-weighted / 0.580 FLOP-weighted" in text
    assert "wikitext" in text and "crit S" in text and "toler." in text
    assert "p* = 0.875" in summary


def test_critical_without_tolerance_shows_only_per_expert_column(moe_path):
    _add_critical(moe_path, tolerance=False)
    with open_store(moe_path) as s:
        rows = leaderboard_rows(s, top=None)
        text = _flat(leaderboard(s))
    assert "crit S" in text and "toler." not in text
    assert all(math.isnan(r["tolerance"]) for r in rows)


def test_critical_group_with_wrong_shape_is_a_store_error(moe_path):
    with update_store(moe_path) as f:
        f.create_group("critical").create_dataset("per_expert_sparsity", data=np.zeros((3, 3)))
    with open_store(moe_path) as s, pytest.raises(StoreError, match="expected"):
        leaderboard_rows(s)


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_p_not_in_grid_lists_grid_values(moe_path):
    with open_store(moe_path) as s, pytest.raises(StoreError, match=r"0\.5, 0\.9"):
        leaderboard(s, p=0.8)


def test_type_not_profiled_is_an_error(moe_path):
    with open_store(moe_path) as s:
        with pytest.raises(StoreError, match="'g' was not profiled"):
            leaderboard_rows(s, type="g")
        with pytest.raises(StoreError, match="not profiled"):
            layer_summary(s, "u", 0.9)


@pytest.mark.parametrize("layer", [2, -1])
def test_layer_out_of_range_is_an_error(moe_path, layer):
    with open_store(moe_path) as s, pytest.raises(ValueError, match=r"layers 0\.\.1"):
        leaderboard_rows(s, layer=layer)


def test_bad_sort_key_and_top_are_errors(moe_path):
    with open_store(moe_path) as s:
        with pytest.raises(ValueError, match="sparsity, tokens, spread"):
            leaderboard(s, by="name")
        with pytest.raises(ValueError, match="whole number >= 0"):  # top=0 means all rows
            leaderboard_rows(s, top=-1)


# ---------------------------------------------------------------------------------------------------------------
# plots


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def test_plot_heatmap_writes_png_of_expected_size(moe_path, tmp_path):
    with open_store(moe_path) as s:
        out = plot_heatmap(s, tmp_path / "figs", type="i", p=0.9)
    assert out.name == "moe_heatmap_i_p0.9.png" and out.stat().st_size > 1000
    w, h = heatmap_figsize(2, 6)
    assert _png_size(out) == (round(w * DPI), round(h * DPI))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_plot_heatmap_masks_dead_expert_grey(moe_path, tmp_path):
    with open_store(moe_path) as s:
        out = plot_heatmap(s, tmp_path, type="i", p=0.9)
    with Image.open(out) as im:
        rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
    grey = np.all(rgb == 0xB0, axis=1)  # DEAD_COLOR #b0b0b0 exactly (anti-aliased text gives only a few)
    assert grey.sum() > 2000  # the dead cell (layer 0, expert 3) is a solid grey block of ~100 x 80 px


def test_plot_curves_overlays_two_stores(moe_path, dense_path, tmp_path):
    with open_store(moe_path) as a, open_store(dense_path) as b:
        (out,) = plot_curves([a, b], tmp_path, labels=["MoE", "dense peer"])
    assert out.name == "curves_moe_vs_dense.png"
    w, h = curves_figsize(2)  # types x and i
    assert _png_size(out) == (round(w * DPI), round(h * DPI))
    with open_store(moe_path) as a:
        (single,) = plot_curves([a], tmp_path)
    # an overlay draws more than one store's curve
    with Image.open(out) as im2, Image.open(single) as im1:
        assert np.asarray(im2).tobytes() != np.asarray(im1).tobytes()


def test_sparsity_curve_is_vector_weighted(moe_path):
    with open_store(moe_path) as s:
        grid, curve, lo, hi = sparsity_curve(s, "i")
    every = "".join("".join(ex.values()) for ex in MOE_PLAN.values())
    assert grid.tolist() == list(P_GRID)
    assert curve[1] == pytest.approx(_mean(every))
    assert lo[1] <= curve[1] <= hi[1] and lo[1] < hi[1]


def test_plot_all_writes_curves_and_one_heatmap_per_store(moe_path, dense_path, tmp_path):
    outs = plot_all([moe_path, dense_path], tmp_path / "all")
    names = sorted(p.name for p in outs)
    assert names == ["curves_moe_vs_dense.png", "dense_heatmap_i_p0.9.png", "moe_heatmap_i_p0.9.png"]
    for p in outs:
        assert p.exists() and _png_size(p)[0] > 100


def test_plot_heatmap_bad_p_is_an_error(moe_path, tmp_path):
    with open_store(moe_path) as s, pytest.raises(StoreError, match="not in the profiled p-grid"):
        plot_heatmap(s, tmp_path, p=0.7)
    assert not list(tmp_path.glob("*.png"))


# ---------------------------------------------------------------------------------------------------------------
# info


def test_info_shows_root_attributes_and_layout(moe_path):
    with open_store(moe_path) as s:
        text = "\n".join(_render(r) for r in info_renderables(s, verbose=True))
        layout = s.layout()
    assert "tiny-moe" in text and "schema_version" in text and "hand-made vectors" in text
    assert "0.5, 0.9" in text  # p-grid
    assert "x (input), i (intermediate)" in text
    for name, shape, dtype, doc, units in layout:
        assert "/" + name in text
    assert "/sparsity/i/mean" in text and "[2, 6, 2]" in text and "fraction of entries dropped" in text
    assert "at each p [layer, expert, p]" in text  # brackets in docs are text, not rich markup


def test_model_names_with_brackets_are_shown_verbatim(tmp_path):
    path = build_store(tmp_path / "b.h5", {0: {0: "AB", 1: "B"}}, model="org/model [bold]x[/bold]", num_experts=2)
    with open_store(path) as s:
        assert "org/model [bold]x[/bold]" in _render(leaderboard(s))
        assert "org/model [bold]x[/bold]" in "\n".join(_render(r) for r in info_renderables(s))


def test_info_shows_critical_group_when_present(moe_path):
    _add_critical(moe_path, tolerance=False)
    with open_store(moe_path) as s:
        text = "\n".join(_render(r) for r in info_renderables(s, verbose=True))
    assert "critical sparsity (/critical)" in text and "per_expert_sparsity" in text and "wikitext" in text


def test_leaderboard_layer_is_a_decoder_layer(qwen2_moe):
    _, _, out = qwen2_moe
    with open_store(out) as st:
        rows = leaderboard_rows(st, layer=1, top=None)
        assert sorted((r["layer"], r["expert"]) for r in rows) == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
        assert [(r["layer"], r["expert"]) for r in leaderboard_rows(st, layer=0, top=None)] == [(0, 0)]
        with pytest.raises(ValueError, match=r"layers 0\.\.1"):
            leaderboard_rows(st, layer=2)
        tokens = token_leaderboard_rows(st, layer=1, top=2)
        assert sorted({r["layer"] for r in tokens}) == [1, 2]
        with pytest.raises(ValueError, match=r"layers 0\.\.1"):
            token_leaderboard_rows(st, layer=2)
        layer_col = [c for c in layer_summary(st).columns if c.header == "layer"][0]
        assert list(layer_col.cells) == ["0", "1", "1"]
        layer_col = [c for c in token_leaderboard(st, top=1).columns if c.header == "layer"][0]
        assert list(layer_col.cells) == ["0 dense", "0 dense", "1", "1", "1 shared", "1 shared"]


def test_dead_experts_are_named_by_decoder_layer(tmp_path):
    import torch

    from moeprof.profile import profile

    tok = tiny_tokenizer()
    model = build("deepseek_v3", vocab_size=len(tok), num_hidden_layers=3)  # rows: 0 dense, 1 + 1 shared, 2 + 2 shared
    with torch.no_grad():  # expert 3 of layer 2 (row 3) is never selected
        model.model.layers[2].mlp.gate.e_score_correction_bias[3] = -100.0
    text = tmp_path / "t.txt"
    text.write_text(SHARED_EXPERT_TEXT)
    out = profile(model, tok, [str(text)], tmp_path / "d.h5", model_id="d", max_tokens=32, seq_len=16,
                  batch_size=2, show_progress=False, types=("i",)).path
    with open_store(out) as st:
        assert st.sites().layer.tolist() == [0, 1, 1, 2, 2] and st.dead().nonzero()[0].tolist() == [3]
        assert "dead (0 tokens, not ranked): 1: L2 E3" in str(leaderboard(st, top=3).caption)
        assert sorted(r["expert"] for r in leaderboard_rows(st, layer=2, top=None) if r["layer"] == 3) == [0, 1, 2]


def test_leaderboard_with_a_missing_schedule_prints_nothing_but_the_error(tmp_path, capsys):
    path = hand_store(tmp_path / "s.h5")
    code = main(["leaderboard", str(path), "--schedule", str(tmp_path / "missing.json")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "missing.json" in err


def test_info_starts_with_a_summary_and_keeps_the_documentation_for_verbose(tmp_path, capsys):
    from moeprof.store import Critical, write_critical

    path = hand_store(tmp_path / "s.h5")
    # by hand: every vector is [1..8] (sum 36); p 0.9 needs 32.4 = 8+7+6+5+4+3 → 6 of 8 kept, sparsity 0.25
    write_critical(path, Critical(dict(task="ppl:wikipedia", type="i", rule="topp", target=0.99, dense_score=0.01,
                                       critical_p=0.8841, critical_sparsity_token=0.599, critical_sparsity_flop=0.598,
                                       critical_score=0.0099, critical_ratio=0.99, num_evaluations=8)))
    code = main(["info", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    text = " ".join(out.split())
    assert "hand/moe" in text and "2 layers × 4 experts, top-1" in text and "tokens 4" in text
    assert "sparsity of i at p 0.9 0.250" in text
    assert "critical i on ppl:wikipedia p* 0.8841 → sparsity 0.599 token / 0.598 FLOP" in text
    assert "schedules none" in text and "--verbose" in text
    size = (tmp_path / "s.h5").stat().st_size
    assert f"file size {size / 1024:.1f} KB" in text
    assert "sparsity/i/mean" not in text and len(out.splitlines()) < 25  # no dataset documentation
    code = main(["info", str(path), "--schema"])
    verbose = capsys.readouterr().out
    assert code == 0 and "sparsity/i/mean" in verbose and "routing/tokens" in verbose
    assert len(verbose.splitlines()) > 3 * len(out.splitlines())


def test_nearest_grid_p_matches_a_brute_force_search_and_names_the_swap():
    from moeprof.errors import UsageError
    from moeprof.report.grid_p import nearest_grid_p

    rng = np.random.default_rng(0)
    for _ in range(200):
        grid = np.sort(rng.choice(np.round(np.linspace(0.05, 0.99, 95), 2), rng.integers(1, 12), replace=False))
        p = float(rng.uniform(0, 1))
        q, note = nearest_grid_p(grid, p)
        best = min(abs(g - p) for g in grid)
        assert abs(q - p) == pytest.approx(best) and q in grid.tolist()
        assert note is not None and f"nearest grid p {q:g}" in note
    assert nearest_grid_p([0.5, 0.9], 0.9) == (0.9, None)
    assert nearest_grid_p([0.5, 0.9], 0.7)[0] == 0.9  # a tie goes to the larger p
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        nearest_grid_p([0.5, 0.9], 1.2)


def test_leaderboard_and_plot_take_a_p_off_the_grid_at_the_nearest_grid_p(tmp_path, capsys):
    path = hand_store(tmp_path / "s.h5")  # grid (0.5, 0.9)
    assert main(["leaderboard", str(path), "--p", "0.9", "--top", "all"]) == 0
    on_grid = capsys.readouterr().out
    assert main(["leaderboard", str(path), "--p", "0.93", "--top", "all"]) == 0
    off_grid = capsys.readouterr().out
    note = "note: --p 0.93 is not on the profiled p-grid; using the nearest grid p 0.9"
    assert " ".join(off_grid.split()).startswith(note)
    assert off_grid[off_grid.index("\n", off_grid.index("p-grid")):].strip().endswith(on_grid.strip()[-200:])
    assert main(["plot", str(path), "--p", "0.8", "-o", str(tmp_path / "plots")]) == 0
    assert "using the nearest grid p 0.9" in capsys.readouterr().out
    assert (tmp_path / "plots" / "s_heatmap_i_p0.9.png").exists()


def test_leaderboard_with_another_models_schedule_prints_nothing_but_the_error(tmp_path, capsys):
    import json

    from moeprof.schedule import Schedule

    path = hand_store(tmp_path / "s.h5")  # 2 layers x 4 experts
    other = tmp_path / "other.json"
    other.write_text(json.dumps(Schedule(np.full((3, 4), 0.9), "i").to_dict()))
    code = main(["leaderboard", str(path), "--schedule", str(other)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "made for another model" in err


def test_info_summary_and_leaderboard_show_each_schedules_stored_verdict(tmp_path, capsys):
    from conftest import run_cli

    from moeprof.report.html import schedule_verdict
    from moeprof.report.info import summary_rows
    from moeprof.schedule import Schedule
    from moeprof.store import write_schedule

    path = hand_store(tmp_path / "s.h5")
    lines = ["warning: held-out ratio 0.9862 [0.9829, 0.9896] MISSES the target 0.99",
             "uniform p 0.91 keeps the same held-out score at FLOP sparsity 0.52; the schedule 0.55: +3.0 points"]
    judged = Schedule(np.full((2, 4), 0.9), "i", "topp", "hand/moe", provenance={"verdict": {"text": "\n".join(lines)}})
    write_schedule(path, "judged", judged)
    write_schedule(path, "bare", Schedule(np.full((2, 4), 0.8), "i", "topp", "hand/moe"))
    with open_store(path) as st:
        rows = dict(summary_rows(st))
    assert rows["schedule judged"] == "\n".join(lines) and rows["schedule bare"] == "held (no verdict kept)"
    assert "schedules" not in rows
    judged.provenance.update(target=0.99, heldout_ratio=0.9862)  # what the verdict already says is not repeated
    assert schedule_verdict(judged) == lines  # the HTML report's schedule section
    code, out, err = run_cli(capsys, "info", path)
    flat = " ".join(out.split())
    assert code == 0 and all(" ".join(line.split()) in flat for line in lines), out
    import h5py

    with h5py.File(path, "r+") as f:  # a damaged record: the summary still prints, and says which
        f["schedules/bare"].attrs["schedule"] = "{not json"
    with open_store(path) as st:
        rows = dict(summary_rows(st))
    assert rows["schedule bare"].startswith("unreadable: ") and rows["schedule judged"] == "\n".join(lines)
    sched = judged.save(tmp_path / "judged.json")
    code, out, err = run_cli(capsys, "leaderboard", path, "--type", "i", "--schedule", sched)
    flat = " ".join(out.split())
    assert code == 0 and all(" ".join(line.split()) in flat for line in lines), out + err

"""What the figures draw, read back from the matplotlib objects (line data, texts, legends), not from pixels."""

from __future__ import annotations

import numpy as np
import pytest

from moeprof.cli import main
from moeprof.report.plots import critical_figure, curves_figure, display_name, heatmap_figure, sparsity_curve
from moeprof.store import Critical, open_store, write_critical
from tests.test_load_metrics import COUNTS, _store

POINTS = {"p": np.array([0.9, 0.7, 0.5, 0.6]), "ratio": np.array([0.998, 0.992, 0.95, 0.985]),
          "sparsity_token": np.array([0.3, 0.5, 0.7, 0.6]), "score": np.ones(4),
          "sparsity_flop": np.array([0.3, 0.5, 0.7, 0.6]), "passed": np.array([True, True, False, False])}


@pytest.fixture
def stores(tmp_path):
    moe = _store(tmp_path / "moe.h5")
    dense = _store(tmp_path / "dense.h5", counts=np.array([[4], [4], [4]]), weights=np.ones((3, 1)))
    return moe, dense


def test_curves_put_the_legend_below_the_axes_and_can_use_log_one_minus_p(stores):
    moe, _ = stores
    with open_store(moe) as st:
        fig = curves_figure([st], labels=["A"])
        log = curves_figure([st], labels=["A"], x_axis="log1mp")
        grid, curve, _, _ = sparsity_curve(st, "i")
    ax = fig.axes[0]
    assert ax.get_legend() is None and len(fig.legends) == 1  # a figure legend, outside the panels
    np.testing.assert_allclose(ax.lines[0].get_xdata(), grid)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), curve)
    lax = log.axes[0]
    assert lax.get_xscale() == "log"
    np.testing.assert_allclose(lax.lines[0].get_xdata(), 1 - grid)
    assert lax.get_xlim()[0] > lax.get_xlim()[1]  # reversed: p grows to the right
    assert [t.get_text() for t in lax.get_xticklabels()] == ["0.5", "0.8", "0.9"]  # grid ticks within the data


def test_dense_bands_are_labelled_layers(stores):
    moe, dense = stores
    with open_store(moe) as a, open_store(dense) as b:
        fig = curves_figure([a, b], labels=["moe", "dense"])
        only_dense = curves_figure([b])
    assert len(fig.axes[0].lines) == 2  # both profiled i
    assert "percentile of experts / layers" in fig.get_suptitle()
    assert "percentile of layers" in only_dense.get_suptitle()


def test_missing_type_label(tmp_path):
    from tests.test_report import build_store

    xi = build_store(tmp_path / "xi.h5", {0: {0: "AB", 1: "B"}}, model="m1", num_experts=2, types=("x", "i"))
    xonly = build_store(tmp_path / "x.h5", {0: {0: "AB", 1: "B"}}, model="m2", num_experts=2, types=("x",))
    with open_store(xi) as a, open_store(xonly) as b:
        fig = curves_figure([a, b])
    ax_i = fig.axes[1]
    assert len(ax_i.lines) == 1 and [line.get_label() for line in ax_i.lines] == ["m1"]
    assert any(t.get_text() == "i not profiled in: m2" for t in ax_i.texts)


def test_heatmap_prints_values_shows_load_and_says_its_colour_scale(stores):
    moe, _ = stores
    with open_store(moe) as st:
        mean = st.mean("i")[:, :, 1]
        util = st.balance().utilization
        fig = heatmap_figure(st, type="i", p=0.9)
        fixed = heatmap_figure(st, type="i", p=0.9, scale="fixed")
        centred = heatmap_figure(st, type="i", p=0.9, scale="centred")
    ax, ax_load = fig.axes[0], fig.axes[1]
    live = COUNTS > 0
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in mean[live])
    np.testing.assert_allclose(np.sort(ax_load.collections[0].get_offsets()[:, 0]), np.sort(util[live]))
    assert "range" in ax.get_title() and fig.get_suptitle() == "hand/moe"
    im = fixed.axes[0].images[0]
    assert (im.norm.vmin, im.norm.vmax) == (0.0, 1.0) and "fixed at 0–1" in fixed.axes[0].get_title()
    cim = centred.axes[0].images[0]
    assert cim.norm.vcenter == pytest.approx(np.median(mean[live]))


def test_dense_heatmap_is_sparsity_against_layer_lines(stores):
    _, dense = stores
    with open_store(dense) as st:
        fig = heatmap_figure(st, type="i", p=0.9)
        mean = st.mean("i")[:, 0, :]
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert set(lines) == {"p = 0.5", "p = 0.9"}
    np.testing.assert_allclose(lines["p = 0.9"].get_ydata(), mean[:, 1])
    np.testing.assert_array_equal(lines["p = 0.9"].get_xdata(), [0, 1, 2])
    assert lines["p = 0.9"].get_linewidth() > lines["p = 0.5"].get_linewidth()


def test_critical_figure_draws_every_point_and_marks_p_star(stores, tmp_path):
    moe, _ = stores
    write_critical(moe, Critical.from_items({"critical_p": 0.7, "type": "i", "rule": "topp", "task": "ppl:x",
                                             "target": 0.99}, {f"points/{k}": v for k, v in POINTS.items()}))
    with open_store(moe) as st:
        fig = critical_figure(st)
    ax = fig.axes[0]
    passed, failed, star = (c.get_offsets() for c in ax.collections)
    np.testing.assert_allclose(passed, [[0.3, 0.998], [0.5, 0.992]])
    np.testing.assert_allclose(failed, [[0.7, 0.95], [0.6, 0.985]])
    np.testing.assert_allclose(star, [[0.5, 0.992]])  # p* = 0.7
    assert sorted(t.get_text() for t in ax.texts) == ["p=0.5", "p=0.6", "p=0.7", "p=0.9"]
    assert ax.lines[-1].get_ydata()[0] == 0.99  # the target line
    assert main(["plot", str(moe), "-o", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "moe_critical_i_topp_ppl-x.png").is_file()


def test_titles_name_the_model_not_its_cache_path():
    assert display_name("/root/.cache/moeprof/smollm2/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert display_name("/data/ckpt/model.gguf") == "model"
    assert display_name("moeprof/tiny-moe") == "moeprof/tiny-moe"


def test_plot_type_and_p_are_checked_before_the_folder_is_made(stores, tmp_path, capsys):
    moe, _ = stores
    assert main(["plot", str(moe), "-o", str(tmp_path / "a"), "--type", "x"]) == 2
    assert main(["plot", str(moe), "-o", str(tmp_path / "b"), "--p", "1.5"]) == 2  # (0.7: the nearest grid p)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main(["plot", str(moe), "-o", str(tmp_path / "c"), "--p", "0.5", "--x-axis", "log1mp"]) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["moe_curves_log1mp.png", "moe_heatmap_i_p0.5.png"]


def test_heatmap_rows_of_a_layer_with_several_sites_are_named_by_decoder_layer_and_kind(tmp_path, stores):
    import torch

    from moeprof.stats import ProfileStats, VectorSummary
    from moeprof.store import ProfileMeta, write_profile

    counts = np.array([[5, 0, 0, 0], [3, 2, 1, 2], [8, 0, 0, 0]])  # layer 0 dense; layer 1 routed + shared
    stats = ProfileStats(3, 4, (0.5, 0.9), ("i",))
    for row in range(3):
        ids = torch.tensor([e for e in range(4) for _ in range(counts[row, e])], dtype=torch.long)
        stats.activations["i"].add(row, ids, VectorSummary.of(torch.arange(1.0, 9.0).repeat(len(ids), 1), (0.5, 0.9)))
        stats.routing.add(row, ids[:, None], torch.ones(len(ids), 1, dtype=torch.float64))
    meta = ProfileMeta(model="hand/mixed", model_type="test", architecture="Test", is_moe=True, top_k=1, hidden_size=8,
                       model_config={}, data_sources=["hand"], tokens=8, seq_len=8, batch_size=1, dtype="float32",
                       device="cpu")
    path = write_profile(tmp_path / "mixed.h5", stats, meta, intermediate_sizes=[8] * 3,
                         site_kinds=["dense", "routed", "shared"], site_layers=[0, 1, 1])
    with open_store(path) as st:
        ax = heatmap_figure(st, type="i", p=0.9).axes[0]
        assert ax.get_ylabel() == "layer (site)"
        assert [t.get_text() for t in ax.get_yticklabels()] == ["0 dense", "1", "1 shared"]
    with open_store(stores[0]) as st:  # one site per layer: plain layer numbers
        assert heatmap_figure(st, type="i", p=0.9).axes[0].get_ylabel() == "layer"


@pytest.mark.parametrize("L, E, printed", [(4, 16, True), (48, 128, False)])
def test_heatmap_prints_cell_values_only_where_they_are_readable(tmp_path, L, E, printed):
    path = _store(tmp_path / "big.h5", counts=np.full((L, E), 2), weights=np.ones((L, E)))
    with open_store(path) as st:
        mean = st.mean("i")[:, :, 1]
        fig = heatmap_figure(st, type="i", p=0.9)
    ax = fig.axes[0]
    assert any("sparsity at p = 0.9" in a.get_ylabel() for a in fig.axes[1:])  # the colour bar is always there
    if not printed:
        assert len(ax.texts) == 0  # 48 × 128: colour only
        return
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in mean.ravel())
    fig.canvas.draw()
    box = ax.get_window_extent()
    cell_w, cell_h = box.width / E, box.height / L
    for t in ax.texts:
        assert t.get_fontsize() >= 6  # readable
        ext = t.get_window_extent()
        assert ext.width <= cell_w and ext.height <= cell_h  # and inside its cell

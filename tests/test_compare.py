"""`moeprof compare`: parameters recorded at profile time (checked against the config's arithmetic and the known
Qwen3-30B-A3B counts), sparsity at p and critical sparsity per store, and the figures."""

import numpy as np
import pytest

from moeprof.cli import main
from moeprof.store import open_store


def test_parameter_counts_of_qwen3_30b_a3b_on_meta():
    import accelerate
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from moeprof.arch import adapter_for
    from moeprof.profile import parameter_counts

    def counts(layers):  # all 48 layers on meta take ~10 s: count 1 and 2, then extrapolate (layers are equal)
        cfg = Qwen3MoeConfig(num_hidden_layers=layers, num_experts=128, num_experts_per_tok=8, hidden_size=2048,
                             moe_intermediate_size=768, head_dim=128, num_attention_heads=32, num_key_value_heads=4,
                             vocab_size=151936, norm_topk_prob=True, tie_word_embeddings=False)
        with accelerate.init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg)
        return parameter_counts(model, adapter_for(model).sites(model))

    one, two = counts(1), counts(2)
    for k, want in (("total", 30.53), ("active", 3.35)):  # the published Qwen3-30B-A3B counts
        assert round((one[k] + 47 * (two[k] - one[k])) / 1e9, 2) == want


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    data = tmp / "d.txt"
    data.write_text("The river ran past the old mill, where children played with paper boats. " * 8)
    out = {}
    for name in ("tiny-moe", "tiny-dense"):
        out[name] = tmp / f"{name}.h5"
        assert main(["profile", name, "--data", str(data), "--seq-len", "32", "--batch-size", "1",
                     "--max-tokens", "64", "--p-grid", "0.5,0.9", "--out", str(out[name])]) == 0
    return tmp, out


def test_rows_hold_parameters_sparsity_and_critical(stores):
    from moeprof.models import load_model
    from moeprof.report.compare import compare_rows
    from moeprof.store import Critical, open_store, write_critical

    tmp, paths = stores
    write_critical(paths["tiny-moe"], Critical({"type": "i", "critical_p": 0.8, "task": "ppl:x",
                                                "critical_sparsity_token": 0.41, "critical_sparsity_flop": 0.4}))
    opened = [open_store(paths[n]) for n in ("tiny-moe", "tiny-dense")]
    try:
        moe, dense = compare_rows(opened, p=0.9)
        for row, name, st in ((moe, "tiny-moe", opened[0]), (dense, "tiny-dense", opened[1])):
            model, _ = load_model(name)
            cfg = model.config
            assert row["params_total"] == sum(p.numel() for p in model.parameters())
            if name == "tiny-moe":  # per layer E experts of 3·H·I weights, a token uses K of them
                idle = cfg.num_hidden_layers * 3 * cfg.hidden_size * cfg.moe_intermediate_size * (
                    cfg.num_experts - cfg.num_experts_per_tok)
                assert row["params_active"] == row["params_total"] - idle
            else:
                assert row["params_active"] == row["params_total"]
            for t in "xugi":
                sp = st.sparsity(t)
                w = sp.vectors.astype(float)
                want = np.nansum(sp.mean[..., 1] * w) / w.sum()
                assert row["sparsity"][t] == pytest.approx(want, rel=1e-9)
        assert moe["critical"]["sparsity_token"] == 0.41 and moe["critical"]["type"] == "i"
        assert dense["critical"] is None
    finally:
        for st in opened:
            st.close()


def test_cli_prints_the_table_and_writes_both_figures(stores, capsys):
    tmp, paths = stores
    out = tmp / "figs"
    assert main(["compare", str(paths["tiny-moe"]), str(paths["tiny-dense"]), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny-moe" in text and "tiny-dense" in text and "S_i" in text
    assert (out / "compare-scaling.png").stat().st_size > 1000
    assert len(list(out.glob("*.png"))) == 2
    assert main(["compare", str(paths["tiny-moe"])]) == 2
    assert "at least two stores" in capsys.readouterr().err


def test_compare_reads_the_latest_search_of_each_type(qwen2_moe, tmp_path):
    from moeprof.report.compare import compare_rows
    from moeprof.store import Critical, write_critical

    _, _, store = qwen2_moe
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for path in paths:
        path.write_bytes(store.read_bytes())
    for t, s in (("x", 0.21), ("i", 0.52), ("i", 0.55)):  # x searched first, then i twice (tasks t0, t1)
        write_critical(paths[0], Critical({"type": t, "rule": "topp", "task": f"t{int(s * 100) % 2}",
                                           "critical_p": 0.5, "critical_sparsity_token": s,
                                           "critical_sparsity_flop": s}))
    stores = [open_store(p) for p in paths]
    try:
        a, b = compare_rows(stores)
    finally:
        for st in stores:
            st.close()
    assert a["critical"]["type"] == "i" and a["critical"]["sparsity_token"] == 0.55  # the latest search
    assert {t: c["sparsity_token"] for t, c in a["criticals"].items()} == {"x": 0.21, "i": 0.55}
    assert b["critical"] is None and b["criticals"] == {}


def test_scaling_figure_joins_only_like_tasks_and_keeps_its_labels_inside_the_panels(stores, tmp_path):
    from moeprof.report.compare import compare_rows, scaling_figure
    from moeprof.store import Critical, write_critical

    _, paths = stores
    copies = {}
    for name, task, s in (("tiny-moe", "ppl:domains", 0.41), ("tiny-dense", "ppl:wikipedia", 0.33)):
        copies[name] = tmp_path / f"{name}.h5"
        copies[name].write_bytes(paths[name].read_bytes())
        write_critical(copies[name], Critical({"type": "i", "rule": "topp", "task": task, "critical_p": 0.8,
                                               "critical_sparsity_token": s, "critical_sparsity_flop": s}))
    names = ["SmolLM2-135M-Instruct-long-name", "tiny-dense-with-a-long-label"]
    opened = [open_store(copies[n]) for n in ("tiny-moe", "tiny-dense")]
    try:
        rows = compare_rows(opened)
        fig = scaling_figure(opened, labels=names)
    finally:
        for st in opened:
            st.close()
    left, right = fig.axes
    # right panel: one line per (type, task), one point each: the two tasks are not joined
    drawn = {line.get_label(): list(zip(*line.get_data())) for line in right.lines}
    assert drawn == {"i (intermediate) on ppl:domains": [(rows[0]["params_active"], 0.41)],
                     "i (intermediate) on ppl:wikipedia": [(rows[1]["params_active"], 0.33)]}
    # left panel: one line per type through both models, at the rows' sparsity
    for line in left.lines:
        t = line.get_label().split()[0]
        want = sorted((r["params_active"], r["sparsity"][t]) for r in rows)
        np.testing.assert_allclose(np.column_stack(line.get_data()), np.array(want, dtype=float))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in (left, right):
        texts = {t.get_text() for t in ax.texts}
        assert set(names) <= texts  # every point says which model it is
        panel = ax.get_window_extent(renderer)
        for t in ax.texts:
            box = t.get_window_extent(renderer)
            assert panel.x0 - 1 <= box.x0 and box.x1 <= panel.x1 + 1, t.get_text()  # inside the panel
            assert panel.y0 - 1 <= box.y0 and box.y1 <= panel.y1 + 1, t.get_text()
        labels = sorted((t.get_window_extent(renderer) for t in ax.texts), key=lambda b: b.y0)
        assert all(not a.overlaps(b) for i, a in enumerate(labels) for b in labels[i + 1:])  # nor over each other
        ticks = [t for t in ax.get_xticklabels() if t.get_text()]
        # these two models differ by 0.7% in size: one tick label, not two printed over each other
        assert ticks and {t.get_text() for t in ticks} <= {_p(r["params_active"]) for r in rows}
        boxes = sorted((t.get_window_extent(renderer) for t in ticks), key=lambda b: b.x0)
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))  # tick labels do not overlap


def test_spaced_ticks_label_the_first_and_every_tick_a_gap_after_the_last_labelled():
    from moeprof.report.compare import spaced_ticks

    assert spaced_ticks([0.1, 0.15, 0.3, 0.35, 0.9]) == [0, 2, 4]  # by hand, gap 0.12
    assert spaced_ticks([0.5]) == [0] and spaced_ticks([]) == []


def _p(n):
    from moeprof.report.compare import _params

    return _params(n)

"""Expert-load metrics users know from vLLM / NeMo (utilization, Jain, CV, exp(H)/E, dead fraction, weight mass):
computed from the exact routing counts by `moeprof.outliers.routing_balance`, stored under /routing, shown by the
leaderboard; checked against hand-computed values and plain numpy formulas."""

from __future__ import annotations

import io
import math

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console

from moeprof.outliers import model_balance, routing_balance
from moeprof.report.leaderboard import layer_summary, layer_summary_rows, leaderboard, leaderboard_rows
from moeprof.stats import ProfileStats, VectorSummary
from moeprof.store import ProfileMeta, open_store, write_profile

# layer -> tokens per expert (E = 4) and the routing weight each of that expert's tokens got
COUNTS = np.array([[6, 2, 0, 0], [3, 3, 1, 1]])
WEIGHTS = np.array([[0.5, 0.25, 0.0, 0.0], [0.9, 0.1, 0.6, 0.4]])


def _render(renderable) -> str:
    console = Console(width=240, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return " ".join(console.file.getvalue().split())


def _store(path, counts=COUNTS, weights=WEIGHTS, kinds=None, sources=("hand",)):
    L, E = counts.shape
    stats = ProfileStats(L, E, (0.5, 0.9), ("i",))
    for layer in range(L):
        ids = torch.tensor([e for e in range(E) for _ in range(counts[layer, e])], dtype=torch.long)
        w = torch.tensor([weights[layer, e] for e in range(E) for _ in range(counts[layer, e])], dtype=torch.float64)
        v = torch.arange(1.0, 9.0).repeat(len(ids), 1) * (1 + ids[:, None])  # [N, 8]
        stats.activations["i"].add(layer, ids, VectorSummary.of(v, (0.5, 0.9)))
        stats.routing.add(layer, ids[:, None], w[:, None])
    meta = ProfileMeta(model="hand/moe", model_type="test", architecture="Test", is_moe=E > 1, top_k=1,
                       hidden_size=8, model_config={}, data_sources=list(sources), tokens=int(counts.sum(1).max()),
                       seq_len=8, batch_size=1, dtype="float32", device="cpu")
    return write_profile(path, stats, meta, intermediate_sizes=[8] * L,
                         site_kinds=kinds or (["moe"] * L if E > 1 else ["dense"] * L))


def test_routing_balance_matches_the_hand_computed_example():
    b = routing_balance(COUNTS[:1], np.ones((1, 4), dtype=bool), (COUNTS * WEIGHTS)[:1])
    assert b["utilization"][0] == pytest.approx([3, 1, 0, 0])  # load ÷ ideal (8 / 4 = 2 per expert)
    assert b["jain"][0] == pytest.approx(64 / (4 * 40))  # (Σt)² / (n Σt²) = 0.4
    assert b["load_cv"][0] == pytest.approx(math.sqrt(6) / 2)  # population std 2.449 / mean 2
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert b["entropy_norm"][0] == pytest.approx(h / math.log(4))
    assert b["perplexity_frac"][0] == pytest.approx(math.exp(h) / 4)  # 0.4387
    assert b["dead_frac"][0] == 0.5 and b["max_mean_load"][0] == 3.0
    assert b["weight_share"][0] == pytest.approx([3 / 3.5, 0.5 / 3.5, 0, 0])


def test_routing_balance_equals_numpy_formulas_on_random_counts_with_padding_slots():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=(5, 7)).astype(np.int64)
    tokens[2, 3] = 0
    slots = np.ones((5, 7), dtype=bool)
    slots[4, 1:] = False  # a dense layer inside the MoE: one real slot
    b = routing_balance(tokens, slots)
    for l in range(4):
        t = tokens[l].astype(np.float64)
        assert b["utilization"][l] == pytest.approx(t / t.mean())
        assert b["load_cv"][l] == pytest.approx(np.std(t) / np.mean(t))
        assert b["jain"][l] == pytest.approx(1 / (1 + np.std(t) ** 2 / np.mean(t) ** 2))  # Jain = 1 / (1 + CV²)
        p = t[t > 0] / t.sum()
        assert b["perplexity_frac"][l] == pytest.approx(np.exp(-(p * np.log(p)).sum()) / 7)
        assert b["dead_frac"][l] == pytest.approx((t == 0).mean())
    assert np.isnan(b["jain"][4]) and np.isnan(b["load_cv"][4]) and b["utilization"][4, 0] == 1.0
    assert np.isnan(b["utilization"][4, 1:]).all()
    m = model_balance(b, slots)
    assert m["jain_mean"] == pytest.approx(np.mean(b["jain"][:4]))
    assert m["utilization_max"] == pytest.approx(np.nanmax(b["utilization"][:4]))
    assert m["dead_frac"] == pytest.approx((tokens[:4] == 0).sum() / 28)


def test_store_keeps_the_load_metrics_under_routing_and_reads_them_back(tmp_path):
    path = _store(tmp_path / "m.h5")
    want = routing_balance(COUNTS, np.ones((2, 4), dtype=bool), COUNTS * WEIGHTS)
    with h5py.File(path) as f:
        for name in ("utilization", "weight_share", "jain", "load_cv", "perplexity_frac", "dead_frac"):
            np.testing.assert_allclose(f[f"routing/{name}"][()], want[name])
            assert f[f"routing/{name}"].attrs["doc"]
        assert f["routing"].attrs["jain_mean"] == pytest.approx((0.4 + 64 / (4 * 20)) / 2)
        assert f["routing"].attrs["dead_frac"] == pytest.approx(2 / 8)
        # the weight mass the store always kept: Σ weights per expert
        np.testing.assert_allclose(f["routing/weight_sum"][()], COUNTS * WEIGHTS)
    with open_store(path) as st:
        bal = st.balance()
        np.testing.assert_allclose(bal.utilization, want["utilization"])
        assert bal.model["perplexity_frac_mean"] == pytest.approx(np.mean(want["perplexity_frac"]))


def test_leaderboard_shows_utilization_weight_mass_and_layer_fairness(tmp_path):
    path = _store(tmp_path / "m.h5")
    with open_store(path) as st:
        rows = {(r["layer"], r["expert"]): r for r in leaderboard_rows(st, top=None)}
        assert rows[(1, 2)]["utilization"] == pytest.approx(0.5)  # 1 token, mean 2
        assert rows[(1, 0)]["weight_share"] == pytest.approx(2.7 / (2.7 + 0.3 + 0.6 + 0.4))
        layers = layer_summary_rows(st)
        assert layers[1]["jain"] == pytest.approx(64 / (4 * 20)) and layers[0]["dead_frac"] == 0.5
        assert layers[1]["load_cv"] == pytest.approx(1.0 / 2.0)
        text = _render(layer_summary(st))
        table = _render(leaderboard(st, top=0))
    for header in ("Jain", "CV", "e^H/E", "H/log E"):
        assert header in text
    assert "model (mean over routed layers): Jain 0.600" in text  # (0.4 + 0.8) / 2
    assert "util" in table and "w.mass" in table and "67.5%" in table  # 2.7 / 4.0
    assert "6 of 6 experts shown" in table  # top 0: every live expert


def test_ascending_lists_the_least_used_experts_first(tmp_path):
    path = _store(tmp_path / "m.h5")
    with open_store(path) as st:
        rows = leaderboard_rows(st, by="tokens", ascending=True, top=3)
        desc = leaderboard_rows(st, by="tokens", top=None)
    assert [(r["layer"], r["expert"], r["tokens"]) for r in rows] == [(1, 2, 1), (1, 3, 1), (0, 1, 2)]
    assert [r["tokens"] for r in desc] == sorted((r["tokens"] for r in desc), reverse=True)


def test_dense_per_layer_table_drops_identical_columns_and_honours_top(tmp_path):
    path = _store(tmp_path / "d.h5", counts=np.array([[4], [4], [4]]), weights=np.ones((3, 1)))
    with open_store(path) as st:
        text = _render(layer_summary(st, top=2))
        assert len(layer_summary_rows(st)) == 3
    assert "2 of 3 layers shown" in text and "every layer saw 4 tokens" in text
    for gone in (" mean ", " min ", " max ", "Jain", "tokens "):
        assert gone not in text

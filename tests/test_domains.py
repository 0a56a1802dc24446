"""The multi-domain corpus (Wikipedia, OpenWebText, Python source) and the per-domain routing analysis:
mutual information between domain and expert choice (checked against H(D) + H(E) − H(D, E) and hand cases) and
the text × expert load figure of one MoE profiled on several texts."""

from __future__ import annotations

import ast
import math

import numpy as np
import pytest

from moeprof import corpora
from moeprof.outliers import routing_mutual_information
from moeprof.report.plots import load_by_text_figure, plot_all
from moeprof.store import open_store
from tests.test_load_metrics import _store


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_mutual_information_hand_cases():
    c = np.zeros((2, 3, 4))
    c[0, 0, :2], c[1, 0, 2:] = 5, 5  # layer 0: each domain has its own experts -> MI = H(D) = 1 bit
    c[:, 1, :] = 3  # layer 1: both domains route alike -> 0
    c[0, 2] = [4, 4, 0, 0]  # layer 2: domain 1 uses expert 0, 1, 2; overlap on 0, 1
    c[1, 2] = [2, 2, 4, 0]
    info = routing_mutual_information(c)
    assert info["mi_bits"][:2] == pytest.approx([1.0, 0.0], abs=1e-12)
    assert info["mi_frac"][:2] == pytest.approx([1.0, 0.0], abs=1e-12)
    # layer 2 by hand: P(d) = 1/2 each; P(e) = [3/8, 3/8, 1/4]; P(d, e) = [[1/4, 1/4, 0], [1/8, 1/8, 1/4]]
    pde = np.array([[1 / 4, 1 / 4, 0], [1 / 8, 1 / 8, 1 / 4]])
    pe = np.array([3 / 8, 3 / 8, 1 / 4])
    mi = sum(pde[d, e] * math.log2(pde[d, e] / (0.5 * pe[e])) for d in range(2) for e in range(3) if pde[d, e])
    assert info["mi_bits"][2] == pytest.approx(mi)
    assert routing_mutual_information(np.zeros((2, 1, 3)))["mi_bits"][0] != routing_mutual_information(
        np.zeros((2, 1, 3)))["mi_bits"][0]  # no routed token: NaN
    with pytest.raises(ValueError, match="domains, layers, experts"):
        routing_mutual_information(np.zeros((2, 3)))


def test_mutual_information_equals_the_entropy_identity_on_random_counts():
    rng = np.random.default_rng(7)
    c = rng.integers(0, 40, size=(3, 5, 6)).astype(np.float64)
    info = routing_mutual_information(c)
    for layer in range(5):
        joint = c[:, layer, :] / c[:, layer, :].sum()
        h_d, h_e, h_de = _entropy_bits(joint.sum(1)), _entropy_bits(joint.sum(0)), _entropy_bits(joint.ravel())
        assert info["mi_bits"][layer] == pytest.approx(h_d + h_e - h_de, abs=1e-10)
        assert info["domain_entropy_bits"][layer] == pytest.approx(h_d)
        assert 0 <= info["mi_frac"][layer] <= 1


def test_chunks_rejoin_to_the_modules_blocks_and_respect_the_size():
    source = "\n\n\n".join(f"def f{i}():\n    '''Doc {i}.'''\n    return {i}" for i in range(50)) + "\n"
    chunks = corpora.chunk_source(source, max_chars=200)
    assert "\n\n\n".join(chunks) == source.strip("\n")
    assert all(len(c) <= 200 for c in chunks) and len(chunks) > 5
    huge = "x = 1\n" * 100  # one block over the limit stays whole
    assert corpora.chunk_source(huge, max_chars=50) == [huge.strip("\n")]


@pytest.mark.real
def test_code_domain_is_real_python_with_docstrings_and_split_by_hash():
    train, held = corpora.texts("code", "train"), corpora.texts("code", "heldout")
    assert len(held) >= 20 and len(train) >= 5 * len(held)
    assert not set(train) & set(held)
    assert all(corpora.is_heldout(t) for t in held) and not any(corpora.is_heldout(t) for t in train)
    parsed = 0
    for text in train[:40]:
        try:
            ast.parse(text)  # a chunk is whole top-level blocks: most parse alone (decorated or nested ones may not)
            parsed += 1
        except SyntaxError:
            pass
    assert parsed >= 30
    assert sum('"""' in t for t in train) > len(train) / 2  # docstrings kept
    # the same size class as one prose source, not the whole library
    assert 400_000 < sum(map(len, train)) < 1_200_000


@pytest.mark.real
def test_domains_corpus_is_the_three_sources_interleaved():
    parts = corpora.domain_texts("domains", "heldout")
    assert list(parts) == ["wikipedia", "owt", "code"]
    assert parts["code"] == corpora.texts("code", "heldout")
    both = corpora.texts("domains", "heldout")
    assert sorted(both) == sorted(t for texts in parts.values() for t in texts)
    assert both[:3] == [parts["wikipedia"][0], parts["owt"][0], parts["code"][0]]
    assert corpora.domain_texts("owt", "train") == {"owt": corpora.texts("owt", "train")}


def _domain_stores(tmp_path):
    a = _store(tmp_path / "a.h5", counts=np.array([[6, 2, 0, 0], [3, 3, 1, 1]]), sources=["prose:heldout"])
    b = _store(tmp_path / "b.h5", counts=np.array([[0, 1, 3, 4], [2, 2, 2, 2]]), sources=["code:heldout"])
    return a, b


def test_load_by_text_shows_each_texts_share_and_the_mutual_information(tmp_path):
    a, b = _domain_stores(tmp_path)
    with open_store(a) as sa, open_store(b) as sb:
        fig = load_by_text_figure([sa, sb], labels=["prose", "code"])
        counts = np.stack([sa.routing().tokens, sb.routing().tokens]).astype(float)  # [D, L, E]
    info = routing_mutual_information(counts)
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 2  # one panel per layer
    np.testing.assert_allclose(images[0], counts[:, 0] / counts[:, 0].sum(1, keepdims=True))
    np.testing.assert_allclose(np.asarray(images[1]).sum(1), 1.0)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert f"MI {info['mi_bits'][0]:.3f} bits" in titles[0] and f"MI {info['mi_bits'][1]:.3f} bits" in titles[1]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["prose", "code"]


def test_plot_draws_the_load_by_text_only_for_one_moe_on_several_stores(tmp_path):
    a, b = _domain_stores(tmp_path)
    dense = _store(tmp_path / "dense.h5", counts=np.array([[4], [4]]), weights=np.ones((2, 1)))
    written = [p.name for p in plot_all([a, b, dense], tmp_path / "plots")]
    assert "moe_load_by_text.png" in written  # the model id's last component: "hand/moe"
    assert sum("load_by_text" in n for n in written) == 1
    alone = [p.name for p in plot_all([a], tmp_path / "plots1")]
    assert not any("load_by_text" in n for n in alone)
    with open_store(a) as sa, open_store(dense) as sd, pytest.raises(ValueError, match="one MoE"):
        load_by_text_figure([sa, sd])


def test_a_merged_store_beside_its_parts_and_the_same_text_twice_are_not_drawn_as_texts(tmp_path):
    from moeprof.merge import merge_stores

    a, b = _domain_stores(tmp_path)
    merged = merge_stores([a, b], tmp_path / "both.h5")  # sources prose + code: the union of the two parts
    with open_store(merged) as st:
        assert sorted(st.data_sources) == ["code:heldout", "prose:heldout"]
    written = [p.name for p in plot_all([a, b, merged], tmp_path / "plots")]
    assert written.count("moe_load_by_text.png") == 1
    with open_store(a) as sa, open_store(b) as sb, open_store(merged) as sm:
        fig = load_by_text_figure([sa, sb])
        assert len([ax for ax in fig.axes if ax.images][0].get_yticklabels()) == 2
        with pytest.raises(ValueError, match="own text"):
            load_by_text_figure([sa, sb, sm])  # asked for explicitly: refused, not double-counted
    twin = _store(tmp_path / "twin.h5", counts=np.array([[1, 1, 1, 1], [1, 1, 1, 1]]), sources=["prose:heldout"])
    assert not any("load_by_text" in p.name for p in plot_all([a, twin], tmp_path / "plots2"))

"""Streaming accumulators: merge(a, b) equals accumulating a ∪ b, and numbers match a direct computation."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeprof.stats import HIST_BINS, ProfileStats, RoutingStats, VectorSummary
from moeprof.topp import topp_curve

GRID = (0.5, 0.8, 0.9, 0.99)


def feed(stats: ProfileStats, chunks):
    for layer, ids, v, idx, w in chunks:
        s = VectorSummary.of(v, stats.p_grid)
        for t in stats.types:
            stats.activations[t].add(layer, ids, s)
        stats.routing.add(layer, idx, w)


def random_chunks(seed: int, n_chunks: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_chunks):
        n = int(torch.randint(1, 9, (1,), generator=g))
        layer = int(torch.randint(0, 3, (1,), generator=g))
        ids = torch.randint(0, 5, (n,), generator=g)
        v = torch.randn(n, 11, generator=g) * torch.rand(n, 1, generator=g) * 5
        idx = torch.randint(0, 5, (n, 2), generator=g)
        out.append((layer, ids, v, idx, torch.rand(n, 2, generator=g)))
    return out


def assert_same(a: ProfileStats, b: ProfileStats):
    for t in a.types:
        x, y = a.activations[t], b.activations[t]
        for name in ("vectors", "hist", "width"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        for name in ("sparsity_sum", "sparsity_sqsum", "l1_sum", "l2_sum", "max_abs_sum", "max_abs",
                     "peak_ratio_sum"):
            assert torch.allclose(getattr(x, name), getattr(y, name), atol=1e-9), name
    assert torch.equal(a.routing.tokens, b.routing.tokens)
    assert torch.allclose(a.routing.weight_sum, b.routing.weight_sum)
    assert torch.equal(a.routing.layer_tokens, b.routing.layer_tokens)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(0, 6))
def test_merge_equals_accumulating_the_union(seed, n_a, n_b):
    chunks = random_chunks(seed, n_a + n_b)
    a, b, union = (ProfileStats(3, 5, GRID, ("x", "i")) for _ in range(3))
    feed(a, chunks[:n_a])
    feed(b, chunks[n_a:])
    feed(union, chunks)
    assert_same(a.merge(b), union)
    assert_same(b.merge(a), union)


def test_mean_std_and_histogram_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(40, 16, generator=g) ** 3
    ids = torch.arange(40) % 2
    stats = ProfileStats(1, 2, GRID, ("i",))
    stats.activations["i"].add(0, ids, VectorSummary.of(v, GRID))
    s = 1 - topp_curve(v, GRID).double() / 16  # [40, P]
    acc = stats.activations["i"]
    for e in range(2):
        rows = s[ids == e]
        assert torch.allclose(acc.mean_sparsity()[0, e], rows.mean(0))
        assert torch.allclose(acc.std_sparsity()[0, e], rows.std(0, unbiased=False), atol=1e-9)
        hist = torch.stack([torch.histc(rows[:, j], bins=HIST_BINS, min=0, max=1) for j in range(len(GRID))])
        assert torch.equal(acc.hist[0, e].double(), hist.double())
    assert torch.allclose(acc.max_abs[0, 0], v[ids == 0].abs().max().double())
    assert torch.allclose(acc.l1_sum[0, 1], v[ids == 1].abs().sum().double())


def test_unseen_experts_are_nan_not_zero():
    stats = ProfileStats(2, 3, GRID, ("u",))
    stats.activations["u"].add(1, torch.tensor([2]), VectorSummary.of(torch.ones(1, 4), GRID))
    mean = stats.activations["u"].mean_sparsity()
    assert mean[0].isnan().all() and mean[1, :2].isnan().all()
    # all-equal entries: top-p keeps ceil(p·4) of them
    assert mean[1, 2].tolist() == [0.5, 0.0, 0.0, 0.0]


def test_state_size_does_not_grow_with_tokens():
    stats = ProfileStats(1, 4, GRID, ("i",))

    def size():
        acc = stats.activations["i"]
        return sum(t.numel() for t in vars(acc).values() if isinstance(t, torch.Tensor))

    before = size()
    for _ in range(20):
        stats.activations["i"].add(0, torch.randint(0, 4, (64,)), VectorSummary.of(torch.randn(64, 32), GRID))
    assert size() == before and int(stats.activations["i"].vectors.sum()) == 20 * 64


def test_routing_merge_and_default_weights():
    a, b = RoutingStats(1, 3), RoutingStats(1, 3)
    a.add(0, torch.tensor([[0, 1]]), None)
    b.add(0, torch.tensor([[1, 2], [1, 0]]), torch.tensor([[0.7, 0.3], [0.6, 0.4]]))
    m = a.merge(b)
    assert m.tokens.tolist() == [[2, 3, 1]] and m.layer_tokens.tolist() == [3]
    assert torch.allclose(m.weight_sum, torch.tensor([[1.4, 2.3, 0.3]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# The |entry| histogram read off the sorted rows


def _awkward_entries(g: torch.Generator) -> torch.Tensor:
    """Entries on every bin edge, one float32 step either side of it, zeros, subnormals, under- and overflow."""
    import numpy as np

    from moeprof.stats import ABS_EDGES

    e = torch.as_tensor(ABS_EDGES, dtype=torch.float32)
    v = torch.cat([e, torch.nextafter(e, torch.zeros(1)), torch.nextafter(e, torch.full((1,), np.inf)),
                   torch.zeros(40), torch.tensor([1e-45, 1e-40, 5e-7, 3e38, 2e4, 1e4]),
                   torch.exp(torch.randn(900, generator=g) * 6)])
    return v * torch.sign(torch.randn(v.shape, generator=g) + 0.1)  # signs (and -0.0) ignored


def test_histogram_from_sorted_rows_equals_the_direct_histogram_exactly():
    """Counts per bin from edge positions in the sorted rows == binning each entry (ties at edges, zeros)."""
    import numpy as np

    from moeprof.stats import ABS_EDGES
    from moeprof.stats.abs_bins import expert_bin_counts, sorted_row_bin_counts
    from moeprof.topp import ascending_abs_prefix

    g = torch.Generator().manual_seed(3)
    entries = _awkward_entries(g)
    rows = entries[torch.randperm(entries.numel(), generator=g)][: 37 * 41].reshape(37, 41)
    rows[5] = 0.0  # an all-zero row
    rows[6] = ABS_EDGES[120].item()  # a row all tied with one edge
    ids = torch.randint(0, 4, (37,), generator=g)
    for v in (rows, rows.bfloat16(), rows.double()):
        ascending, _ = ascending_abs_prefix(v)
        per_row = sorted_row_bin_counts(ascending)  # [37, A]
        direct = expert_bin_counts(v, ids, 4)
        assert torch.equal(torch.zeros_like(direct).index_add_(0, ids, per_row), direct)
        edges = np.concatenate([[0.0], ABS_EDGES, [np.inf]])
        for r in (0, 5, 6):
            want, _ = np.histogram(np.abs(v[r].float().numpy()).astype(np.float64), bins=edges)
            np.testing.assert_array_equal(per_row[r].numpy(), want)
    assert int(per_row[5, 0]) == 41 and int(per_row[6, 121]) == 41  # zeros in bin 0; an edge opens its bin


def test_profile_histogram_counts_each_routed_copy_of_a_token_once_per_expert():
    """Type x: K experts share one token's sort; the histogram still counts every routed copy, like binning the
    copies one by one does."""
    from moeprof.stats import AbsHistogram, Observation, ProfileShape
    from moeprof.stats.abs_bins import expert_bin_counts

    g = torch.Generator().manual_seed(5)
    tokens = _awkward_entries(g)[: 9 * 50].reshape(9, 50)
    tok = torch.tensor([0, 0, 1, 2, 2, 2, 5, 8, 8, 3])  # a token's copies, as capture groups them by expert
    ids = torch.tensor([0, 2, 1, 0, 1, 3, 3, 2, 0, 1])
    summary = VectorSummary.of(tokens, GRID).select(tok)
    acc = AbsHistogram.empty(ProfileShape(2, 4, GRID), "x")
    acc.add(Observation(1, "x", ids, tok, torch.zeros(10, dtype=torch.long), vectors=tokens[tok], summary=summary,
                        p_grid=GRID))
    assert torch.equal(acc.counts[1], expert_bin_counts(tokens[tok], ids, 4))
    assert int(acc.counts[0].sum()) == 0

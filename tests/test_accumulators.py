"""The accumulator protocol, for every registered statistic: merge(a, b) == accumulate(a ∪ b), exact HDF5 round
trip, no state field dropped; a profile's store holds the exact state and rebuilds ProfileStats (v1 and v2)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from moeprof.capture import Engine
from moeprof.schema import Field
from moeprof.stats import (
    STATISTICS,
    Observation,
    ProfileShape,
    ProfileStats,
    TableAccumulator,
    TraceRecorder,
    register,
)
from moeprof.store import (
    Critical,
    ProfileMeta,
    open_store,
    schema_table,
    update_store,
    write_critical,
    write_profile,
)

SHAPE = ProfileShape(num_layers=3, num_experts=5, p_grid=(0.5, 0.8, 0.9, 0.99), types=("x", "i"), top_k=2,
                     trace_tokens=20)
WIDTH = 11


def instances(shape: ProfileShape = SHAPE):
    """(id, factory) of every registered accumulator, one per activation type for the per-type ones."""
    return [(f"{key}-{t}" if t else key, (cls, t)) for key, cls in STATISTICS.items()
            for t in (shape.types if cls.per_type else (None,))]


PARAMS = [pytest.param(spec, id=name) for name, spec in instances()]


def batches(seed: int, n: int, first_sequence: int = 0):
    """Return n batches: (input_ids [B, S], first_sequence, observations) of a random routed stream."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        B, S = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        T, K = B * S, SHAPE.top_k
        obs = []
        for layer in range(SHAPE.num_layers):
            top = torch.stack([torch.randperm(SHAPE.num_experts, generator=g)[:K] for _ in range(T)])  # [T, K]
            weights = torch.rand(T, K, generator=g)
            obs.append(Observation.routing(layer, top, weights))
            for t in SHAPE.types:
                v = torch.randn(T * K, WIDTH, generator=g) * torch.rand(T * K, 1, generator=g) * 5  # [T·K, D]
                obs.append(Observation(layer, t, top.reshape(-1), torch.arange(T).repeat_interleave(K),
                                       torch.arange(K).repeat(T), vectors=v, p_grid=SHAPE.p_grid))
        out.append((torch.randint(0, 100, (B, S), generator=g), first_sequence, obs))
        first_sequence += B
    return out


def feed(acc, stream):
    for ids, first, obs in stream:
        acc.begin_batch(ids, first)
        for o in obs:
            acc.add(o)
        acc.end_batch(ids.numel())
    return acc


def assert_same_state(a, b):
    sa, sb = a.state(), b.state()
    assert list(sa) == list(sb)
    for name in sa:
        x, y = sa[name], sb[name]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if x.is_floating_point():
            assert torch.allclose(x, y, rtol=1e-12, atol=0, equal_nan=True), name
        else:
            assert torch.equal(x, y), name


def split_streams(seed: int, n_a: int, n_b: int):
    a = batches(seed, n_a)
    b = batches(seed + 1, n_b)  # its own stream: sequences counted from 0
    union = a + batches(seed + 1, n_b, first_sequence=a[-1][1] + a[-1][0].shape[0] if a else 0)
    return a, b, union


@pytest.mark.parametrize("spec", PARAMS)
@pytest.mark.parametrize("seed, n_a, n_b", [(0, 3, 4), (1, 1, 1), (2, 5, 2), (3, 0, 3)])
def test_merge_equals_accumulating_the_union(spec, seed, n_a, n_b):
    cls, t = spec
    a, b, union = split_streams(seed, n_a, n_b)
    acc_a, acc_b, acc_u = (feed(cls.empty(SHAPE, t), s) for s in (a, b, union))
    assert_same_state(acc_a.merge(acc_b), acc_u)


@pytest.mark.parametrize("spec", PARAMS)
def test_fed_state_is_not_trivial(spec):
    """Guards the merge test: every state field actually moves when fed (else equality would prove nothing)."""
    cls, t = spec
    empty, fed = cls.empty(SHAPE, t), feed(cls.empty(SHAPE, t), batches(5, 3))
    for name, value in fed.state().items():
        assert not torch.equal(value, empty.state()[name]), name


@pytest.mark.parametrize("spec", PARAMS)
def test_merge_keeps_every_state_field(spec):
    """Merging with an empty accumulator changes nothing: a field that merge dropped (left at zero) fails."""
    cls, t = spec
    fed = feed(cls.empty(SHAPE, t), batches(6, 2))
    assert_same_state(fed.merge(cls.empty(SHAPE, t)), fed)


@pytest.mark.parametrize("cls", [c for c in STATISTICS.values() if issubclass(c, TableAccumulator)],
                         ids=lambda c: c.key)
def test_every_tensor_attribute_is_a_declared_state_field(cls):
    """State that is not in the STATE table would be silently dropped by the derived merge / to_hdf5."""
    acc = cls.empty(SHAPE, SHAPE.types[0] if cls.per_type else None)
    tensors = {k for k, v in vars(acc).items() if isinstance(v, torch.Tensor)}
    assert tensors == {f.name for f in cls.STATE}
    assert all(f.reduce in ("sum", "max") for f in cls.STATE) and all(f.reduce == "" for f in cls.DERIVED)


@pytest.mark.parametrize("spec", PARAMS)
def test_hdf5_round_trip_is_exact(spec, tmp_path):
    cls, t = spec
    acc = feed(cls.empty(SHAPE, t), batches(7, 3))
    with h5py.File(tmp_path / "a.h5", "w") as f:
        acc.to_hdf5(f.create_group("g"))
    with h5py.File(tmp_path / "a.h5", "r") as f:
        back = cls.from_hdf5(f["g"])
        for name in f["g"]:
            assert f["g"][name].attrs["doc"] and "units" in f["g"][name].attrs, name
    assert_same_state(back, acc)
    assert_same_state(back.merge(acc), acc.merge(acc))  # and it keeps accumulating like the original


def test_trace_merge_is_the_concatenated_stream_and_not_commutative():
    a, b, union = split_streams(11, 2, 2)
    ta, tb = (feed(TraceRecorder.empty(SHAPE), s) for s in (a, b))
    ab, ba = ta.merge(tb), tb.merge(ta)
    assert ab.recorded == min(SHAPE.trace_tokens, ta.offset + tb.offset)
    assert ab.sequence[ta.recorded:ab.recorded].min() >= ta.sequences  # b's sequences come after a's
    assert not torch.equal(ab.token_id, ba.token_id)


def test_merge_rejects_different_shapes():
    for cls, t in (spec for _, spec in instances()):
        other = cls.empty(ProfileShape(2, 5, SHAPE.p_grid, SHAPE.types, SHAPE.top_k, SHAPE.trace_tokens), t)
        with pytest.raises(ValueError, match="cannot merge"):
            cls.empty(SHAPE, t).merge(other)


# ---------------------------------------------------------------------------------------------------------------
# ProfileStats, Engine and the store write and read whatever is registered


def _meta(tokens: int) -> ProfileMeta:
    return ProfileMeta(model="m", model_type="test", architecture="Test", is_moe=True, top_k=SHAPE.top_k,
                       hidden_size=WIDTH, model_config={}, data_sources=["random"], tokens=tokens, seq_len=4,
                       batch_size=2, dtype="float32", device="cpu")


def profile_store(path: Path, stream, *, trace: bool = True, kinds=None):
    stats = ProfileStats(SHAPE.num_layers, SHAPE.num_experts, SHAPE.p_grid, SHAPE.types)
    tr = TraceRecorder.empty(SHAPE) if trace else None
    for ids, first, obs in stream:
        if tr is not None:
            tr.begin_batch(ids, first)
        for o in obs:
            stats.add(o)
            if tr is not None:
                tr.add(o)
        if tr is not None:
            tr.end_batch(ids.numel())
    write_profile(path, stats, _meta(sum(ids.numel() for ids, _, _ in stream)), intermediate_sizes=[WIDTH] * 3,
                  site_kinds=kinds or ["routed"] * 3, trace=tr, token_texts=[str(i) for i in range(SHAPE.trace_tokens)])
    return stats, tr


def assert_same_profile(a: ProfileStats, b: ProfileStats):
    assert list(a.members) == list(b.members)
    for key in a.members:
        assert_same_state(a.members[key], b.members[key])


def test_store_keeps_exact_state_and_rebuilds_profile_stats(tmp_path):
    stats, trace = profile_store(tmp_path / "p.h5", batches(21, 4))
    with open_store(tmp_path / "p.h5") as st:
        back = ProfileStats.from_store(st)
        trace_back = TraceRecorder.from_hdf5(st.member_group(TraceRecorder))
    assert_same_profile(back, stats)
    assert_same_state(trace_back, trace)


def test_stores_of_two_halves_merge_to_the_store_of_the_whole(tmp_path):
    a, b, union = split_streams(22, 3, 2)
    paths = [tmp_path / f"{n}.h5" for n in ("a", "b", "u")]
    for path, stream in zip(paths, (a, b, union)):
        profile_store(path, stream)
    with open_store(paths[0]) as sa, open_store(paths[1]) as sb, open_store(paths[2]) as su:
        assert_same_profile(ProfileStats.from_store(sa).merge(ProfileStats.from_store(sb)),
                            ProfileStats.from_store(su))


def test_every_dataset_is_in_the_schema_table_with_its_doc_and_units(tmp_path):
    profile_store(tmp_path / "p.h5", batches(23, 2))
    write_critical(tmp_path / "p.h5", Critical.from_items(
        {"critical_p": 0.8, "type": "i"}, {"per_expert_sparsity": np.zeros((3, 5)), "tolerance_p_grid": np.ones(3),
                                           "points/p": np.ones(2)}))
    table = schema_table(STATISTICS)
    patterns = [(re.compile("^" + re.escape(f.name).replace(re.escape("{type}"), "(x|u|g|i)")
                            .replace(re.escape("{rule}"), "(?:[^/]+)").replace(re.escape("{task}"), "(?:[^/]+)")
                            + "$"), f) for f in table]
    with open_store(tmp_path / "p.h5") as st:
        layout = st.layout()
    for name, _, _, doc, units in layout:
        matches = [(rx, f) for rx, f in patterns if rx.match(name)]
        assert matches, f"{name} is not in the schema table"
        rx, f = matches[0]
        t = rx.match(name).groups()[0] if rx.groups else None
        assert (doc, units) == (f.doc_for(t), f.units), name


def test_leaderboard_reads_outliers_from_the_store(tmp_path):
    from moeprof.report import leaderboard_rows

    profile_store(tmp_path / "p.h5", batches(24, 3))
    with update_store(tmp_path / "p.h5") as f:
        z = f["outliers/i/sparsity_z"]
        z[...] = np.where(np.isnan(z[()]), np.nan, 9.0)
        f["outliers/i/flagged"][...] = ~np.isnan(z[()])
    with open_store(tmp_path / "p.h5") as st:
        rows = leaderboard_rows(st, type="i", p=0.9, top=None)
    assert rows and all(r["z"] == 9.0 and r["outlier"] for r in rows)


def test_a_new_registered_statistic_is_collected_written_and_read_without_other_changes(tmp_path, monkeypatch):
    """What a new statistic does: one class, registered; Engine, ProfileStats and the store follow."""

    class SquaredNorm(TableAccumulator):
        key, group = "squared_norm", "squared_norm"
        STATE = (Field("sum", ("L", "E"), "float64", "sum of |v|² of {name} [layer, expert]", "units²", "sum"),)

        def add(self, obs):
            if obs.type == self.type and obs.vectors is not None:
                ids = obs.expert_ids.reshape(-1).long().cpu()
                self.sum[obs.layer].index_add_(0, ids, obs.vectors.double().pow(2).sum(-1).cpu())

    monkeypatch.setitem(STATISTICS, SquaredNorm.key, SquaredNorm)
    stats = ProfileStats(1, 2, (0.9,), ("i",))
    engine = Engine([], stats=stats)
    v = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    engine.process(0, "i", v, torch.tensor([0, 1, 1]), torch.arange(3), torch.zeros(3, dtype=torch.long))
    assert stats.members[("squared_norm", "i")].sum.tolist() == [[25.0, 5.0]]
    assert int(stats.activations["i"].vectors.sum()) == 3  # the built-in statistics were fed the same call
    write_profile(tmp_path / "n.h5", stats, _meta(3), intermediate_sizes=[2], site_kinds=["routed"])
    with open_store(tmp_path / "n.h5") as st:
        assert st.member_group(SquaredNorm, "i")["sum"][()].tolist() == [[25.0, 5.0]]
        assert_same_profile(ProfileStats.from_store(st), stats)


def test_register_refuses_a_second_class_under_the_same_key():
    class Again(TableAccumulator):
        key, group = "routing", "routing"

    with pytest.raises(ValueError, match="already registered"):
        register(Again)


def test_no_raw_hdf5_paths_outside_the_store():
    root = Path(__file__).parents[1] / "moeprof"
    # a path spelled as a literal or f-string, the h5py file, or any path handed to the store's raw reader
    raw = re.compile(r"""\.file\[|\.file\.|["'](sparsity|magnitude|routing|outliers|trace|critical|sites)/"""
                     r"""|\._?dataset\(""")
    offenders = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py") if p.relative_to(root).parts[0] != "store"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if raw.search(line)]
    assert offenders == []


# ---------------------------------------------------------------------------------------------------------------
# Schema-1 stores still open everywhere


def downgrade_to_v1(path: Path) -> None:
    """Make `path` look like a store written by schema 1: drop what schema 2 added, kinds as "moe"."""
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 1
        for t in SHAPE.types:
            for name in ("sum", "sqsum"):
                del f[f"sparsity/{t}/{name}"]
            for name in ("vectors", "l1_sum", "l2_sum", "max_abs_sum", "peak_ratio_sum"):
                del f[f"magnitude/{t}/{name}"]
            for g in (f[f"sparsity/{t}"], f[f"magnitude/{t}"]):
                del g.attrs["type"]
        for name in ("max_tokens", "tokens_seen", "sequences_seen"):
            del f["trace"].attrs[name]
        del f["sites/kind"]
        f["sites/kind"] = np.array([b"moe"] * SHAPE.num_layers, dtype="S5")


@pytest.mark.parametrize("drop_outliers", [False, True])
def test_schema_1_store_reads_in_info_leaderboard_plots_and_stats(tmp_path, drop_outliers):
    from moeprof.report import info_renderables, layer_summary_rows, leaderboard, leaderboard_rows, plot_all

    stream = batches(31, 4)
    v2, v1 = tmp_path / "v2.h5", tmp_path / "v1.h5"
    stats, _ = profile_store(v2, stream)
    profile_store(v1, stream)
    downgrade_to_v1(v1)
    if drop_outliers:  # a store from before /outliers existed: the reader computes them
        with h5py.File(v1, "r+") as f:
            del f["outliers"]
    with open_store(v1) as old, open_store(v2) as new:
        assert old.version == 1 and old.sites().kind == ["routed"] * 3
        for kw in (dict(type="i", p=0.9), dict(type="x", p=0.5)):
            a, b = leaderboard_rows(old, top=None, **kw), leaderboard_rows(new, top=None, **kw)
            assert [(r["layer"], r["expert"]) for r in a] == [(r["layer"], r["expert"]) for r in b]
            for ra, rb in zip(a, b):
                for k, v in rb.items():
                    assert ra[k] == pytest.approx(v, nan_ok=True, rel=1e-12), k
        assert layer_summary_rows(old, "i", 0.9) == layer_summary_rows(new, "i", 0.9)
        leaderboard(old)
        info_renderables(old)
        rebuilt = ProfileStats.from_store(old)
        for key, member in stats.members.items():
            for name, value in member.state().items():
                got = rebuilt.members[key].state()[name]
                assert torch.allclose(got, value, rtol=1e-9, atol=1e-12), (key, name)
    assert len(plot_all([v1], tmp_path / "figs")) == 2



def test_trace_state_declares_concat_and_is_never_all_reduced():
    from moeprof.distributed import reducible

    assert {f.reduce for f in TraceRecorder.STATE} == {"concat"}  # stream rows, not derived ("")
    assert not reducible(TraceRecorder.empty(SHAPE))
    assert all(reducible(cls.empty(SHAPE, SHAPE.types[0] if cls.per_type else None)) for cls in STATISTICS.values()
               if issubclass(cls, TableAccumulator))
    with pytest.raises(ValueError, match="unknown reduction 'append'"):
        Field("x", ("N",), "int64", "doc", "", "append")


def test_max_abs_is_nan_for_experts_without_tokens():
    import io

    from moeprof.stats import Observation
    from moeprof.stats.activation import Magnitudes
    from moeprof.stats.base import ProfileShape

    acc = Magnitudes.empty(ProfileShape(1, 3, (0.5,), ("i",)), "i")
    v = torch.tensor([[3.0, -4.0], [1.0, 0.5]])
    acc.add(Observation(0, "i", torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([0, 0]), vectors=v,
                        p_grid=(0.5,)))
    with h5py.File(io.BytesIO(), "w") as f:
        acc.to_hdf5(f.create_group("m"))
        stored = f["m/max_abs"][()]
        assert stored[0, 0] == 4.0 and math.isnan(stored[0, 1]) and stored[0, 2] == 1.0  # expert 1: no token
        back = Magnitudes.from_hdf5(f["m"])  # NaN reads back as the max reduction's neutral 0 (merges exactly)
    assert back.max_abs.tolist() == [[4.0, 0.0, 1.0]]

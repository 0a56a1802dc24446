"""Effective rank (moeprof.stats.rank): exact against torch.linalg.svdvals on the captured matrices, mergeable,
stored as /rank/<t>, refused past its memory budget, shown in the leaderboard."""

import h5py
import numpy as np
import pytest
import torch

from moeprof.capture import Engine, attach
from moeprof.cli import main
from moeprof.errors import UsageError
from moeprof.models import load_model
from moeprof.profile import rank_members
from moeprof.stats import EffectiveRank, effective_rank
from moeprof.store import open_store

TEXT = ("The river ran past the old mill, where children played with boats made of paper and string. "
        "Experts in a mixture route each token to a few of them; most of the mass sits in few entries. ") * 6


class Rows:
    """Observer keeping every row of one type per (layer, expert), in order (the brute-force reference)."""

    def __init__(self, type):
        self.type, self.rows = type, {}

    def add(self, obs):
        if obs.type != self.type:
            return
        for e in obs.expert_ids.unique().tolist():
            self.rows.setdefault((obs.layer, e), []).append(obs.vectors[obs.expert_ids == e].double())


def _capture(model, tok, type, texts):
    from moeprof.arch import adapter_for

    sites = adapter_for(model).sites(model)
    L, E = len(sites), max(s.num_experts for s in sites)
    width = max(s.hidden_size if type == "x" else s.intermediate_size for s in sites)
    rank, rows = EffectiveRank.for_layers(L, E, type, width), Rows(type)
    with attach(model, Engine(sites, observers=[rows, rank])), torch.inference_mode():
        for text in texts:
            model(input_ids=tok(text, return_tensors="pt").input_ids[:, :96], use_cache=False)
    return rank, rows


def _svd_reference(rows):
    return {k: float(effective_rank(torch.linalg.svdvals(torch.cat(v)))) for k, v in rows.rows.items()}


def test_effective_rank_of_a_hand_built_matrix():
    # singular values (3, 1, 0): q = (0.75, 0.25), H = -(0.75 ln 0.75 + 0.25 ln 0.25)
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert float(effective_rank(torch.tensor([3.0, 1.0, 0.0]))) == pytest.approx(np.exp(h), rel=1e-12)
    assert float(effective_rank(torch.ones(5))) == pytest.approx(5.0)
    assert torch.isnan(effective_rank(torch.zeros(3)))


@pytest.mark.parametrize("type", ["x", "i"])
def test_gram_rank_matches_svdvals_of_the_captured_tiny_moe_matrix(type):
    model, tok = load_model("tiny-moe")
    rank, rows = _capture(model, tok, type, [TEXT])
    ref = _svd_reference(rows)
    got = rank.effective_rank()
    assert len(ref) > 10  # many (layer, expert) pairs saw tokens
    errs = [abs(float(got[l, e]) - r) / r for (l, e), r in ref.items()]
    assert max(errs) <= 0.02, max(errs)
    assert max(errs) < 1e-4  # the Gram method is exact up to rounding (sqrt of eigenvalues near 0)
    for l, e in zip(*torch.nonzero(rank.vectors == 0, as_tuple=True)):
        assert torch.isnan(got[l, e])  # experts that saw nothing have no rank
    assert int(rank.vectors.sum()) == sum(torch.cat(v).shape[0] for v in rows.rows.values())


def test_two_shards_merge_to_one_pass():
    model, tok = load_model("tiny-moe")
    halves = [TEXT[: len(TEXT) // 2], TEXT[len(TEXT) // 2:]]
    whole, _ = _capture(model, tok, "i", halves)
    a, _ = _capture(model, tok, "i", halves[:1])
    b, _ = _capture(model, tok, "i", halves[1:])
    merged = a.merge(b)
    assert torch.equal(merged.vectors, whole.vectors)
    assert torch.allclose(merged.gram, whole.gram, rtol=1e-12, atol=1e-12)
    assert torch.allclose(merged.effective_rank(), whole.effective_rank(), equal_nan=True)


def test_merge_refuses_other_kept_layers():
    a = EffectiveRank.for_layers(4, 2, "i", 3, layers=[0, 2])
    with pytest.raises(ValueError, match="different layers"):
        a.merge(EffectiveRank.for_layers(4, 2, "i", 3, layers=[1]))


def test_subset_of_layers_keeps_only_those_and_the_budget_refuses_with_the_estimate():
    from moeprof.arch import adapter_for

    model, _ = load_model("tiny-moe")
    sites = adapter_for(model).sites(model)
    members = rank_members(sites, ("x", "i"), layers=[1])
    assert members[("rank", "i")].gram.shape[0] == 1 and members[("rank", "i")].kept == [1]
    with pytest.raises(UsageError, match=r"GiB.*--rank-layers"):
        rank_members(sites, ("x", "i"), memory_gib=1e-6)
    with pytest.raises(UsageError, match="layers 0.."):
        rank_members(sites, ("x",), layers=[99])


def test_profile_rank_writes_rank_groups_and_a_plain_profile_does_not(tmp_path):
    from moeprof.merge import merge_stores
    from moeprof.profile import profile
    from moeprof.report.leaderboard import leaderboard_rows
    from moeprof.store import open_store

    model, tok = load_model("tiny-moe")
    data = tmp_path / "d.txt"
    data.write_text(TEXT * 4)

    def run(out, **kw):
        profile(model, tok, [str(data)], tmp_path / out, model_id="tiny-moe", types=("x", "i"), max_tokens=128,
                seq_len=32, batch_size=2, show_progress=False, p_grid=(0.5, 0.9), **kw)

    run("plain.h5")
    run("r.h5", rank=True)
    for i in range(2):
        run(f"s{i}.h5", rank=True, shard=(i, 2))
    merge_stores([tmp_path / "s0.h5", tmp_path / "s1.h5"], tmp_path / "m.h5")
    with open_store(tmp_path / "plain.h5") as st:
        assert st.effective_rank("i") is None and "rank" not in {n.split("/")[0] for n, *_ in st.layout()}
    with open_store(tmp_path / "r.h5") as st, open_store(tmp_path / "m.h5") as mt:
        for t in ("x", "i"):
            er, method = st.effective_rank(t)
            assert er.shape == (st.num_layers, st.num_experts) and "Gram" in method
            live = st.routing_tokens() > 0
            assert np.all(np.isfinite(er[live])) and np.all(er[live] >= 1)
            np.testing.assert_allclose(mt.effective_rank(t)[0], er, rtol=1e-9, equal_nan=True)
        rows = leaderboard_rows(st, type="i", p=0.9, top=None)
        assert all(r["effective_rank"] == pytest.approx(st.effective_rank("i")[0][r["layer"], r["expert"]])
                   for r in rows)


def test_cli_refuses_rank_past_the_budget_in_one_line(tmp_path, capsys):
    from moeprof.cli import main

    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    out = tmp_path / "r.h5"
    assert main(["profile", "tiny-moe", "--data", str(data), "--rank", "--rank-memory", "0.000001",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err and "--rank-layers" in err and not out.exists()


@pytest.mark.real
def test_gram_rank_matches_svdvals_on_smollm2(smollm2):
    model, tok = smollm2
    rank, rows = _capture(model, tok, "x", [TEXT[:300]])  # x (576 wide): i (1536) costs minutes of eigvalsh
    ref = _svd_reference(rows)
    got = rank.effective_rank()
    errs = [abs(float(got[l, e]) - r) / r for (l, e), r in ref.items()]
    assert len(errs) == 30 and max(errs) <= 0.02, max(errs)


def test_rank_layers_keep_every_site_of_the_layer(qwen2_moe, tmp_path, capsys):
    _, _, out = qwen2_moe
    with open_store(out) as st:
        erank, _ = st.effective_rank("i")
        with h5py.File(out) as f:
            assert f["rank/i"].attrs["layers"].tolist() == [1, 2]  # rows of layer 1: routed and shared
            vectors = f["rank/i/vectors"][()]
            # the Gram is as wide as the kept sites (experts and shared expert: 32), not layer 0's dense MLP (64)
            assert f["rank/i/gram"].shape == (2, 4, 32, 32) and f["rank/x/gram"].shape == (2, 4, 48, 48)
        assert np.isnan(erank[0]).all() and vectors[0].sum() == 0  # layer 0 (dense) not kept
        assert np.isfinite(erank[1]).all() and np.isfinite(erank[2, 0])  # the shared expert is layer 1's too
        assert vectors[2, 0] == 64  # every token went through it
    folder, data, _ = qwen2_moe
    code = main(["profile", str(folder), "--data", str(data), "--out", str(tmp_path / "x.h5"), "--max-tokens", "16",
                 "--seq-len", "16", "--rank", "--rank-layers", "2"])
    assert code == 2 and "layers 0..1" in capsys.readouterr().err  # the model's decoder layers, not its rows

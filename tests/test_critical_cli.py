"""`moeprof critical` end to end on a tiny MoE: /critical lands in the store, the leaderboard shows it."""


import h5py
import numpy as np
import pytest
from conftest import save_tiny_moe_and_text

from moeprof.cli import main
from moeprof.report.leaderboard import leaderboard_rows
from moeprof.store import open_store

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crit")
    return (*save_tiny_moe_and_text(root), root)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_critical_writes_search_and_tolerance_into_the_profile(setup, capsys):
    ckpt, data, root = setup
    store = root / "moe.h5"
    assert run(capsys, "profile", ckpt, "--data", data, "--out", store, "--seq-len", 32, "--max-tokens", 256)[0] == 0
    code, out, err = run(capsys, "critical", ckpt, "--type", "i", "--task", f"ppl:{data}", "--out", store,
                         "--seq-len", 32, "--max-tokens", 512, "--batch-size", 4)
    assert code == 0, err
    assert "critical p =" in " ".join(out.split())
    with h5py.File(store) as f:
        g = f["critical"]
        p_star = float(g.attrs["critical_p"])
        assert 0.0 < p_star <= 1.0 and g.attrs["type"] == "i" and g.attrs["target"] == 0.99
        ratio = g["points/ratio"][()]
        passed = g["points/passed"][()]
        assert np.array_equal(passed, ratio >= 0.99)
        # the critical p is an evaluated passing point, and every evaluated point above it passes too
        ps = g["points/p"][()]
        assert p_star in ps.tolist() and p_star < 1.0  # something sparser than dense passed
        assert passed[ps > p_star].all()
        assert 1 <= int(g.attrs["num_evaluations"]) <= 12
        per = g["per_expert_sparsity"][()]
        assert per.shape == (2, 7)
        tol = g["tolerance_sparsity"][()]
        assert tol.shape == (2, 7) and np.nanmax(tol) <= 1 and np.nanmin(tol) >= 0
        assert np.nanmax(tol) > 0.1  # some expert tolerates real sparsity within the 5% error budget
        # the headline is the realized sparsity of the evaluated critical point, not p
        at = ps.tolist().index(p_star)
        assert g.attrs["critical_sparsity_token"] == pytest.approx(g["points/sparsity_token"][at])
        assert 0.0 < g.attrs["critical_sparsity_token"] < 1.0
    with open_store(store) as st:  # profile data untouched, critical columns appear in the leaderboard
        assert st.routing_tokens().sum() == 2 * 256 * 3
        rows = leaderboard_rows(st, type="i", p=0.9, top=None)
        assert all(np.isclose(r["critical_sparsity"], per[r["layer"], r["expert"]], equal_nan=True) for r in rows)


def test_critical_bad_inputs_fail_fast_with_one_line(setup, capsys, tmp_path):
    ckpt, data, root = setup
    store = tmp_path / "x-only.h5"
    assert run(capsys, "profile", ckpt, "--data", data, "--out", store, "--seq-len", 32, "--max-tokens", 64,
               "--types", "x")[0] == 0
    for argv, match in (
        (["--type", "i", "--task", f"ppl:{data}", "--out", store], "was not profiled"),
        (["--type", "i", "--task", "hellaswg"], "did you mean 'hellaswag'"),
        (["--type", "z", "--task", f"ppl:{data}"], "not an activation type"),
        (["--type", "i", "--task", f"ppl:{data}", "--target", "0"], "(0, 1]"),
        (["--type", "i", "--task", f"ppl:{tmp_path / 'none.txt'}"], "no file"),
    ):
        code, _, err = run(capsys, "critical", ckpt, *argv)
        assert code == 2 and match.lower() in " ".join(err.split()).lower(), (argv, err)
        assert len([l for l in err.splitlines() if l.strip()]) == 1, err

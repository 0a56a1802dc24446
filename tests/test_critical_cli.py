"""`moeprof critical` end to end on a tiny MoE: /critical lands in the store, the leaderboard shows it."""


import json
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import interrupt_mid_run, profile_store, refused, run_cli, save_tiny_moe_and_text

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


@pytest.mark.parametrize("argv, match", [
    (["--limit", "0"], "--limit: must be at least 1"), (["--limit", "-2"], "--limit: must be at least 1"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
])
def test_critical_counts_are_refused(moe_ckpt, moe_text, argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["critical", str(moe_ckpt), "--task", f"ppl:{moe_text}", *argv])
    assert exc.value.code == 2 and match in capsys.readouterr().err


def _record(type, task, p):
    from moeprof.store import Critical

    return Critical(dict(type=type, rule="topp", task=task, critical_p=p, target=0.99),
                    per_expert_sparsity=np.full((2, 7), p), points=dict(p=np.array([p]), passed=np.array([True])))


def test_critical_keeps_one_record_per_search_and_reads_old_stores(moe_ckpt, moe_text, tmp_path, capsys):
    from moeprof.report.leaderboard import leaderboard
    from moeprof.store import update_store, write_critical

    out = profile_store(capsys, moe_ckpt, moe_text, tmp_path / "c.h5", "--types", "x,i")
    with update_store(out) as f:  # a store of one search, as written before records were keyed
        g = f.create_group("critical")
        g.attrs.update(type="i", rule="topp", task="old", critical_p=0.5)
        g["per_expert_sparsity"] = np.full((2, 7), 0.5)
    with open_store(out) as st:
        assert st.critical().attrs["task"] == "old" and len(st.criticals()) == 1
    write_critical(out, _record("x", "ppl:/a/b.txt", 0.7))
    write_critical(out, _record("i", "new", 0.8))
    write_critical(out, _record("x", "ppl:/a/b.txt", 0.6))  # the same search again: replaced, not added
    with open_store(out) as st:
        got = {(c.attrs["type"], c.attrs["task"]): c.attrs["critical_p"] for c in st.criticals()}
        assert got == {("i", "old"): 0.5, ("x", "ppl:/a/b.txt"): 0.6, ("i", "new"): 0.8}
        assert st.critical().attrs["critical_p"] == 0.6  # the latest
        assert st.critical(type="i").attrs["task"] == "new" and st.critical(task="old").attrs["critical_p"] == 0.5
        np.testing.assert_array_equal(st.critical(type="i").per_expert_sparsity, np.full((2, 7), 0.8))
        caption = str(leaderboard(st, type="i").caption)
    with h5py.File(out) as f:  # /critical mirrors the latest search for readers of the one-search layout
        assert f["critical"].attrs["critical_p"] == 0.6 and f["critical/x/topp/ppl:|a|b.txt"].attrs["critical_p"] == 0.6
    assert all(task in caption for task in ("for old", "for new", "for ppl:/a/b.txt")), caption


def test_critical_refuses_another_models_store_before_the_search(moe_ckpt, moe_text, tmp_path, capsys, monkeypatch):
    import shutil

    import moeprof.critical as critical

    monkeypatch.setattr(critical, "run_critical", lambda *a, **k: pytest.fail("the search started"))
    out = profile_store(capsys, moe_ckpt, moe_text, tmp_path / "id.h5")
    twin = tmp_path / "twin"  # the same shape, another model
    shutil.copytree(moe_ckpt, twin)
    before = out.read_bytes()
    refused(capsys, "critical", twin, "--task", f"ppl:{moe_text}", "--out", out, match=f"profiles '{moe_ckpt}', not '{twin}'")
    with h5py.File(out, "r+") as f:  # the same id, another config (e.g. the checkpoint was changed)
        cfg = json.loads(f.attrs["model_config"])
        cfg["num_experts_per_tok"] += 1
        f.attrs["model_config"] = json.dumps(cfg)
    refused(capsys, "critical", moe_ckpt, "--task", f"ppl:{moe_text}", "--out", out, match="with another config")
    assert out.read_bytes() != before  # (only the test's own edit)


def test_critical_removes_the_store_it_created_when_it_fails(moe_ckpt, moe_text, tmp_path, capsys, monkeypatch):
    import moeprof.critical as critical
    from moeprof.critical import CriticalSearchError

    out = tmp_path / "made.h5"

    def made(model, tokenizer, path, **kw):
        Path(path).write_bytes(b"a store made for the search")
        return True

    def fails(*a, **k):
        raise CriticalSearchError("the dense model scores 0 on this task; choose another task")

    monkeypatch.setattr(critical, "ensure_store", made)
    monkeypatch.setattr(critical, "run_critical", fails)
    refused(capsys, "critical", moe_ckpt, "--task", f"ppl:{moe_text}", "--out", out, match="scores 0")
    assert not out.exists()


def _critical_group(path) -> dict:
    """Return {name: attrs and values} of every object under the store's /critical group."""
    items = {}
    with h5py.File(path) as f:
        def visit(name, obj):
            value = obj[()] if isinstance(obj, h5py.Dataset) else None
            items[name] = ({k: v for k, v in obj.attrs.items()}, value)
        items[""] = ({k: v for k, v in f["critical"].attrs.items()}, None)
        f["critical"].visititems(visit)
    return items


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_critical_search_resumes_from_its_journal_to_the_uninterrupted_record(moe_ckpt, moe_text, tmp_path,
                                                                             capsys, signum, status):
    import shutil

    from moeprof.evaluate.journal import journal_path

    store = profile_store(capsys, moe_ckpt, moe_text, tmp_path / "p.h5")
    whole, resumed = tmp_path / "whole.h5", tmp_path / "resumed.h5"
    shutil.copy(store, whole)
    shutil.copy(store, resumed)
    argv = [moe_ckpt, "--type", "i", "--task", f"ppl:{moe_text}", "--seq-len", 16, "--max-tokens", 128,
            "--batch-size", 4]
    code, _, err = run_cli(capsys, "critical", *argv, "--out", whole)
    assert code == 0, err
    assert not journal_path(whole).exists()  # a finished search leaves no journal

    journal = journal_path(resumed)
    code, out, err = interrupt_mid_run("critical", [*argv, "--out", resumed], journal, pause_at=3,
                                       marker='"point"', signum=signum)
    assert code == status, err
    assert "3 completed evaluations are kept in" in " ".join(out.split()), out
    with h5py.File(resumed) as f:
        assert "critical" not in f  # the interrupted search wrote no record
    with open(journal) as f:
        assert f.read().count('"point"') == 3

    code, out, err = run_cli(capsys, "critical", *argv, "--out", resumed)
    assert code == 0, err
    assert "resuming: 3 evaluations" in " ".join(out.split()), out
    assert not journal.exists()
    a, b = _critical_group(whole), _critical_group(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0].keys() == b[name][0].keys(), name
        for k in a[name][0]:
            np.testing.assert_array_equal(a[name][0][k], b[name][0][k], err_msg=f"{name} attr {k}")
        if a[name][1] is not None:
            np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)
    assert int(a[""][0]["num_evaluations"]) > 3  # the resumed run had evaluations left to make

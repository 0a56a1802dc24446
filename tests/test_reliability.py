"""Reliability (issue 13): no user file lost, full disks and SIGTERM survived, bad input refused in one line."""

import errno
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import save_tiny_checkpoint, tiny_tokenizer
from families import tiny

import moeprof.atomic as atomic
from moeprof.cli import main
from moeprof.store import open_store

TEXT = ("The experts of a mixture-of-experts layer each see only the tokens the router sends them. "
        "Profiling their activations shows how many entries carry most of the mass. ") * 12
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = tiny_tokenizer()
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-moe"), model=tiny("qwen3_moe", vocab_size=len(tok)),
                                tokenizer=tok)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("\n".join(json.dumps({"text": TEXT[i * 100:(i + 1) * 100 + 200]}) for i in range(10)))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv, match):
    code, _, err = run(capsys, *argv)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert match in " ".join(err.split()), err
    return err


def profile(capsys, ckpt, data, out, *extra):
    code, _, err = run(capsys, "profile", ckpt, "--data", data, "--out", out, "--seq-len", 16, "--max-tokens", 32,
                       *extra)
    assert code == 0, err
    return out


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------- 1. --out


def test_out_never_replaces_the_data_or_other_files_without_force(ckpt, data, tmp_path, capsys):
    copy = tmp_path / "d.jsonl"
    copy.write_bytes(data.read_bytes())
    before = copy.read_bytes()
    refused(capsys, "profile", ckpt, "--data", copy, "--out", copy, "--seq-len", 16, "--max-tokens", 32,
            match="is not a moeprof store")
    assert copy.read_bytes() == before
    readonly = tmp_path / "ro.h5"
    profile(capsys, ckpt, data, readonly)
    readonly.chmod(0o444)
    snapshot = readonly.read_bytes()
    refused(capsys, "profile", ckpt, "--data", data, "--out", readonly, match="read-only")
    assert readonly.read_bytes() == snapshot
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    refused(capsys, "profile", ckpt, "--data", data, "--out", link, match="is a symlink")
    assert link.is_symlink() and target.read_text() == "keep me"
    refused(capsys, "merge", readonly, "-o", copy, match="is not a moeprof store")
    assert copy.read_bytes() == before
    refused(capsys, "critical", ckpt, "--task", f"ppl:{data}", "--out", copy, match="is not a moeprof store")
    assert copy.read_bytes() == before
    # asked for: --force replaces; a symlink keeps being a symlink and its target is written
    profile(capsys, ckpt, data, copy, "--force")
    profile(capsys, ckpt, data, link, "--force")
    assert link.is_symlink() and open_store(target).num_layers == 2


def test_replacing_a_store_keeps_its_critical_and_schedules(ckpt, data, tmp_path, capsys):
    from moeprof.store import update_store

    out = profile(capsys, ckpt, data, tmp_path / "s.h5")
    with update_store(out) as f:
        f.create_group("critical").attrs["critical_p"] = 0.7
        f.create_group("schedules/mine").attrs["note"] = "hand-made"
    profile(capsys, ckpt, data, out)  # naming the store replaces its profile ...
    with h5py.File(out) as f:  # ... and carries over what other commands added
        assert f["critical"].attrs["critical_p"] == 0.7 and f["schedules/mine"].attrs["note"] == "hand-made"
    with h5py.File(out, "r+") as f:  # the same results, now of a model of another shape: refused before the run
        f.attrs["num_layers"] = 5
    before = out.read_bytes()
    refused(capsys, "profile", ckpt, "--data", data, "--out", out, "--seq-len", 16, "--max-tokens", 32,
            match="of a model with [layers, experts] = (5, 7)")
    assert out.read_bytes() == before


def test_plot_output_checks(ckpt, data, tmp_path, capsys):
    store = profile(capsys, ckpt, data, tmp_path / "p.h5")
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(capsys, "plot", store, "-o", afile, match="is a file")
    assert afile.read_text() == "x"
    folder = tmp_path / "plots"
    refused(capsys, "plot", tmp_path / "missing.h5", "-o", folder, match="does not exist")
    assert not folder.exists()  # inputs are checked before the folder is made


def test_unwritable_out_fails_before_the_run(ckpt, data, capsys, monkeypatch):
    import moeprof.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    refused(capsys, "profile", ckpt, "--data", data, "--out", "/proc/x.h5", match="cannot create files in /proc")


# ---------------------------------------------------------------------------------------------- 2. full disk


def test_full_disk_is_one_line_and_keeps_the_old_store(ckpt, data, tmp_path, capsys, monkeypatch):
    out = profile(capsys, ckpt, data, tmp_path / "full.h5")
    before = out.read_bytes()
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            self.f.write(bytes(b)[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "open", lambda p, mode="r", *a, **k: Full(real_open(p, mode, *a, **k)),
                        raising=False)
    err = refused(capsys, "profile", ckpt, "--data", data, "--out", out, "--seq-len", 16, "--max-tokens", 32,
                  match=f"disk full writing {out}")
    assert "MB needed" in err
    assert out.read_bytes() == before and temp_files(tmp_path) == []


def test_full_disk_detected_before_the_run(ckpt, data, tmp_path, capsys, monkeypatch):
    import shutil

    import moeprof.profile as prof

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    monkeypatch.setattr(prof, "iter_batches", lambda *a, **k: pytest.fail("the run started"))
    refused(capsys, "profile", ckpt, "--data", data, "--out", tmp_path / "x.h5", "--seq-len", 16,
            match="MB needed, 0.0 MB free")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a tmpfs needs root on Linux")
def test_full_tmpfs_in_a_subprocess(ckpt, data, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = subprocess.run([sys.executable, "-m", "moeprof", "profile", str(ckpt), "--data", str(data), "--out",
                               str(mnt / "run.h5"), "--seq-len", "16", "--max-tokens", "32", "--types", "x,u,g,i"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "disk full writing" in proc.stderr and "MB needed" in proc.stderr
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------------- 3. SIGTERM


def test_sigterm_removes_the_temporary_file_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "old.txt"
    out.write_text("old")
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        import moeprof.cli.reports as cli
        from moeprof.atomic import atomic_path
        def cmd(args):
            with atomic_path({str(out)!r}) as tmp:
                tmp.write_text("half-written")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
        cli.cmd_info = cmd
        from moeprof.cli import main
        sys.exit(main(["info", "x"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 143 and "terminated" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert out.read_text() == "old" and temp_files(tmp_path) == []


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(ckpt, data, tmp_path, capsys):
    out = profile(capsys, ckpt, data, tmp_path / "term.h5")
    before = out.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, sys
        import moeprof.profile as prof
        real = prof.iter_batches
        def batches(*a, **k):
            for i, b in enumerate(real(*a, **k)):
                if i == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield b
        prof.iter_batches = batches
        from moeprof.cli import main
        sys.exit(main(["profile", {str(ckpt)!r}, "--data", {str(data)!r}, "--out", {str(out)!r}, "--seq-len", "16",
                       "--max-tokens", "512", "--batch-size", "1", "--checkpoint-every", "16"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 143 and "terminated" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert out.read_bytes() == before and temp_files(tmp_path) == []


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "out.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.h5.tmp-{int(dead.stdout)}-1"
    live = tmp_path / f".out.h5.tmp-{os.getppid()}-1"  # a running process: still writing, left alone
    other = tmp_path / f".other.h5.tmp-{int(dead.stdout)}-1"  # another output's: not ours to remove
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    atomic.write_text(target, "done")
    assert target.read_text() == "done" and not stale.exists() and live.exists() and other.exists()


# ---------------------------------------------------------------------------------------------- 5. missing items


def test_a_store_missing_a_dataset_names_it_and_its_command(ckpt, data, tmp_path, capsys):
    out = profile(capsys, ckpt, data, tmp_path / "m.h5")
    with h5py.File(out, "r+") as f:
        del f["routing/tokens"]
    refused(capsys, "leaderboard", out, match="has no dataset 'routing/tokens'; the store is incomplete: `moeprof "
            "profile MODEL")
    with h5py.File(out, "r+") as f:  # plots read dead experts from /outliers/dead, not routing: take what they need
        del f["sparsity/i/mean"]
    refused(capsys, "plot", out, "-o", tmp_path / "plots", match="'sparsity/i/mean'")
    with h5py.File(out, "r+") as f:
        del f["p_grid"]
    refused(capsys, "info", out, match="has no dataset 'p_grid'")
    with h5py.File(out, "r+") as f:
        f.attrs["schema_version"] = "abc"
    refused(capsys, "info", out, match=f"{out} has schema_version 'abc'")


# ---------------------------------------------------------------------------------------------- 7/9. bad values


@pytest.mark.parametrize("argv, match", [
    (["--limit", "0"], "--limit: must be at least 1"), (["--limit", "-2"], "--limit: must be at least 1"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
])
def test_critical_counts_are_refused(ckpt, data, argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["critical", str(ckpt), "--task", f"ppl:{data}", *argv])
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_profile_counts_and_seq_len_beyond_the_model(ckpt, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["profile", str(ckpt), "--data", str(data), "--trace-tokens", "-3"])
    assert exc.value.code == 2 and "--trace-tokens: must be at least 0" in capsys.readouterr().err
    code, out, err = run(capsys, "profile", ckpt, "--data", data, "--out", tmp_path / "long.h5", "--seq-len", 80,
                         "--max-tokens", 80, "--batch-size", 1)
    assert code == 0, err
    assert "--seq-len 80 is beyond qwen3_moe's maximum positions (64)" in " ".join(out.split())


def test_jsonl_rows_that_are_arrays_and_recipe_items_of_the_wrong_type(ckpt, tmp_path, capsys):
    arrays = tmp_path / "a.jsonl"
    arrays.write_text('["some", "text"]\n["more"]\n')
    refused(capsys, "profile", ckpt, "--data", arrays, "--out", tmp_path / "a.h5", match="a.jsonl:1 is a JSON array")
    for body, match in [("types = [1, 2]", "types must be a non-empty list of strings"),
                        ('p_grid = ["a"]', "p_grid must be a non-empty list of numbers"),
                        ("data = [3]", "data must be a non-empty list of strings"),
                        ("max_tokens = 0", "--max-tokens must be a whole number >= 1")]:
        recipe = tmp_path / "r.toml"
        recipe.write_text(f'model = "{ckpt}"\ndata = "{arrays}"\n' * ("data" not in body) + f"{body}\n"
                          + (f'model = "{ckpt}"\n' if "data" in body else ""))
        refused(capsys, "profile", "--recipe", recipe, "--out", tmp_path / "r.h5", match=match)


def test_sparsify_refuses_experts_and_p_that_would_do_nothing():
    from moeprof.capture import sparsify

    model = tiny("qwen3_moe", vocab_size=64)
    for kwargs, match in [({"experts": [99]}, "experts [99] do not exist; the model has experts 0..6"),
                          ({"experts": [-1]}, "experts [-1] do not exist"),
                          ({"p": float("nan")}, "p is NaN"),
                          ({"p": torch.ones(3)}, "must have shape [layers, experts] = [2, 7], got [3]"),
                          ({"p": torch.ones(2, 7, 1)}, "got [2, 7, 1]"),
                          ({"p": "abc"}, "p must be a number in [0, 1]"),
                          ({"p": torch.full((2, 7), 2.0)}, "p must lie in [0, 1]")]:
        with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("]", r"\]")):
            with sparsify(model, type="i", **{"p": 0.5, **kwargs}):
                pass


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


def test_unknown_model_type_lists_the_supported_families(tmp_path, capsys):
    from moeprof.models import ModelLoadError, config_from_recipe

    with pytest.raises(ModelLoadError, match="moeprof supports model_type .*qwen3_moe"):
        config_from_recipe({"model": "x", "config": {"model_type": "made_up_moe"}})


# ---------------------------------------------------------------------------------------------- 4. critical


def _record(type, task, p):
    from moeprof.store import Critical

    return Critical(dict(type=type, rule="topp", task=task, critical_p=p, target=0.99),
                    per_expert_sparsity=np.full((2, 7), p), points=dict(p=np.array([p]), passed=np.array([True])))


def test_critical_keeps_one_record_per_search_and_reads_old_stores(ckpt, data, tmp_path, capsys):
    from moeprof.report.leaderboard import leaderboard
    from moeprof.store import update_store, write_critical

    out = profile(capsys, ckpt, data, tmp_path / "c.h5", "--types", "x,i")
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


def test_critical_refuses_another_models_store_before_the_search(ckpt, data, tmp_path, capsys, monkeypatch):
    import shutil

    import moeprof.critical as critical

    monkeypatch.setattr(critical, "run_critical", lambda *a, **k: pytest.fail("the search started"))
    out = profile(capsys, ckpt, data, tmp_path / "id.h5")
    twin = tmp_path / "twin"  # the same shape, another model
    shutil.copytree(ckpt, twin)
    before = out.read_bytes()
    refused(capsys, "critical", twin, "--task", f"ppl:{data}", "--out", out, match=f"profiles '{ckpt}', not '{twin}'")
    with h5py.File(out, "r+") as f:  # the same id, another config (e.g. the checkpoint was changed)
        cfg = json.loads(f.attrs["model_config"])
        cfg["num_experts_per_tok"] += 1
        f.attrs["model_config"] = json.dumps(cfg)
    refused(capsys, "critical", ckpt, "--task", f"ppl:{data}", "--out", out, match="with another config")
    assert out.read_bytes() != before  # (only the test's own edit)


def test_critical_removes_the_store_it_created_when_it_fails(ckpt, data, tmp_path, capsys, monkeypatch):
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
    refused(capsys, "critical", ckpt, "--task", f"ppl:{data}", "--out", out, match="scores 0")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- 8. lm-eval


@pytest.mark.parametrize("args, match", [
    ("type=q,p=0.9", "type='q': unknown activation type"), ("type=i,p=2", "p=2.0: p must lie in [0, 1]"),
    ("type=i,p=nan", "p=nan: p must lie in [0, 1]"), ("type=i,rule=foo,p=0.9", "rule='foo'"),
    ("type=i,p=abc", "p='abc' is not a number"), ("type=i,p=0.9,layers=9", "layers [9] do not exist"),
    ("type=i,p=0.9,experts=x", "experts='x' is not a list"),
])
def test_lm_eval_model_args_are_checked_in_the_constructor(ckpt, args, match):
    from moeprof.evaluate.lm_eval_model import MoeprofLM, ModelArgsError

    with pytest.raises(ModelArgsError, match=match.replace("[", r"\[").replace("]", r"\]")) as exc:
        MoeprofLM.create_from_arg_string(f"pretrained={ckpt},{args}")
    assert isinstance(exc.value, ValueError)


@pytest.mark.slow  # lm-eval indexes its thousands of task files first (~20 s)
def test_lm_eval_launcher_prints_a_bad_model_arg_as_one_line(ckpt, capsys):
    from moeprof.evaluate.__main__ import main as launcher

    with pytest.raises(SystemExit) as exc:
        launcher(["--model", "moeprof", "--model_args", f"pretrained={ckpt},type=i,p=abc", "--tasks", "arc_easy"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert "p='abc' is not a number" in err


# ---------------------------------------------------------------------------------------------- 6. NaN / Inf


def test_nonfinite_activation_is_located_or_skipped_and_counted(tmp_path):
    from moeprof.capture import NonFiniteActivation
    from moeprof.profile import profile as run_profile

    tok = tiny_tokenizer()
    model = tiny("qwen3_moe", vocab_size=len(tok))
    with torch.no_grad():  # expert 3 of layer 1 computes NaN for every token routed to it (its x stays finite)
        model.model.layers[1].mlp.experts.gate_up_proj[3].fill_(float("nan"))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    kw = dict(model_id="tiny", max_tokens=64, seq_len=16, batch_size=2, show_progress=False, types=("x", "u", "i"))
    with pytest.raises(NonFiniteActivation, match=r"layer 1, expert 3, type u, token \d+ of the batch "
                                                  r"\(sequence [01] of the batch, position \d+\)"):
        run_profile(model, tok, [str(text)], tmp_path / "err.h5", **kw)
    assert not (tmp_path / "err.h5").exists()
    out = run_profile(model, tok, [str(text)], tmp_path / "skip.h5", on_nonfinite="skip", **kw).path
    with open_store(out) as st:
        routed = int(st.routing().tokens[1, 3])
        assert routed > 0
        assert json.loads(st.attrs["nonfinite_skipped"]) == {"x": 0, "u": routed, "i": routed}
        assert st.sparsity("u").vectors[1, 3] == 0 and st.sparsity("x").vectors[1, 3] == routed
        assert np.isfinite(st.sparsity("u").mean[0]).all()  # layer 0 untouched


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a tmpfs needs root on Linux")
def test_real_enospc_on_a_small_tmpfs_without_the_precheck(ckpt, data, tmp_path, capsys, monkeypatch):
    import moeprof.store.writer as store

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(atomic, "check_space", lambda *a: None)  # reach the real write, past the pre-checks
        monkeypatch.setattr(store, "check_space", lambda *a: None)
        err = refused(capsys, "profile", ckpt, "--data", data, "--out", mnt / "run.h5", "--seq-len", 16,
                      "--max-tokens", 32, match=f"disk full writing {mnt / 'run.h5'}")
        assert "MB needed" in err and list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)

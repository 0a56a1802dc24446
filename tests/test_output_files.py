"""Output files: an existing file is never replaced without --force unless it is the store being updated, and a
write is never left half-done under the real name (full disk, Ctrl-C, SIGTERM); temporary files of dead processes
are removed."""

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, hand_store, profile_store, refused, run_cli

import moeprof.atomic as atomic
from moeprof.cli import main
from moeprof.store import open_store


def test_out_never_replaces_the_data_or_other_files_without_force(moe_ckpt, moe_text, tmp_path, capsys):
    copy = tmp_path / "d.jsonl"
    copy.write_bytes(moe_text.read_bytes())
    before = copy.read_bytes()
    refused(capsys, "profile", moe_ckpt, "--data", copy, "--out", copy, "--seq-len", 16, "--max-tokens", 32,
            match="is not a moeprof store")
    assert copy.read_bytes() == before
    readonly = tmp_path / "ro.h5"
    profile_store(capsys, moe_ckpt, moe_text, readonly)
    readonly.chmod(0o444)
    snapshot = readonly.read_bytes()
    refused(capsys, "profile", moe_ckpt, "--data", moe_text, "--out", readonly, match="read-only")
    assert readonly.read_bytes() == snapshot
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    refused(capsys, "profile", moe_ckpt, "--data", moe_text, "--out", link, match="is a symlink")
    assert link.is_symlink() and target.read_text() == "keep me"
    refused(capsys, "merge", readonly, "-o", copy, match="is not a moeprof store")
    assert copy.read_bytes() == before
    refused(capsys, "critical", moe_ckpt, "--task", f"ppl:{moe_text}", "--out", copy, match="is not a moeprof store")
    assert copy.read_bytes() == before
    # asked for: --force replaces; a symlink keeps being a symlink and its target is written
    profile_store(capsys, moe_ckpt, moe_text, copy, "--force")
    profile_store(capsys, moe_ckpt, moe_text, link, "--force")
    assert link.is_symlink() and open_store(target).num_layers == 2


def test_replacing_a_store_keeps_its_critical_and_schedules(moe_ckpt, moe_text, tmp_path, capsys):
    from moeprof.store import update_store

    out = profile_store(capsys, moe_ckpt, moe_text, tmp_path / "s.h5")
    with update_store(out) as f:
        f.create_group("critical").attrs["critical_p"] = 0.7
        f.create_group("schedules/mine").attrs["note"] = "hand-made"
    profile_store(capsys, moe_ckpt, moe_text, out)  # naming the store replaces its profile ...
    with h5py.File(out) as f:  # ... and carries over what other commands added
        assert f["critical"].attrs["critical_p"] == 0.7 and f["schedules/mine"].attrs["note"] == "hand-made"
    with h5py.File(out, "r+") as f:  # the same results, now of a model of another shape: refused before the run
        f.attrs["num_layers"] = 5
    before = out.read_bytes()
    refused(capsys, "profile", moe_ckpt, "--data", moe_text, "--out", out, "--seq-len", 16, "--max-tokens", 32,
            match="of a model with [layers, experts] = (5, 7)")
    assert out.read_bytes() == before


def test_plot_output_checks(moe_ckpt, moe_text, tmp_path, capsys):
    store = profile_store(capsys, moe_ckpt, moe_text, tmp_path / "p.h5")
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(capsys, "plot", store, "-o", afile, match="is a file")
    assert afile.read_text() == "x"
    folder = tmp_path / "plots"
    refused(capsys, "plot", tmp_path / "missing.h5", "-o", folder, match="does not exist")
    assert not folder.exists()  # inputs are checked before the folder is made


def test_plot_of_a_store_that_fails_half_way_leaves_no_folder_and_no_png(tmp_path, capsys):
    store = hand_store(tmp_path / "s.h5")
    with h5py.File(store, "r+") as f:  # the curves can be drawn, the heatmap (routing) cannot
        del f["routing/tokens"]
    folder = tmp_path / "plots" / "run"
    refused(capsys, "plot", store, "-o", folder, match="routing/tokens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no folder, no PNG, no hidden staging folder
    existing = tmp_path / "kept"
    existing.mkdir()
    (existing / "old.png").write_bytes(b"an earlier figure")
    refused(capsys, "plot", store, "-o", existing, match="routing/tokens")
    assert [p.name for p in existing.iterdir()] == ["old.png"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "kept", "s.h5"]


def test_a_plot_killed_mid_way_leaves_a_staging_folder_that_the_next_plot_removes(tmp_path, capsys):
    store = hand_store(tmp_path / "s.h5")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".figs.tmp-{int(dead.stdout)}-1"  # what a SIGKILLed `plot -o figs` leaves behind
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "half.png").write_bytes(b"half a figure")
    live = tmp_path / f".figs.tmp-{os.getppid()}-1"  # a running plot's: still drawing, left alone
    live.mkdir()
    code, _, err = run_cli(capsys, "plot", store, "-o", tmp_path / "figs")
    assert code == 0, err
    assert not stale.exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "figs", "s.h5"])
    assert any(p.suffix == ".png" for p in (tmp_path / "figs").iterdir())


def test_plot_on_a_full_disk_creates_no_folder(tmp_path, capsys, monkeypatch):
    import moeprof.report.plots as plots

    store = hand_store(tmp_path / "s.h5")

    def full(fig, path):
        raise atomic.disk_full(path, 1 << 20)

    monkeypatch.setattr(plots, "_save", full)
    folder = tmp_path / "plots"
    refused(capsys, "plot", store, "-o", folder, match="disk full writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_unwritable_out_fails_before_the_run(moe_ckpt, moe_text, capsys, monkeypatch):
    import moeprof.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    refused(capsys, "profile", moe_ckpt, "--data", moe_text, "--out", "/proc/x.h5", match="cannot create files in /proc")


def test_full_disk_is_one_line_and_keeps_the_old_store(moe_ckpt, moe_text, tmp_path, capsys, monkeypatch):
    out = profile_store(capsys, moe_ckpt, moe_text, tmp_path / "full.h5")
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
    err = refused(capsys, "profile", moe_ckpt, "--data", moe_text, "--out", out, "--seq-len", 16, "--max-tokens", 32,
                  match=f"disk full writing {out}")
    assert "MB needed" in err
    assert out.read_bytes() == before and temp_files(tmp_path) == []


def test_full_disk_detected_before_the_run(moe_ckpt, moe_text, tmp_path, capsys, monkeypatch):
    import shutil

    import moeprof.profile as prof

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    monkeypatch.setattr(prof, "iter_batches", lambda *a, **k: pytest.fail("the run started"))
    refused(capsys, "profile", moe_ckpt, "--data", moe_text, "--out", tmp_path / "x.h5", "--seq-len", 16,
            match="MB needed, 0.0 MB free")


def test_full_disk_detected_before_the_critical_search(moe_ckpt, moe_text, tmp_path, capsys, monkeypatch):
    import shutil

    import moeprof.critical.pipeline as pipeline

    out = profile_store(capsys, moe_ckpt, moe_text, tmp_path / "c.h5")
    before = out.read_bytes()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: usage._replace(free=2 * out.stat().st_size))
    monkeypatch.setattr(pipeline, "task_evaluator", lambda *a, **k: pytest.fail("the search started"))
    refused(capsys, "critical", moe_ckpt, "--task", f"ppl:{moe_text}", "--out", out, "--seq-len", 16,
            match=f"disk full writing {out}")
    assert out.read_bytes() == before and temp_files(tmp_path) == []


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a tmpfs needs root on Linux")
def test_full_tmpfs_in_a_subprocess(moe_ckpt, moe_text, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = subprocess.run([sys.executable, "-m", "moeprof", "profile", str(moe_ckpt), "--data", str(moe_text), "--out",
                               str(mnt / "run.h5"), "--seq-len", "16", "--max-tokens", "32", "--types", "x,u,g,i"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "disk full writing" in proc.stderr and "MB needed" in proc.stderr
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


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
def test_sigterm_is_handled_like_ctrl_c(moe_ckpt, moe_text, tmp_path, capsys):
    out = profile_store(capsys, moe_ckpt, moe_text, tmp_path / "term.h5")
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
        sys.exit(main(["profile", {str(moe_ckpt)!r}, "--data", {str(moe_text)!r}, "--out", {str(out)!r}, "--seq-len", "16",
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


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a tmpfs needs root on Linux")
def test_real_enospc_on_a_small_tmpfs_without_the_precheck(moe_ckpt, moe_text, tmp_path, capsys, monkeypatch):
    import moeprof.store.writer as store

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(atomic, "check_space", lambda *a: None)  # reach the real write, past the pre-checks
        monkeypatch.setattr(store, "check_space", lambda *a: None)
        err = refused(capsys, "profile", moe_ckpt, "--data", moe_text, "--out", mnt / "run.h5", "--seq-len", 16,
                      "--max-tokens", 32, match=f"disk full writing {mnt / 'run.h5'}")
        assert "MB needed" in err and list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_replacing_a_store_keeps_its_results_only_for_the_same_model_and_config(tmp_path):
    from moeprof.schedule import Schedule
    from moeprof.store import StoreError, check_replace, write_schedule

    path = hand_store(tmp_path / "s.h5")
    write_schedule(path, "kept", Schedule(np.full((2, 4), 0.9), "i"))
    hand_store(path)  # the same model again: its schedule is kept
    with open_store(path) as st:
        assert st.schedule_names() == ["kept"]
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"holds /schedules of 'hand/moe', not 'other/moe'"):
        hand_store(path, model="other/moe")  # same shape, another model: its results would describe nothing
    with pytest.raises(StoreError, match="another config"):
        hand_store(path, config={"model_type": "test", "num_local_experts": 4, "num_hidden_layers": 7})
    with pytest.raises(StoreError, match="not 'other/moe'"):  # the same check before a run
        check_replace(path, 2, 4, "other/moe", {"model_type": "test"})
    assert path.read_bytes() == before  # nothing written

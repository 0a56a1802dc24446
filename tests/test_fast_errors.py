"""Bad arguments are refused before torch (or transformers, or matplotlib) is imported, so the answer comes in well
under a second; the refusals name the fix. One subprocess runs every case and reports which modules each loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_load_metrics import _store

REPO = Path(__file__).resolve().parents[1]

RUNNER = """
import contextlib, io, json, sys
from moeprof.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    heavy = [m for m in ("torch", "transformers", "matplotlib") if m in sys.modules]
    out.append({"argv": argv, "code": code, "heavy": heavy, "err": err.getvalue()})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast")
    store = str(_store(tmp / "s.h5"))
    text = tmp / "t.txt"
    text.write_text("some text\n")
    cases = {
        "missing data": ["profile", "tiny-moe", "--data", str(tmp / "nope.txt")],
        "bad types": ["profile", "tiny-moe", "--data", str(text), "--types", "z"],
        "bad grid": ["profile", "tiny-moe", "--data", str(text), "--p-grid", "2"],
        "argparse count": ["profile", "tiny-moe", "--data", str(text), "--seq-len", "0"],
        "unwritable out": ["profile", "tiny-moe", "--data", str(text), "--out", "/proc/x.h5"],
        "critical type": ["critical", "tiny-moe", "--type", "z", "--task", "ppl:wikipedia"],
        "critical task": ["critical", "tiny-moe", "--task", "nosuch"],
        "critical target": ["critical", "tiny-moe", "--task", "ppl:wikipedia", "--target", "2"],
        "leaderboard type": ["leaderboard", store, "--type", "z"],
        "leaderboard near type": ["leaderboard", store, "--type", "gate"],
        "plot under a file": ["plot", store, "-o", str(text / "plots")],
        "info missing": ["info", str(tmp / "missing.h5")],
        "schedule type": ["schedule", "tiny-moe", "--type", "z", "--task", "ppl:wikipedia", "--out", "s.json"],
        "eval p": ["eval", "tiny-moe", "--p", "2", "--task", "ppl:wikipedia"],
        "generate p": ["generate", "tiny-moe", "--p", "2", "--prompt", "hi"],
        "stability prompts": ["stability", "tiny-moe", "--prompts", str(tmp / "none.txt")],
        "stability steps": ["stability", "tiny-moe", "--prompts", str(text), "--max-new-tokens", "1"],
    }
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(list(cases.values()))], cwd=tmp,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                               "HOME": str(tmp), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    return dict(zip(cases, json.loads(proc.stdout.strip().splitlines()[-1]))), tmp


CASES = ["missing data", "bad types", "bad grid", "argparse count", "unwritable out", "critical type",
         "critical task", "critical target", "leaderboard type", "leaderboard near type", "plot under a file",
         "info missing", "schedule type", "eval p", "generate p", "stability prompts", "stability steps"]


@pytest.mark.parametrize("case", CASES)
def test_bad_argument_is_refused_without_importing_torch(results, case):
    r = results[0][case]
    assert r["code"] == 2, r
    assert r["heavy"] == [], f"{case}: imported {r['heavy']} before refusing ({r['err']})"
    assert "Traceback" not in r["err"]


def test_refusals_name_a_real_type_and_a_clean_plot_folder(results):
    r, tmp = results
    assert "did you mean --type g?" in r["leaderboard near type"]["err"]
    err = " ".join(r["leaderboard type"]["err"].split())
    assert "'z' is not an activation type" in err and "x (input), u (up), g (gate), i (intermediate)" in err
    assert "e.g. --type i" in err
    assert "t.txt is a file, so no folder can be made under it" in " ".join(r["plot under a file"]["err"].split())
    assert not (tmp / "outputs").exists()  # nothing created for refused commands


def test_transformers_bars_are_off_during_a_command_and_restored_after_without_importing_it_first():
    code = ("import sys\nfrom moeprof.cli.app import _quiet_hf_bars\nrestore = _quiet_hf_bars()\n"
            "assert 'transformers' not in sys.modules\nfrom transformers.utils import logging\n"
            "print(logging.is_progress_bar_enabled())\nrestore()\nprint(logging.is_progress_bar_enabled())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]

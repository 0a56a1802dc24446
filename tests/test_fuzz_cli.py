"""Fuzz the CLI: random argument combinations from a grammar of valid and invalid values.

Every case runs `moeprof.cli.main(argv)` in-process on tiny inputs. Invariants: no exception escapes (no
traceback), the exit status is 0 or 2, and no pre-existing file other than the requested output changes.
"""

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import pytest
from conftest import save_tiny_checkpoint, tiny_tokenizer
from families import tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeprof.cli import main
from moeprof.models import load_model

TEXT = " ".join(f"word{i % 37} of the fuzzing text, sentence {i}." for i in range(60))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A template folder of inputs (model, data, stores good and bad) copied fresh into each case's sandbox."""
    root = tmp_path_factory.mktemp("fuzz")
    tok = tiny_tokenizer()
    save_tiny_checkpoint(root / "model", model=tiny("qwen3_moe", vocab_size=len(tok)), tokenizer=tok)
    tpl = root / "template"
    tpl.mkdir()
    (tpl / "data.jsonl").write_text("\n".join(json.dumps({"text": TEXT[i * 150:(i + 1) * 150 + 150]})
                                              for i in range(12)))
    (tpl / "arrays.jsonl").write_text('["a", "b"]\n')
    (tpl / "empty.txt").write_text("")
    (tpl / "notes.txt").write_text("a user's file")
    (tpl / "folder").mkdir()
    assert main(["profile", str(root / "model"), "--data", str(tpl / "data.jsonl"), "--out", str(tpl / "good.h5"),
                 "--seq-len", "16", "--max-tokens", "32", "--types", "x,i"]) == 0
    (root / "other.jsonl").write_text(json.dumps({"text": TEXT[::-1]}))
    assert main(["profile", str(root / "model"), "--data", str(root / "other.jsonl"), "--out", str(tpl / "good2.h5"),
                 "--seq-len", "16", "--max-tokens", "32", "--types", "x,i"]) == 0
    shutil.copy(tpl / "good.h5", tpl / "broken.h5")
    with h5py.File(tpl / "broken.h5", "r+") as f:
        del f["routing/tokens"]
    shutil.copy(tpl / "good.h5", tpl / "badversion.h5")
    with h5py.File(tpl / "badversion.h5", "r+") as f:
        f.attrs["schema_version"] = "abc"
    (tpl / "link.h5").symlink_to("notes.txt")
    return root


def files(folder: Path) -> dict[str, str]:
    """Return {relative path: content hash (or link target)} of every file under `folder`."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "->" + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def pick(valid: list, invalid: list):
    """Draw a valid value about 3 times in 4, so that many whole commands run and write."""
    return st.sampled_from(valid * max(1, 3 * len(invalid) // len(valid)) + invalid)


STORE = pick(["good.h5"], ["broken.h5", "badversion.h5", "notes.txt", "missing.h5", "folder"])
OUT = pick(["new.h5", "good.h5"], ["notes.txt", "data.jsonl", "link.h5", "folder", "/proc/x.h5", "nofolder/x.h5"])
TYPE = pick(["x", "i", "x,i"], ["q", "", "u"])


def opt(flag, values):
    return st.one_of(st.just([]), values.map(lambda v: [flag, str(v)]))


def profile_args():
    return st.tuples(
        pick(["MODEL"], ["missing-model", "data.jsonl"]),
        pick(["data.jsonl"], ["arrays.jsonl", "empty.txt", "missing.txt", "wikipedia:nope"]),
        OUT,
        pick([["--seq-len", "16"]], [["--seq-len", "0"], ["--seq-len", "-1"], ["--seq-len", "abc"]]),
        pick([["--max-tokens", "16"], ["--max-tokens", "32"]], [["--max-tokens", "0"], ["--max-tokens", "-5"]]),
        opt("--batch-size", pick([1, 2], [0])),
        opt("--types", TYPE),
        opt("--p-grid", pick(["0.5,0.9"], ["2", "nan", "abc", "0.9,0.5", ""])),
        opt("--trace-tokens", pick([0, 4], [-3])),
        st.sampled_from([[], ["--force"]]),
    ).map(lambda a: ["profile", a[0], "--data", a[1], "--out", a[2], *sum(a[3:], [])])


def other_args():
    leaderboard = st.tuples(STORE, opt("--type", TYPE), opt("--p", pick([0.9, 0.5], [2, "nan", "x"])),
                            opt("--by", pick(["sparsity", "tokens"], ["bogus"])),
                            opt("--layer", pick([0, 1], [9, -1])), opt("--top", pick([1, 5], [0])),
                            ).map(lambda a: ["leaderboard", a[0], *sum(a[1:], [])])
    info = STORE.map(lambda s: ["info", s])
    plot = st.tuples(st.lists(STORE, min_size=1, max_size=2), pick(["plots", "folder"], ["notes.txt"])
                     ).map(lambda a: ["plot", *a[0], "-o", a[1]])
    merge = st.tuples(pick([["good.h5", "good2.h5"]], [["good.h5"], ["good.h5", "good.h5"], ["notes.txt"]]), OUT, st.sampled_from([[], ["--force"]])
                      ).map(lambda a: ["merge", *a[0], "-o", a[1], *a[2]])
    critical = st.tuples(st.sampled_from(["MODEL", "missing-model"]),
                         st.sampled_from(["ppl:missing.txt", "no_such_task", "ppl:notes.txt"]),
                         opt("--type", TYPE), opt("--limit", st.sampled_from([0, -2, 3])),
                         opt("--batch-size", st.sampled_from([0, 2])), opt("--target", st.sampled_from([2, "nan"])),
                         OUT, st.sampled_from([[], ["--force"]]),
                         ).map(lambda a: ["critical", a[0], "--task", a[1], "--out", a[6], *sum(a[2:6], []), *a[7]])
    return st.one_of(leaderboard, info, leaderboard, merge, critical, info, critical, plot.filter(lambda a: len(a) < 5))


_MODELS: dict = {}


def _cached_load(spec, **kwargs):
    key = (str(spec), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    if key not in _MODELS:
        _MODELS[key] = load_model(spec, **kwargs)
    return _MODELS[key]


def output_of(argv: list[str]) -> str | None:
    for flag in ("--out", "-o"):
        if flag in argv:
            return argv[argv.index(flag) + 1]
    return None


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(argv=st.one_of(profile_args(), other_args(), other_args()))
def test_cli_never_crashes_and_never_touches_other_files(world, tmp_path_factory, capsys, monkeypatch, argv):
    import moeprof.models as models

    monkeypatch.setattr(models, "load_model", _cached_load)  # the same tiny model each time: CI seconds, not minutes
    box = tmp_path_factory.mktemp("case")
    shutil.copytree(world / "template", box, dirs_exist_ok=True, symlinks=True)
    monkeypatch.chdir(box)
    argv = [str(world / "model") if a == "MODEL" else a for a in argv]
    before = files(box)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err, (argv, err)
    out = output_of(argv)
    allowed = set()
    if out:
        allowed.add(out)
        if Path(out).is_symlink() or (box / out).is_symlink():
            allowed.add(str((box / out).resolve().relative_to(box)))
    after = files(box)
    changed = {k for k in before if before[k] != after.get(k)}
    changed -= allowed
    changed = {k for k in changed if not (argv[0] == "plot" and k.startswith(f"{out}/"))}
    assert not changed, (argv, changed, err)
    shutil.rmtree(box, ignore_errors=True)

"""Fuzz the CLI: random argument combinations from a grammar of valid and invalid values.

Every case runs `moeprof.cli.main(argv)` in-process on tiny inputs. Invariants: no exception escapes (no
traceback), the exit status is 0 or 2, and no pre-existing file other than the requested output changes.
Commands: profile, leaderboard, info, plot, merge (overlapping data, an output that is an input), critical,
stability (prompt files good and bad), and the schedule readers (leaderboard / plot --schedule,
schedule-thresholds, generate) given a schedule file with one field mutated: each mutation is refused (exit 2).
A second test drives the Python API: random nestings of sparsify_, sparsify and profile_capture.
"""

import hashlib
import json
import os
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
    # the same Wikipedia-like text read under another source list: overlaps good.h5 (merge must refuse)
    assert main(["profile", str(root / "model"), "--data", str(tpl / "data.jsonl"), "--data", str(root / "other.jsonl"),
                 "--out", str(tpl / "good_both.h5"), "--seq-len", "16", "--max-tokens", "16", "--types", "x,i"]) == 0
    from moeprof.schedule import uniform

    model, _ = load_model(str(root / "model"))
    sched = uniform(model, type="i", p=0.9, model_id=str(root / "model"))
    sched.provenance.update(sparsity_flop=0.4, per_expert_sparsity=[[0.5] * sched.p.shape[1]] * sched.p.shape[0])
    sched.save(tpl / "sched.json")
    (tpl / "prompts.txt").write_text("The capital of\nOnce upon a time\n")
    (tpl / "prompts_binary.jsonl").write_bytes(b"\x83\xff\x00\x01")
    (tpl / "prompts_number.jsonl").write_text('{"prompt": 5}\n')
    (tpl / "prompts_none.jsonl").write_text('{"prompt": "fine"}\n{"title": "x"}\n')
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


# one field of a valid schedule file set to a value no reader can use (D4, D5, D6, D21 of issue 23)
SCHEDULE_MUTATIONS = [
    ("provenance", "garbage"), ("provenance", [1, 2]), ("provenance.per_expert_sparsity", [[0.5]]),
    ("provenance.per_expert_sparsity", 5.0), ("provenance.per_expert_sparsity", "high"),
    ("provenance.sparsity_flop", "high"), ("provenance.sparsity_flop", -1), ("provenance.sparsity_flop", [0.4]),
    ("provenance.target", "0.99"), ("provenance.heldout_ratio_ci", 3), ("safe_experts", "all"),
    ("safe_experts", [[0, 99]]), ("safe_experts", [[0]]), ("safe_experts", [[True, 1]]), ("safe_experts", 7),
    ("p.0.0", "0.9"), ("p.0.0", True), ("p.0.0", 1.5), ("p.0.0", [0.9]), ("p.0", 0.9), ("p", "0.9"), ("p", []),
    ("type", "q"), ("type", 5), ("rule", "median"), ("rule", None), ("model", 7), ("shape", "2x7"),
    ("shape.layers", "two"), ("shape.layers", 99), ("shape", {}), ("schema_version", "1"), ("format", "other"),
]
SCHEDULE = st.one_of(st.just(None), st.sampled_from(range(len(SCHEDULE_MUTATIONS))))


def mutated_schedule(d: dict, which: int) -> dict:
    """Return schedule JSON `d` with mutation `which` of SCHEDULE_MUTATIONS applied."""
    path, value = SCHEDULE_MUTATIONS[which]
    *parents, last = path.split(".")
    node = d
    for k in parents:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    node[int(last) if isinstance(node, list) else last] = value
    return d


def schedule_args():
    """(argv with SCHED for the schedule file, mutation index or None)."""
    leaderboard = pick(["good.h5"], ["broken.h5"]).map(lambda s: ["leaderboard", s, "--schedule", "SCHED"])
    thresholds = OUT.map(lambda o: ["schedule-thresholds", "SCHED", "--from", "good.h5", "--out",
                                    o.replace(".h5", ".json")])
    plot = st.just(["plot", "good.h5", "-o", "plots", "--schedule", "SCHED"])
    generate = st.just(["generate", "MODEL", "--schedule", "SCHED", "--prompt", "The", "--max-new-tokens", "2"])
    return st.tuples(st.one_of(leaderboard, thresholds, leaderboard, thresholds, plot, generate), SCHEDULE)


def stability_args():
    return st.tuples(pick(["prompts.txt"], ["prompts_binary.jsonl", "prompts_number.jsonl", "prompts_none.jsonl",
                                            "empty.txt", "missing.txt"]),
                     pick(["new.h5"], ["notes.txt", "folder"]), pick(["1", "3"], ["0", "-2"]),
                     pick(["2"], ["1", "0"])
                     ).map(lambda a: ["stability", "MODEL", "--prompts", a[0], "--out", a[1], "--max-gap", a[2],
                                      "--max-new-tokens", a[3]])


def other_args():
    leaderboard = st.tuples(STORE, opt("--type", TYPE), opt("--p", pick([0.9, 0.5], [2, "nan", "x"])),
                            opt("--by", pick(["sparsity", "tokens"], ["bogus"])),
                            opt("--layer", pick([0, 1], [9, -1])), opt("--top", pick([1, 5], [0])),
                            ).map(lambda a: ["leaderboard", a[0], *sum(a[1:], [])])
    info = STORE.map(lambda s: ["info", s])
    plot = st.tuples(st.lists(STORE, min_size=1, max_size=2), pick(["plots", "folder"], ["notes.txt"])
                     ).map(lambda a: ["plot", *a[0], "-o", a[1]])
    merge = st.tuples(pick([["good.h5", "good2.h5"], ["good2.h5", "good_both.h5"]],
                           [["good.h5"], ["good.h5", "good.h5"], ["notes.txt"], ["good.h5", "good_both.h5"],
                            ["good2.h5", "broken.h5"]]),
                      pick(["new.h5"], ["good.h5", "good2.h5", "link.h5", "./good.h5", "folder"]),
                      st.sampled_from([[], ["--force"]]),
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


PROBES = int(os.environ.get("MOEPROF_FUZZ_PROBES", 300))  # CLI probes per run (the API test adds 40)


def must_refuse(argv: list[str], box: Path, mutation) -> bool:
    """True when `argv` is a probe that must be refused (exit 2): a mutated schedule file, a merge whose output
    is one of its inputs or whose inputs hold the same data, or a stability run with a bad prompt file or gap."""
    if mutation is not None:
        return True
    if argv[0] == "merge":
        out = (box / argv[argv.index("-o") + 1]).resolve()
        inputs = argv[1:argv.index("-o")]
        return (any((box / i).resolve() == out for i in inputs) or {"good.h5", "good_both.h5"} <= set(inputs)
                or len(set(inputs)) < len(inputs))
    if argv[0] == "stability":
        return (not argv[3].startswith("prompts.txt") or int(argv[argv.index("--max-gap") + 1]) < 1)
    return False


@settings(max_examples=PROBES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(probe=st.one_of(profile_args().map(lambda a: (a, None)), other_args().map(lambda a: (a, None)),
                       other_args().map(lambda a: (a, None)), schedule_args(), schedule_args(),
                       stability_args().map(lambda a: (a, None))))
def test_cli_never_crashes_and_never_touches_other_files(world, tmp_path_factory, capsys, monkeypatch, probe):
    import moeprof.models as models

    argv, mutation = probe
    monkeypatch.setattr(models, "load_model", _cached_load)  # the same tiny model each time: CI seconds, not minutes
    box = tmp_path_factory.mktemp("case")
    shutil.copytree(world / "template", box, dirs_exist_ok=True, symlinks=True)
    monkeypatch.chdir(box)
    if "SCHED" in argv:
        d = json.loads((box / "sched.json").read_text())
        (box / "mut.json").write_text(json.dumps(d if mutation is None else mutated_schedule(d, mutation)))
    argv = [str(world / "model") if a == "MODEL" else "mut.json" if a == "SCHED" else a for a in argv]
    before = files(box)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err, (argv, err)
    if must_refuse(argv, box, mutation):
        assert code == 2, (argv, mutation, err)
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


# ------------------------------------------------------------------------------------------------ Python API


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.sampled_from(["sparsify_", "sparsify", "capture", "remove"]),
                                st.sampled_from([0.3, 0.7, 1.0])), min_size=1, max_size=6),
       family=st.sampled_from(["qwen3_moe", "llama"]))
def test_sparsify_nesting_is_refused_and_leaves_the_open_sparsification_as_it_was(steps, family):
    """Any sequence of sparsify_ / sparsify / profile_capture / remove: while one sparsification is open, every
    other is refused (RuntimeError) and the model's logits stay those of the open one; after remove, dense."""
    import torch

    from moeprof.arch import adapter_for
    from moeprof.capture import profile_capture, sparsify
    from moeprof.schedule import sparsify_, uniform
    from moeprof.stats import ProfileStats
    from moeprof.topp import DEFAULT_P_GRID

    model = _api_model(family)
    sites = adapter_for(model).sites(model)

    def stats():
        return ProfileStats(len(sites), max(x.num_experts for x in sites), DEFAULT_P_GRID)

    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        open_handle, want = None, dense
        for op, p in steps:
            if op == "remove":
                if open_handle is not None:
                    open_handle.remove()
                open_handle, want = None, dense
            elif open_handle is not None:
                with pytest.raises(RuntimeError, match="already inside a moeprof"):
                    if op == "sparsify_":
                        sparsify_(model, uniform(model, type="i", p=p))
                    elif op == "sparsify":
                        sparsify(model, type="x", p=p).__enter__()
                    else:
                        profile_capture(model, stats()).__enter__()
            elif op == "sparsify_":
                with sparsify(model, type="i", p=p):  # the reference: the same p through the context manager
                    want = model(ids).logits
                open_handle = sparsify_(model, uniform(model, type="i", p=p))
            else:  # a context opened and closed at once leaves the model dense
                ctx = sparsify(model, type="i", p=p) if op == "sparsify" else profile_capture(model, stats())
                with ctx:
                    model(ids)
            assert torch.equal(model(ids).logits, want), (steps, op)
        if open_handle is not None:
            open_handle.remove()
        assert torch.equal(model(ids).logits, dense)


_API_MODELS: dict = {}


def _api_model(family):
    if family not in _API_MODELS:
        _API_MODELS[family] = tiny(family)
    return _API_MODELS[family]

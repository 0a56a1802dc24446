"""The pinned environment: the README's set-up and CI install exactly constraints.txt, which satisfies the ranges
pyproject.toml declares; scripts/lockfile.py (behind scripts/check-latest.sh) relaxes, diffs and sums up right."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _lockfile():
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "scripts" / "lockfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lockfile = _lockfile()


def _pins() -> dict[str, str]:
    return lockfile.parse_pins((ROOT / "constraints.txt").read_text())


def test_readme_test_command_is_what_ci_runs_and_installs_from_the_lock():
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.startswith("python3 -m venv")]
    readme = (ROOT / "README.md").read_text()
    assert len(ci) == 1 and ci[0] in readme
    setup = [l for l in readme.splitlines() if l.startswith("python3 -m venv .venv")]
    assert len(setup) == 2 and all("-c constraints.txt" in l and "torch==2.13.0" in l for l in setup)


def _closure(root: str, extras: set[str]) -> set[str]:
    """Return the normalized names of every distribution `root[extras]` needs, itself excluded."""
    seen, todo = set(), [(root, extras)]
    while todo:
        name, ex = todo.pop()
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in ex] or [{"extra": ""}]
            if req.marker and not any(req.marker.evaluate(env) for env in envs):
                continue
            key = lockfile.normalize(req.name)
            if key not in seen:
                seen.add(key)
                todo.append((req.name, set(req.extras)))
    return seen


def test_every_package_the_install_pulls_in_is_the_locked_version():
    pins = _pins()
    needed = _closure("moeprof", {"triton", "test"})
    assert {"torch", "transformers", "lm-eval", "h5py", "triton", "pytest"} <= needed
    unpinned = sorted(n for n in needed if n not in pins)
    assert not unpinned, f"constraints.txt does not pin {unpinned}: regenerate it (docs/environment.md)"
    moved = {n: (pins[n], metadata.version(n).split("+")[0]) for n in needed
             if metadata.version(n).split("+")[0] != pins[n]}
    assert not moved, f"installed versions differ from constraints.txt (locked, installed): {moved}"


def test_locked_versions_satisfy_the_ranges_pyproject_declares():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    reqs = [Requirement(r) for r in project["dependencies"] + [r for g in project["optional-dependencies"].values()
                                                                for r in g]]
    for req in reqs:
        assert req.specifier.contains(pins[lockfile.normalize(req.name)], prereleases=True), (req, pins[req.name])
    transformers = next(r for r in reqs if r.name == "transformers")
    assert any(s.operator == "<" for s in transformers.specifier), "transformers needs a tested upper bound"


def test_relax_widens_tested_upper_bounds_to_the_next_major_and_keeps_exact_pins():
    assert lockfile.relax("transformers>=5.24,<5.26") == "transformers>=5.24,<6"
    assert lockfile.relax("numpy<2") == "numpy<3"
    assert lockfile.relax("lm-eval==0.4.13") == "lm-eval==0.4.13"
    assert lockfile.relax("torch>=2.4") == "torch>=2.4"
    assert lockfile.relax("foo<=1.5") == "foo<=1.5"  # an inclusive bound is a statement, not a tested ceiling


def test_diff_names_every_package_added_removed_or_moved():
    old = lockfile.parse_pins("a==1.0\nb==2.0\nc==3.0\n# comment==9\npip==23.2.1\n")
    new = lockfile.parse_pins("a==1.0\nb==2.1\nd==4.0\ntorch==2.13.0+cpu\n")
    assert lockfile.diff(old, new) == ["b: 2.0 -> 2.1", "c: 3.0 -> (absent)", "d: (absent) -> 4.0",
                                       "torch: (absent) -> 2.13.0"]


def test_lock_text_pins_a_freeze_without_editables_or_local_labels():
    text = lockfile.lock_text("# Editable install\n-e git+x#egg=moeprof\nTorch==2.13.0+cpu\nabsl-py==2.5.1\n"
                              "moeprof @ file:///work\n")
    body = [l for l in text.splitlines() if not l.startswith("#")]
    assert body == ["absl-py==2.5.1", "Torch==2.13.0"]


def test_summary_groups_failures_by_family_and_test(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_families" name="test_family_capture_is_exact[kolibri1_1]"><failure/></testcase>
      <testcase classname="tests.test_families" name="test_family_capture_is_exact[qwen3_moe]"/>
      <testcase classname="tests.test_families" name="test_clamped_glus_are_exact_where_the_clamps_bite[step3p7-limit-extra3]"><error/></testcase>
      <testcase classname="tests.test_topp" name="test_topp_keeps_fewest_entries"><failure/></testcase>
    </testsuite></testsuites>""")
    families, tests, total = lockfile.summary(junit)
    assert (families, tests, total) == (["kolibri1_1", "step3p7"], ["tests.test_topp::test_topp_keeps_fewest_entries"], 4)


def test_bump_upper_moves_only_the_named_package(tmp_path):
    py = tmp_path / "pyproject.toml"
    py.write_text('dependencies = [\n  "transformers>=5.24,<5.26",  # note\n  "numpy<3",\n]\n')
    text = lockfile.bump_upper(py, "transformers", "5.27")
    assert '"transformers>=5.24,<5.27"' in text and '"numpy<3"' in text
    with pytest.raises(SystemExit, match="no upper bound for 'rich'"):
        lockfile.bump_upper(py, "rich", "16")

"""The pinned environment: read pyproject's ranges, relax their tested upper bounds, diff two freezes, and sum up a
JUnit report by family and test. Used by scripts/check-latest.sh; standard library only (it runs before any venv).

    python scripts/lockfile.py relaxed-requirements [--extras triton,test]  # what check-latest installs
    python scripts/lockfile.py diff constraints.txt FREEZE                   # which packages moved
    python scripts/lockfile.py summary JUNIT.xml                             # which families / tests broke
    python scripts/lockfile.py write-lock FREEZE constraints.txt             # the new lock, from a passing venv
    python scripts/lockfile.py bump-upper pyproject.toml transformers 5.26   # move a tested upper bound
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK_HEADER = """\
# The environment CI last passed on: every package the install pulls in, pinned (pip constraints file).
# Used by the README's two set-up commands and by .ci/run (`pip install -c constraints.txt ...`).
# Move it forward with scripts/check-latest.sh --write-lock (docs/environment.md). Do not edit by hand.
# Python 3.11, CPU; torch is the local CPU build (installed version 2.13.0+cpu).
"""
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """Return the PEP 503 normalized form of a distribution name (`lm_eval` == `lm-eval`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def relax(requirement: str) -> str:
    """Return `requirement` with each `<A.B…` upper bound widened to the next major release `<A+1`.

    The tested upper bounds in pyproject.toml (e.g. `transformers>=5.24,<5.26`) stop a user's install at what the
    suite has passed on; check-latest asks what the next releases of the same major version break. Exact pins
    (`==`) are deliberate and stay."""
    def widen(match: re.Match) -> str:
        return f"<{int(match.group(1)) + 1}"

    return re.sub(r"(?<![<>=!~])<\s*(\d+)(?:\.\d+)*", widen, requirement)


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """Return the project's dependencies and the given extras' dependencies, as written in `pyproject`."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"error: no optional dependency group {unknown[0]!r} in {pyproject}; "
                         f"known: {', '.join(sorted(optional))}")
    return [*project["dependencies"], *(r for e in extras for r in optional[e])]


def parse_pins(text: str) -> dict[str, str]:
    """Return {normalized name: version} of the `name==version` lines of a freeze or constraints file."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip().split("+", 1)[0]  # 2.13.0+cpu is the pin 2.13.0
    pins.pop("pip", None)  # the venv's own installer, not a dependency: never locked
    return pins


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Return one line per package added, removed or moved between two pin sets, sorted by name."""
    lines = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a != b:
            lines.append(f"{name}: {a or '(absent)'} -> {b or '(absent)'}")
    return lines


def lock_text(freeze: str) -> str:
    """Return the constraints file for a `pip freeze --all` of a passing venv (editable installs and pip itself
    left out; setuptools stays: torch requires it)."""
    keep = []
    for line in freeze.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e")) or " @ " in line or normalize(_NAME.match(line).group(1)) == "pip":
            continue
        if "==" in line:
            name, version = line.split("==", 1)
            line = f"{name}=={version.split('+', 1)[0]}"  # the local label (+cpu) is not a version pip matches on
        keep.append(line)
    return LOCK_HEADER + "\n".join(sorted(keep, key=lambda l: normalize(_NAME.match(l).group(1)))) + "\n"


def summary(junit: Path) -> tuple[list[str], list[str], int]:
    """Return (broken families, other broken tests, tests run) from a pytest JUnit XML report.

    A family is broken when any test parametrized by it (`test_x[family]`, in tests/test_families*.py) failed."""
    root = ET.parse(junit).getroot()
    families, tests, total = set(), [], 0
    for case in root.iter("testcase"):
        total += 1
        if case.find("failure") is None and case.find("error") is None:
            continue
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        m = re.search(r"\[([^\]]+)\]$", case.get("name", ""))
        if "test_families" in case.get("classname", "") and m:
            families.add(m.group(1).split("-")[0])
        else:
            tests.append(name)
    return sorted(families), tests, total


def bump_upper(pyproject: Path, package: str, version: str) -> str:
    """Return `pyproject`'s text with the `<X` upper bound of `package` replaced by `<version`."""
    text = pyproject.read_text()
    pattern = re.compile(rf'("{re.escape(package)}[^"]*?<)\s*[\d.]+(")')
    if not pattern.search(text):
        raise SystemExit(f"error: {pyproject} has no upper bound for {package!r} to move")
    return pattern.sub(rf"\g<1>{version}\g<2>", text, count=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relaxed-requirements")
    r.add_argument("--extras", default="triton,test")
    d = sub.add_parser("diff")
    d.add_argument("old", type=Path)
    d.add_argument("new", type=Path)
    s = sub.add_parser("summary")
    s.add_argument("junit", type=Path)
    w = sub.add_parser("write-lock")
    w.add_argument("freeze", type=Path)
    w.add_argument("out", type=Path)
    b = sub.add_parser("bump-upper")
    b.add_argument("pyproject", type=Path)
    b.add_argument("package")
    b.add_argument("version")
    args = ap.parse_args(argv)
    if args.cmd == "relaxed-requirements":
        extras = [e for e in args.extras.split(",") if e]
        print("\n".join(relax(req) for req in requirements(ROOT / "pyproject.toml", extras)))
    elif args.cmd == "diff":
        lines = diff(parse_pins(args.old.read_text()), parse_pins(args.new.read_text()))
        print("\n".join(lines) if lines else "no package moved")
    elif args.cmd == "summary":
        families, tests, total = summary(args.junit)
        print(f"{total} tests ran; {len(families)} families and {len(tests)} other tests broke")
        if families:
            print("families broken: " + ", ".join(families))
        for t in tests:
            print(f"test broken: {t}")
        return 1 if families or tests else 0
    elif args.cmd == "write-lock":
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(lock_text(args.freeze.read_text()))
        tmp.replace(args.out)
    elif args.cmd == "bump-upper":
        text = bump_upper(args.pyproject, args.package, args.version)
        tmp = args.pyproject.with_name(args.pyproject.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.pyproject)
    return 0


if __name__ == "__main__":
    sys.exit(main())

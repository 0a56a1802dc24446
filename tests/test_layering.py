"""The layers of moeprof import only downward (docs/architecture.md), counting every import.

The static tests read every `import` / `from ... import` of every module with `ast` (module level, inside functions,
under `if TYPE_CHECKING:`; relative imports resolved): a lazy import inside a function still ties two modules. The
runtime test imports each module alone in a fresh interpreter and checks which third-party packages it pulls in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moeprof"

# The layers, bottom first. A module may import its own layer and the layers below it, never one above.
# A module belongs to the layer of the longest prefix listed here.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("moeprof", "moeprof.errors")),
    ("leaves (torch / numpy only)", (
        "moeprof.activation_types", "moeprof.activation_functions", "moeprof.rules", "moeprof.schema",
        "moeprof.outliers", "moeprof.topp", "moeprof.stats", "moeprof.kernels", "moeprof.atomic", "moeprof.resources",
        "moeprof.recipes", "moeprof.corpora", "moeprof.data", "moeprof.distributed",
        "moeprof.schedule.data")),  # the Schedule is plain data
    ("the store (h5py, not models)", ("moeprof.store",)),
    ("models (transformers)", ("moeprof.arch", "moeprof.models", "moeprof.capture", "moeprof.evaluate",
                               "moeprof.schedule.apply")),
    ("reports (read a store)", ("moeprof.report",)),
    # moeprof.schedule (the package) reaches .apply and .tau lazily: code below this layer imports
    # moeprof.schedule.data or moeprof.schedule.apply, not the package
    ("orchestration (the Python API)", ("moeprof.profile", "moeprof.critical", "moeprof.stability", "moeprof.merge",
                                        "moeprof.demo", "moeprof.embedded", "moeprof.schedule", "moeprof.optimize")),
    ("the command line", ("moeprof.cli", "moeprof.__main__")),
]
# Imports a layer may not make even though they run downward: a report reads a store, nothing that loads or runs
# a model.
NOT_BELOW = {"moeprof.report": ("moeprof.arch", "moeprof.models", "moeprof.capture", "moeprof.evaluate")}

# module -> third-party packages (and moeprof layers) it must not load at run time, directly or through anything
THIRD_PARTY = {
    "moeprof.errors": ("torch", "numpy", "h5py", "transformers"),
    "moeprof.atomic": ("torch", "h5py", "transformers"),
    "moeprof.topp": ("transformers", "h5py", "moeprof.arch", "moeprof.store"),
    "moeprof.activation_functions": ("transformers", "h5py", "moeprof.arch"),
    "moeprof.stats": ("transformers", "h5py", "moeprof.arch", "moeprof.capture", "moeprof.store"),
    "moeprof.kernels": ("transformers", "h5py", "moeprof.arch", "moeprof.capture"),
    "moeprof.schema": ("torch", "h5py", "transformers"),
    "moeprof.outliers": ("torch", "h5py", "transformers"),
    "moeprof.store": ("torch", "transformers", "moeprof.stats", "moeprof.capture"),
    "moeprof.report": ("torch", "transformers", "moeprof.capture", "moeprof.models"),
    "moeprof.report.html": ("torch", "transformers", "moeprof.capture", "moeprof.models"),
    "moeprof.arch": ("h5py", "moeprof.store", "moeprof.report", "moeprof.cli", "moeprof.critical"),
    "moeprof.critical": ("transformers", "h5py", "lm_eval", "moeprof.cli"),
    "moeprof.evaluate.point": ("torch", "transformers", "h5py", "moeprof.critical", "moeprof.evaluate.runners"),
    "moeprof.evaluate.runners": ("moeprof.critical", "moeprof.cli"),
    "moeprof.schedule": ("torch", "transformers", "h5py", "moeprof.capture"),
    "moeprof.schedule.data": ("torch", "transformers", "h5py", "moeprof.arch", "moeprof.capture", "moeprof.store"),
    "moeprof.schedule.apply": ("torch", "transformers", "h5py", "moeprof.store"),  # torch when a function runs
    "moeprof.rules": ("torch", "numpy", "transformers", "h5py"),
    "moeprof.optimize": ("torch", "transformers", "h5py"),  # the config only; the rest on first use
    "moeprof.optimize.optimizer": ("transformers", "h5py", "lm_eval", "moeprof.cli", "moeprof.store"),
    "moeprof.optimize.config": ("torch", "transformers", "h5py"),
    "moeprof.optimize.margin": ("torch", "transformers", "h5py"),  # the acceptance rule: numpy only
    "moeprof.optimize.verdict": ("torch", "transformers", "h5py"),  # read by info / leaderboard without torch
    "moeprof.evaluate.task": ("torch", "transformers", "h5py", "lm_eval", "moeprof.critical", "moeprof.optimize"),
    "moeprof.cli": ("torch", "transformers", "h5py", "matplotlib"),  # a bad argument is refused in well under a second
}


def modules() -> dict[str, Path]:
    """Return {dotted module name: file} of every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """Return (imported moeprof module, line) for every import statement of the module, relative ones resolved.
    `from pkg import sub` counts pkg and, when it is a module, pkg.sub; a name inside a module counts that module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("moeprof"):
                found.append((target, node.lineno))
    return sorted(set(found))


def import_graph() -> dict[str, dict[str, int]]:
    """Return {module: {imported module: first line importing it}}."""
    known = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        edges: dict[str, int] = {}
        for target, line in imports(name, path, known):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Return the strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def layer_of(module: str) -> int:
    """Return the index in LAYERS of the longest listed prefix of `module`; KeyError when none fits."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise KeyError(module)
    return rank


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """Return "a:line -> b (layer x above layer y)" for every import of a higher layer or of a NOT_BELOW module."""
    out = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            mine, theirs = layer_of(module), layer_of(target)
            banned = [p for m, ps in NOT_BELOW.items() if module == m or module.startswith(m + ".") for p in ps
                      if target == p or target.startswith(p + ".")]
            if theirs > mine or banned:
                out.append(f"{module}:{line} imports {target} ({LAYERS[theirs][0]}, above {LAYERS[mine][0]})"
                           if not banned else f"{module}:{line} imports {target} (a report reads a store only)")
    return out


def test_every_module_has_a_layer():
    unplaced = []
    for module in modules():
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert unplaced == [], f"add these modules to a layer of LAYERS: {unplaced}"


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones(tmp_path):
    pkg = tmp_path / "moeprof" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("def f():\n    from . import b\n    from ..top import x\n    import moeprof.sub.c\n")
    known = {"moeprof": None, "moeprof.top": None, "moeprof.sub": None, "moeprof.sub.a": None, "moeprof.sub.b": None,
             "moeprof.sub.c": None}
    found = {t for t, _ in imports("moeprof.sub.a", pkg / "a.py", known)}
    assert found == {"moeprof.sub", "moeprof.sub.b", "moeprof.top", "moeprof.sub.c"}


def test_cycles_finds_a_cycle_through_three_modules_and_not_a_chain():
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) == []


def test_no_import_cycle_among_moeprof_modules():
    graph = import_graph()
    found = cycles(graph)
    detail = []
    for component in found:
        members = set(component)
        edges = [f"{a}:{line} -> {b}" for a in component for b, line in sorted(graph[a].items()) if b in members]
        detail.append("cycle among " + ", ".join(component) + "\n    " + "\n    ".join(edges))
    assert found == [], "\n".join(detail)


def test_no_import_runs_up_the_layers():
    found = upward_imports(import_graph())
    assert found == [], "\n".join(found)


def test_an_import_up_the_layers_is_reported():
    graph = {"moeprof.store.reader": {"moeprof.cli.app": 3}, "moeprof.report.plots": {"moeprof.models": 9}}
    assert upward_imports(graph) == [
        "moeprof.report.plots:9 imports moeprof.models (a report reads a store only)",
        "moeprof.store.reader:3 imports moeprof.cli.app (the command line, above the store (h5py, not models))"]


@pytest.mark.parametrize("module", sorted(THIRD_PARTY))
def test_module_imports_nothing_above_its_layer_at_run_time(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(','.join(m for m in {THIRD_PARTY[module]!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"

"""The layers of moeprof import only downward (docs/architecture.md): each module is imported alone in a fresh
interpreter and must not pull in what its layer may not know."""

from __future__ import annotations

import subprocess
import sys

import pytest

# module -> modules it must not import (directly or through anything it imports)
FORBIDDEN = {
    "moeprof.topp": ("transformers", "h5py", "moeprof.arch", "moeprof.store"),
    "moeprof.glu": ("transformers", "h5py", "moeprof.arch"),
    "moeprof.stats": ("transformers", "h5py", "moeprof.arch", "moeprof.capture", "moeprof.store"),
    "moeprof.kernels": ("transformers", "h5py", "moeprof.arch", "moeprof.capture"),
    "moeprof.schema": ("torch", "h5py", "transformers"),
    "moeprof.outliers": ("torch", "h5py", "transformers"),
    "moeprof.store": ("torch", "transformers", "moeprof.stats", "moeprof.capture"),
    "moeprof.report": ("torch", "transformers", "moeprof.capture", "moeprof.models"),
    "moeprof.report.html": ("torch", "transformers", "moeprof.capture", "moeprof.models"),
    "moeprof.cli.html_report": ("torch", "transformers", "h5py", "matplotlib"),
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
    "moeprof.evaluate.task": ("torch", "transformers", "h5py", "lm_eval", "moeprof.critical", "moeprof.optimize"),
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_imports_nothing_above_its_layer(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(','.join(m for m in {FORBIDDEN[module]!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"

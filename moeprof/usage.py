"""What the command-line layers share: the user-mistake exception and where outputs go by default."""

from __future__ import annotations

from pathlib import Path

DEFAULT_OUTPUTS = Path("outputs")


class UsageError(ValueError):
    """A command-line mistake the user can fix (the CLI prints it as one red line, exit status 2)."""


def default_out(model: str, suffix: str = "") -> Path:
    """Return outputs/<model name><suffix>.h5 for a model spec (folder, file, hub id or embedded name)."""
    stem = Path(str(model).rstrip("/")).name.replace(".gguf", "") or "model"
    return DEFAULT_OUTPUTS / f"{stem}{suffix}.h5"

"""The activation types x, u, g, i, the default p-grid and the sparsity-histogram bins every layer of moeprof agrees
on, and the checks of them (no torch: readers of a store and the CLI's argument checks import this without loading
models). The activation *functions* σ of the GLU are `moeprof.activation_functions`."""

import math
from typing import Sequence

from moeprof.errors import InvalidArgument

ACTIVATION_TYPES = ("x", "u", "g", "i")
TYPE_NAMES = {"x": "input", "u": "up", "g": "gate", "i": "intermediate"}
# 16 values between 0.5 and 0.99: dense where curves bend (high p), enough for a smooth curve.
DEFAULT_P_GRID: tuple[float, ...] = (
    0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.875, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99,
)
HIST_BINS = 20  # per-vector sparsity histogram over [0, 1]: bin b holds [b/B, (b+1)/B), the last bin includes 1


def check_types(types: Sequence[str]) -> tuple[str, ...]:
    """Return types as a tuple in canonical order; raise ValueError naming an unknown one."""
    unknown = [t for t in types if t not in ACTIVATION_TYPES]
    if unknown or not types:
        raise InvalidArgument(f"unknown activation type(s) {unknown or '(none given)'}; choose from "
                         f"{','.join(ACTIVATION_TYPES)} (x=input, u=up, g=gate, i=intermediate)")
    return tuple(t for t in ACTIVATION_TYPES if t in types)


def check_p_grid(p_grid: Sequence[float]) -> tuple[float, ...]:
    """Return the grid as a tuple of floats, sorted ascending; raise ValueError on values outside [0, 1]."""
    grid = tuple(float(p) for p in p_grid)
    if not grid:
        raise InvalidArgument("the p-grid is empty; give at least one value in [0, 1]")
    bad = [p for p in grid if not (0.0 <= p <= 1.0) or math.isnan(p)]
    if bad:
        raise InvalidArgument(f"p-grid values must lie in [0, 1], got {bad}")
    return tuple(sorted(set(grid)))

"""Which profiled p answers a requested p: a store holds its statistics on a p-grid, and `leaderboard`, `plot` and
`export` read them at the grid p nearest the one asked for, with a note saying so (no interpolation: the std, the
histogram quantiles and the per-token trace exist only on the grid, and every number of a table stays one the
profile measured). Grid (0.5, 0.6, …, 0.9, 0.95, 0.99), --p 0.93 → 0.95 and the note
"--p 0.93 is not on the profiled p-grid; using the nearest grid p 0.95 (grid: 0.5, …)". Ties go to the larger p.
"""

from __future__ import annotations

import numpy as np

from moeprof.errors import UsageError


def nearest_grid_p(grid, p: float, *, flag: str = "--p") -> tuple[float, str | None]:
    """Return (the grid p nearest `p`, a note naming the swap; None when `p` is on the grid). UsageError for a p
    outside [0, 1]."""
    p = float(p)
    if not 0.0 <= p <= 1.0 or p != p:
        raise UsageError(f"{flag} {p:g} must lie in [0, 1] (the kept share of each vector's L1 mass)")
    grid = np.asarray(grid, dtype=np.float64)
    dist = np.abs(grid - p)
    if dist.min() <= 1e-9:
        return float(grid[int(np.argmin(dist))]), None
    best = np.flatnonzero(np.isclose(dist, dist.min(), rtol=0, atol=1e-12))
    q = float(grid[best].max())
    return q, (f"{flag} {p:g} is not on the profiled p-grid; using the nearest grid p {q:g} (grid: "
               f"{', '.join(f'{g:g}' for g in grid)}; profile with --p-grid including {p:g} for that p itself)")

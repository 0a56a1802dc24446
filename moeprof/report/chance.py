"""The chance level of mask stability: the Jaccard of two independent top-p masks of the same sparsity.

Two kept-sets of k entries each, drawn independently and uniformly from n, overlap in I entries, I hypergeometric
(n, k, k); their Jaccard is I / (2k − I). Its expectation is the reference a measured mask Jaccard must beat to say
the masks are stable rather than merely of that sparsity. Worked example, n = 4, k = 2: P(I = 0, 1, 2) = 1/6, 4/6,
1/6, so E[J] = 4/6 · 1/3 + 1/6 · 1 = 7/18 ≈ 0.389. For large n it approaches (1 − s) / (1 + s) at sparsity
s = 1 − k/n (0.333 at s = 0.5).

Pure Python + numpy (a report reads a store and nothing else).
"""

from __future__ import annotations

import math

import numpy as np


def chance_jaccard(n: int, k: int) -> float:
    """Return E[|A ∩ B| / |A ∪ B|] for independent uniform k-subsets A, B of n entries (1 for k = 0: both empty)."""
    n, k = int(n), int(k)
    if not 0 <= k <= n or n <= 0:
        raise ValueError(f"need 0 ≤ k ≤ n and n > 0, got n={n}, k={k}")
    if k == 0:
        return 1.0
    log_total = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    out = 0.0
    for i in range(max(1, 2 * k - n), k + 1):  # I = 0 contributes 0
        log_p = (math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1)
                 + math.lgamma(n - k + 1) - math.lgamma(k - i + 1) - math.lgamma(n - 2 * k + i + 1) - log_total)
        out += math.exp(log_p) * i / (2 * k - i)
    return out


def chance_levels(store, type: str, p: float) -> np.ndarray:
    """Return the chance Jaccard of each site row [L] of a stability store: `chance_jaccard(width, k)` with k the
    entries a vector of the row keeps at its mean sparsity at `p` (over every vector the row's experts saw);
    NaN for a row that saw no vector."""
    sp = store.sparsity(type)
    j = int(np.argmin(np.abs(store.p_grid - p)))
    mean, w = sp.mean[..., j].astype(np.float64), sp.vectors.astype(np.float64)
    out = np.full(mean.shape[0], np.nan)
    for r in range(mean.shape[0]):
        ok = np.isfinite(mean[r]) & (w[r] > 0)
        n = int(sp.width[r])
        if ok.any() and n > 0:
            s = float((mean[r, ok] * w[r, ok]).sum() / w[r, ok].sum())
            out[r] = chance_jaccard(n, min(n, max(0, round((1 - s) * n))))
    return out


def stability_summary(consecutive: float, drift: float, chance: float, pairs: int) -> str:
    """Return the summary line of a stability run: the mean Jaccards beside the chance level and their ratio."""
    verdict = ("at chance level: the masks are no more alike than random ones of the same sparsity"
               if consecutive < chance * 1.1 else f"{consecutive / chance:.2f}× chance")
    return (f"mean consecutive Jaccard {consecutive:.3f}, mean drift Jaccard {drift:.3f} over {pairs:,} consecutive "
            f"same-expert pairs; chance level (two independent masks of the same sparsity) {chance:.3f}: "
            f"consecutive is {verdict}")

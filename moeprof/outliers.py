"""Per-layer outlier and routing-balance statistics of experts (numpy only: used by the store and the reports).

Robust z-score (Iglewicz & Hoaglin's modified z): z = (s − median) / (1.4826 · MAD) over a layer's experts;
|z| > 3.5 flags an outlier. A *dead* expert is one that was routed no token (`dead_mask`, `DEAD_MAX_TOKENS`).
"""

from __future__ import annotations

import numpy as np

MAD_SCALE = 1.4826  # MAD · 1.4826 estimates σ for normal data
MEAN_AD_SCALE = 1.2533  # mean absolute deviation · 1.2533 estimates σ (used only where the MAD is 0)
OUTLIER_Z = 3.5  # Iglewicz & Hoaglin's cut for the modified z-score
DEAD_MAX_TOKENS = 0  # an expert routed at most this many tokens is dead


def dead_mask(tokens: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Return bool [L, E]: real expert slots (`slots` [L, E]) routed no more than DEAD_MAX_TOKENS tokens [L, E]."""
    return np.asarray(slots, dtype=bool) & (np.asarray(tokens) <= DEAD_MAX_TOKENS)


def robust_z(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Return the robust (modified) z-score of each masked, finite entry of `values` [L, E] within its row.

    z = (s − median) / (1.4826 · MAD) over the row's masked experts; where the MAD is 0 (more than half the
    experts share one value) the scale falls back to 1.2533 · mean absolute deviation, and to z = 0 when that is
    0 too. NaN outside the mask and in rows with fewer than 2 experts.
    """
    values = np.asarray(values, dtype=np.float64)
    z = np.full(values.shape, np.nan)
    for row in range(values.shape[0]):
        ok = mask[row] & np.isfinite(values[row])
        if ok.sum() < 2:
            continue
        s = values[row, ok]
        dev = s - np.median(s)
        scale = MAD_SCALE * np.median(np.abs(dev))
        if scale == 0:
            scale = MEAN_AD_SCALE * np.mean(np.abs(dev))
        z[row, ok] = dev / scale if scale > 0 else 0.0
    return z


def routing_balance(tokens: np.ndarray, slots: np.ndarray) -> dict[str, np.ndarray]:
    """Return per-layer routing facts from tokens [L, E] over real expert slots [L, E] (bool).

    load_share [L, E] (fraction of the layer's assignments; NaN outside slots), entropy_norm [L] (routing entropy /
    log E; NaN for one expert), max_mean_load [L] (busiest expert's tokens / mean), dead [L, E] (slots with none).
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    L = tokens.shape[0]
    share = np.full(tokens.shape, np.nan)
    entropy = np.full(L, np.nan)
    max_mean = np.full(L, np.nan)
    for l in range(L):
        t = tokens[l, slots[l]]
        if t.sum() <= 0:
            continue
        share[l, slots[l]] = t / t.sum()
        nz = t[t > 0] / t.sum()
        if slots[l].sum() > 1:
            entropy[l] = float(-(nz * np.log(nz)).sum() / np.log(slots[l].sum()))
        max_mean[l] = float(t.max() / t.mean())
    return {"load_share": share, "entropy_norm": entropy, "max_mean_load": max_mean,
            "dead": dead_mask(tokens, slots)}


def outlier_arrays(tokens: np.ndarray, slots: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (sparsity_z [L, E, P], flagged [L, E, P]) of mean sparsity [L, E, P] among each layer's live experts.

    Live = real slots that were routed tokens; z is NaN elsewhere, and flagged where |z| > OUTLIER_Z.
    """
    live = np.asarray(slots, dtype=bool) & ~dead_mask(tokens, slots)
    z = np.stack([robust_z(mean[..., j], live) for j in range(mean.shape[-1])], axis=-1)
    return z, np.abs(np.nan_to_num(z)) > OUTLIER_Z

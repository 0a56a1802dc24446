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


def routing_balance(tokens: np.ndarray, slots: np.ndarray, weight_sum: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Return per-layer routing facts from the exact counts tokens [L, E] over real expert slots [L, E] (bool).

    Per expert [L, E] (NaN outside slots):
      load_share   fraction of the layer's (token, expert) assignments;
      utilization  load ÷ ideal load = tokens / (the layer's assignments / its n slots) (NeMo's utilization
                   ratio: 1 = exactly the balanced share, 0 = dead, n = every assignment);
      weight_share the expert's fraction of the layer's routing-weight mass (from `weight_sum` [L, E]; NaN
                   without it);
      dead         slots routed no token (bool; False outside slots).
    Per layer [L] (NaN for a row of one slot, where balance is undefined):
      entropy_norm     routing entropy H / log n (1 = perfectly balanced);
      perplexity_frac  exp(H) / n, the fraction of experts "effectively" used (1 = balanced, 1/n = one expert);
      jain             Jain's fairness index (Σt)² / (n · Σt²) (vLLM; 1 = balanced, 1/n = one expert takes all);
      load_cv          coefficient of variation of tokens per expert, population std / mean (0 = balanced);
      max_mean_load    busiest expert's tokens / mean (one slot: 1);
      dead_frac        fraction of the layer's slots that are dead.
    Worked example: tokens [6, 2, 0, 0] → share [.75, .25, 0, 0], utilization [3, 1, 0, 0], jain 64 / (4·40) =
    0.4, load_cv = std([6, 2, 0, 0]) / 2 = 1.2247, H = 0.5623, entropy_norm 0.4056, perplexity_frac 0.4387,
    max_mean_load 3, dead_frac 0.5.
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    slots = np.asarray(slots, dtype=bool)
    L = tokens.shape[0]
    share, util, wshare = (np.full(tokens.shape, np.nan) for _ in range(3))
    entropy, perplexity, jain, cv, max_mean, dead_frac = (np.full(L, np.nan) for _ in range(6))
    dead = dead_mask(tokens, slots)
    for l in range(L):
        n = int(slots[l].sum())
        if n:
            dead_frac[l] = float(dead[l, slots[l]].sum() / n)
        t = tokens[l, slots[l]]
        if weight_sum is not None:
            w = np.asarray(weight_sum, dtype=np.float64)[l, slots[l]]
            if w.sum() > 0:
                wshare[l, slots[l]] = w / w.sum()
        if t.sum() <= 0:
            continue
        share[l, slots[l]] = t / t.sum()
        util[l, slots[l]] = t / t.mean()
        max_mean[l] = float(t.max() / t.mean())
        if n > 1:
            nz = t[t > 0] / t.sum()
            h = float(-(nz * np.log(nz)).sum())
            entropy[l] = h / np.log(n)
            perplexity[l] = float(np.exp(h) / n)
            jain[l] = float(t.sum() ** 2 / (n * (t * t).sum()))
            cv[l] = float(t.std() / t.mean())
    return {"load_share": share, "utilization": util, "weight_share": wshare, "entropy_norm": entropy,
            "perplexity_frac": perplexity, "jain": jain, "load_cv": cv, "max_mean_load": max_mean,
            "dead_frac": dead_frac, "dead": dead}


# the model-level aggregates of `routing_balance` (`model_balance`): name -> (per-layer key, reduction, doc)
MODEL_BALANCE = {
    "jain_mean": ("jain", "mean", "mean over routed layers of Jain's fairness index"),
    "load_cv_mean": ("load_cv", "mean", "mean over routed layers of the CV of tokens per expert"),
    "entropy_norm_mean": ("entropy_norm", "mean", "mean over routed layers of H / log E"),
    "perplexity_frac_mean": ("perplexity_frac", "mean", "mean over routed layers of exp(H) / E"),
    "max_mean_load_max": ("max_mean_load", "max", "largest busiest/mean load of any routed layer"),
    "utilization_max": ("utilization", "max", "largest utilization (load / ideal) of any expert"),
    "utilization_min": ("utilization", "min", "smallest utilization (load / ideal) of any expert"),
}


def model_balance(balance: dict[str, np.ndarray], slots: np.ndarray) -> dict[str, float]:
    """Return model-level aggregates over layers of a `routing_balance` result (MODEL_BALANCE, plus dead_frac =
    dead experts / all expert slots of the layers with more than one slot); NaN where no layer has several slots.
    """
    slots = np.asarray(slots, dtype=bool)
    routed = slots.sum(-1) > 1  # [L]
    out: dict[str, float] = {}
    for name, (key, how, _) in MODEL_BALANCE.items():
        v = balance[key][routed]
        v = v[np.isfinite(v)]
        out[name] = float(getattr(np, how)(v)) if v.size else float("nan")
    n = int(slots[routed].sum())
    out["dead_frac"] = float(balance["dead"][routed].sum() / n) if n else float("nan")
    return out


def outlier_arrays(tokens: np.ndarray, slots: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (sparsity_z [L, E, P], flagged [L, E, P]) of mean sparsity [L, E, P] among each layer's live experts.

    Live = real slots that were routed tokens; z is NaN elsewhere, and flagged where |z| > OUTLIER_Z.
    """
    live = np.asarray(slots, dtype=bool) & ~dead_mask(tokens, slots)
    z = np.stack([robust_z(mean[..., j], live) for j in range(mean.shape[-1])], axis=-1)
    return z, np.abs(np.nan_to_num(z)) > OUTLIER_Z


def routing_mutual_information(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Return how much each layer's expert choice tells about the text's domain, from routed counts [D, L, E].

    ``counts[d, l, e]`` = tokens of domain (or text) d that layer l routed to expert e (top-k: each token counts
    once per chosen expert). Each routed (token, expert) pair is one draw of the pair (domain, expert); with
    P(d, e) = counts[d, l, e] / counts[:, l, :].sum():

    - ``mi_bits[l]`` = Σ P(d, e) log2(P(d, e) / (P(d) P(e))), 0 when every domain routes alike;
    - ``domain_entropy_bits[l]`` = H(D) = −Σ P(d) log2 P(d), the most MI can be (expert choice names the domain);
    - ``mi_frac[l]`` = mi_bits / H(D) (NaN when there is one domain).
    A layer with no routed token gives NaN.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 3:
        raise ValueError(f"counts must be [domains, layers, experts], got shape {c.shape}")
    total = c.sum(axis=(0, 2))  # [L]
    with np.errstate(divide="ignore", invalid="ignore"):
        joint = c / total[None, :, None]  # [D, L, E]
        p_d = joint.sum(axis=2, keepdims=True)  # [D, L, 1]
        p_e = joint.sum(axis=0, keepdims=True)  # [1, L, E]
        terms = np.where(joint > 0, joint * np.log2(joint / (p_d * p_e)), 0.0)
        mi = terms.sum(axis=(0, 2))  # [L]
        pd = p_d[:, :, 0]  # [D, L]
        h = -np.where(pd > 0, pd * np.log2(pd), 0.0).sum(axis=0)  # [L]
        frac = np.where(h > 0, mi / h, np.nan)
    empty = total <= 0
    mi[empty], h[empty], frac[empty] = np.nan, np.nan, np.nan
    return {"mi_bits": np.maximum(mi, 0.0), "domain_entropy_bits": h, "mi_frac": frac}

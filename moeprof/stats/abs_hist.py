"""Histogram of |entry| per (layer, expert) and activation type, on fixed log-spaced edges — torch only.

What a static magnitude threshold τ needs (`moeprof.schedule.thresholds`): the fraction of an expert's entries with
|a| < τ, for any τ. The top-p statistics describe vectors (their sparsity at each p), not the distribution of
single entries, so they cannot give it.

Bins (A = ABS_BINS = 202): bin 0 = [0, 1e-6) (exact zeros and underflow), bins 1..200 = 20 per decade over
[1e-6, 1e4) (each edge 10^(1/20) ≈ 1.122 × the one before), bin 201 = [1e4, ∞) (overflow). The edges are fixed
(float32 values, so an fp32 / bf16 entry is compared to them exactly), part of the schema: every store bins
alike and two stores merge exactly. Worked example: |a| = 0.5 → log10 = −0.301 → bin
1 + floor((−0.301 + 6) · 20) = 114, [10^-0.35, 10^-0.3) = [0.4467, 0.5012).

Memory: L × E × A int64 per type: 48 layers × 128 experts × 202 × 8 B = 9.9 MB per type (Qwen3-30B-A3B shape),
39.7 MB for x, u, g, i (the per-vector sparsity histogram is L × E × P × 20: 15.7 MB per type at P = 16).
"""

from __future__ import annotations

import numpy as np
import torch

from moeprof.schema import Field
from moeprof.stats.base import Observation, TableAccumulator, register

ABS_LOW, ABS_HIGH, ABS_PER_DECADE = 1e-6, 1e4, 20
_DECADES = 10  # log10(ABS_HIGH / ABS_LOW)
# the A + 1 finite edges e_0 = 1e-6 … e_200 = 1e4 (float32-representable; bin j in 1..200 is [e_{j-1}, e_j))
ABS_EDGES = (10.0 ** (np.log10(ABS_LOW) + np.arange(_DECADES * ABS_PER_DECADE + 1) / ABS_PER_DECADE)
             ).astype(np.float32).astype(np.float64)  # exact float32 values, held as float64
ABS_BINS = len(ABS_EDGES) + 1  # underflow + 200 log bins + overflow
_CHUNK = 1 << 22  # entries binned at once (bounds the temporary index tensor on a large layer)


def abs_bin_bounds() -> tuple[np.ndarray, np.ndarray]:
    """Return (lower, upper) [A] bounds of every bin: [0, 1e-6), [e_0, e_1), …, [1e4, inf)."""
    lower = np.concatenate([[0.0], ABS_EDGES])
    upper = np.concatenate([ABS_EDGES, [np.inf]])
    return lower, upper


def abs_bin_index(v: torch.Tensor) -> torch.Tensor:
    """Return the bin [same shape as v] of each |entry| of v (int64 in 0..A-1), compared in float32.

    = torch.bucketize(|v|, ABS_EDGES, right=True) (tested), computed as floor((log10|v| + 6) · 20) + 1 and then
    moved by one bin where float32 rounding of the log put an entry beside an edge: 8× faster than the binary
    search on the CPU (numpy's log10 is vectorized), so the histogram costs a profile about as much as one sort.
    """
    if v.device.type == "cpu":
        a = np.abs(v.detach().float().numpy())
        with np.errstate(divide="ignore", invalid="ignore"):
            pos = np.log10(a)  # -inf for 0
        pos += -np.log10(ABS_LOW)
        pos *= ABS_PER_DECADE
        np.floor(pos, out=pos)
        np.clip(pos, -1, ABS_BINS - 2, out=pos)
        idx = pos.astype(np.int64)
        idx += 1
        idx -= a < _BOUNDS32[idx]  # below the bin's lower edge
        idx += a >= _BOUNDS32[idx + 1]  # at or above its upper edge
        return torch.from_numpy(np.minimum(idx, ABS_BINS - 1))
    edges = torch.as_tensor(ABS_EDGES, dtype=torch.float32, device=v.device)
    return torch.bucketize(v.detach().abs().float(), edges, right=True)  # number of edges <= |v|


# lower bound of every bin, then +inf: bin j = [_BOUNDS32[j], _BOUNDS32[j + 1])
_BOUNDS32 = np.concatenate([[0.0], ABS_EDGES, [np.inf]]).astype(np.float32)


@register
class AbsHistogram(TableAccumulator):
    """Histogram of |entry| of one activation type per (layer, expert) over the fixed log bins (ABS_EDGES)."""

    key = "abs_hist"
    group = "abs_hist"
    STATE = (Field("counts", ("L", "E", "A"), "int64", "entries of {name} vectors per |entry| bin [layer, expert, "
                   "bin]: bin 0 = [0, 1e-6), then 20 per decade up to 1e4 (edges), last = [1e4, inf)", "entries",
                   "sum"),)
    DERIVED = (Field("edges", ("A-1",), "float64", "the finite |entry| bin edges of counts: bin j in 1..A-2 holds "
                     "[edges[j-1], edges[j]) (float32 values)", "activation units"),)

    def _sizes(self) -> dict[str, int]:
        return {"L": self.num_layers, "E": self.num_experts, "A": ABS_BINS}

    def add(self, obs: Observation) -> None:
        if obs.type != self.type or obs.vectors is None or obs.expert_ids.numel() == 0:
            return
        v = obs.vectors.to(self.device)  # [N, D]
        N, D = v.shape
        if D == 0:
            return
        ids = obs.expert_ids.reshape(-1).long().to(self.device)  # [N]
        rows = max(1, _CHUNK // D)
        E, A = self.num_experts, ABS_BINS
        for start in range(0, N, rows):
            b = abs_bin_index(v[start:start + rows])  # [n, D]
            flat = ids[start:start + rows, None] * A + b  # [n, D]
            self.counts[obs.layer] += torch.bincount(flat.reshape(-1), minlength=E * A).view(E, A)

    def derived(self) -> dict[str, torch.Tensor]:
        return {"edges": torch.from_numpy(ABS_EDGES.copy())}

    @classmethod
    def from_hdf5(cls, group):
        """As every accumulator; a group binned on other edges (another moeprof) is refused, not mixed."""
        if "edges" in group and not np.array_equal(np.asarray(group["edges"][()], dtype=np.float64), ABS_EDGES):
            raise ValueError("the |entry| histogram was binned on other edges than this moeprof's; profile again")
        return super().from_hdf5(group)

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

import sys

import numpy as np
import torch

from moeprof.errors import InvalidArgument
from moeprof.schema import Field
from moeprof.stats.base import Observation, TableAccumulator, register

ABS_LOW, ABS_HIGH, ABS_PER_DECADE = 1e-6, 1e4, 20
_DECADES = 10  # log10(ABS_HIGH / ABS_LOW)
# the A + 1 finite edges e_0 = 1e-6 … e_200 = 1e4 (float32-representable; bin j in 1..200 is [e_{j-1}, e_j))
ABS_EDGES = (10.0 ** (np.log10(ABS_LOW) + np.arange(_DECADES * ABS_PER_DECADE + 1) / ABS_PER_DECADE)
             ).astype(np.float32).astype(np.float64)  # exact float32 values, held as float64
ABS_BINS = len(ABS_EDGES) + 1  # underflow + 200 log bins + overflow
_CHUNK = 1 << 22  # entries binned at once (bounds the temporary index tensor on a large layer)


def abs_bin_index(v: torch.Tensor) -> torch.Tensor:
    """Return the bin [same shape as v] of each |entry| of v (int64 in 0..A-1), compared in float32.

    = torch.bucketize(|v|, ABS_EDGES, right=True) (tested; the path on other devices). On the CPU a table indexed
    by the top 16 bits of |v|'s float32 pattern (sign, exponent, 7 mantissa bits: cells 0.8 % wide, so at most one
    edge falls inside a cell) gives the bin of the cell's lowest value, and one comparison with the next edge
    finishes it: several times faster than the binary search (`benchmarks/profile/bench_profile.py overhead
    --without abs_hist` measures what the histogram adds to a profile).
    """
    if v.device.type == "cpu":
        a = np.abs(v.detach().float().numpy())  # [..., D] float32
        idx = _CELL_BIN[_high_bits(a)]
        idx += a >= _NEXT_EDGE[idx]  # the cell holds the next edge and |v| is at or above it
        return torch.from_numpy(idx.astype(np.int64))
    edges = torch.as_tensor(ABS_EDGES, dtype=torch.float32, device=v.device)
    return torch.bucketize(v.detach().abs().float(), edges, right=True)  # number of edges <= |v|


def _expert_bin_counts(v: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Return counts [E, A] int64 of the |entries| of v [n, D] per (expert ids[n], bin) — on v's device."""
    E, A = num_experts, ABS_BINS
    if v.device.type == "cpu":  # all in numpy, int32 (E · A < 2^31): the table path of abs_bin_index, fused
        a = np.abs(v.detach().float().numpy())  # [n, D]
        idx = _CELL_BIN[_high_bits(a)]
        idx += a >= _NEXT_EDGE[idx]  # (the last bin's "next edge" is NaN: +inf stays in it)
        idx += (ids.numpy().astype(np.int32) * A)[:, None]
        return torch.from_numpy(np.bincount(idx.reshape(-1), minlength=E * A).reshape(E, A).astype(np.int64))
    flat = ids[:, None] * A + abs_bin_index(v)  # [n, D]
    return torch.bincount(flat.reshape(-1), minlength=E * A).view(E, A)


def _high_bits(a: np.ndarray) -> np.ndarray:
    """Return the top 16 bits of each float32 of `a` (a view where the machine is little-endian: no pass)."""
    return a.view(np.uint16)[..., 1::2] if sys.byteorder == "little" else (a.view(np.uint32) >> 16)


# upper edge of every bin (NaN for the last, so the comparison never moves an entry past it)
_NEXT_EDGE = np.concatenate([ABS_EDGES, [np.nan]]).astype(np.float32)
# bin of the lowest float32 of each cell of 2^16 bit patterns of a non-negative float (top 16 bits = cell)
_CELL_BIN = np.searchsorted(ABS_EDGES.astype(np.float32),
                            (np.arange(1 << 15, dtype=np.uint32) << 16).view(np.float32), side="right").astype(np.int32)


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
            self.counts[obs.layer] += _expert_bin_counts(v[start:start + rows], ids[start:start + rows], E)

    def derived(self) -> dict[str, torch.Tensor]:
        return {"edges": torch.from_numpy(ABS_EDGES.copy())}

    @classmethod
    def from_hdf5(cls, group):
        """As every accumulator; a group binned on other edges (another moeprof) is refused, not mixed."""
        if "edges" in group and not np.array_equal(np.asarray(group["edges"][()], dtype=np.float64), ABS_EDGES):
            raise InvalidArgument("the |entry| histogram was binned on other edges than this moeprof's; profile again")
        return super().from_hdf5(group)

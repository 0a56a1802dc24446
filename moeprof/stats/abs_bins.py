"""The fixed log-spaced |entry| bins of the |entry| histogram, and two ways to count entries in them — torch only.

Bins (A = ABS_BINS = 202): bin 0 = [0, 1e-6) (exact zeros and underflow), bins 1..200 = 20 per decade over
[1e-6, 1e4) (each edge 10^(1/20) ≈ 1.122 × the one before), bin 201 = [1e4, ∞) (overflow). The edges are fixed
(float32 values, so an fp32 / bf16 entry is compared to them exactly), part of the schema: every store bins
alike and two stores merge exactly. Worked example: |a| = 0.5 → log10 = −0.301 → bin
1 + floor((−0.301 + 6) · 20) = 114, [10^-0.35, 10^-0.3) = [0.4467, 0.5012).

Two ways to count, equal bin for bin (tested):
- `sorted_row_bin_counts(desc)`: from rows already sorted by |entry| (the sort behind the top-p curve, see
  `moeprof.stats.base.VectorSummary`): the position of each edge in a sorted row (a binary search) says how many
  entries lie at or above it, so a row costs A searches instead of one pass over its D entries; and a token routed
  to K experts is sorted (and binned) once, not K times. What a profile uses.
- `abs_bin_index` / `expert_bin_counts`: every entry looked up on its own (the direct reference, and the path for
  rows that come without their sort).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

ABS_LOW, ABS_HIGH, ABS_PER_DECADE = 1e-6, 1e4, 20
_DECADES = 10  # log10(ABS_HIGH / ABS_LOW)
# the A − 1 finite edges e_0 = 1e-6 … e_200 = 1e4 (float32-representable; bin j in 1..200 is [e_{j-1}, e_j))
ABS_EDGES = (10.0 ** (np.log10(ABS_LOW) + np.arange(_DECADES * ABS_PER_DECADE + 1) / ABS_PER_DECADE)
             ).astype(np.float32).astype(np.float64)  # exact float32 values, held as float64
ABS_BINS = len(ABS_EDGES) + 1  # underflow + 200 log bins + overflow
_EDGES_F32 = torch.from_numpy(ABS_EDGES.astype(np.float32))  # e_j, ascending


def sorted_row_bin_counts(ascending: torch.Tensor) -> torch.Tensor:
    """Return counts [N, A] int64 of the entries of each row of `ascending` [N, D] (|v| sorted ascending) per |entry|
    bin.

    Compared in float32, as `abs_bin_index` does (the cast is monotone, so the rows stay sorted). below_j =
    #{|a| < e_j} is the position of e_j in the row (searchsorted, left side: an entry equal to an edge lies in the
    bin that the edge opens, [e_{j-1}, e_j)); bin 0 = below_0, bin j = below_j − below_{j-1}, bin A−1 = D − below_{A-2}.
    Worked example: the row [0, 0.5, 1.0, 2e4] → below_0 = 1 (the 0), below_113 = 1, below_114 = 2 (0.5 <
    e_114 = 0.5012), …, below_120 = 2, below_121 = 3 (1.0 = e_120 is not below it) → bins 0, 114, 121, 201 hold
    one entry each.
    """
    N, D = ascending.shape
    rows = ascending if ascending.dtype == torch.float32 else ascending.to(torch.float32)
    edges = _EDGES_F32.to(rows.device).expand(N, -1).contiguous()  # [N, A-1]
    below = torch.searchsorted(rows, edges)  # [N, A-1] non-decreasing in j
    bounds = torch.cat([torch.zeros(N, 1, dtype=torch.long, device=rows.device), below,
                        torch.full((N, 1), D, dtype=torch.long, device=rows.device)], dim=1)  # [N, A+1]
    return bounds.diff(dim=1)


def abs_bin_index(v: torch.Tensor) -> torch.Tensor:
    """Return the bin [same shape as v] of each |entry| of v (int64 in 0..A-1), compared in float32.

    = torch.bucketize(|v|, ABS_EDGES, right=True) (tested; the path on other devices). On the CPU a table indexed
    by the top 16 bits of |v|'s float32 pattern (sign, exponent, 7 mantissa bits: cells 0.8 % wide, so at most one
    edge falls inside a cell) gives the bin of the cell's lowest value, and one comparison with the next edge
    finishes it.
    """
    if v.device.type == "cpu":
        a = np.abs(v.detach().float().numpy())  # [..., D] float32
        idx = _CELL_BIN[_high_bits(a)]
        idx += a >= _NEXT_EDGE[idx]  # the cell holds the next edge and |v| is at or above it
        return torch.from_numpy(idx.astype(np.int64))
    edges = torch.as_tensor(ABS_EDGES, dtype=torch.float32, device=v.device)
    return torch.bucketize(v.detach().abs().float(), edges, right=True)  # number of edges <= |v|


def expert_bin_counts(v: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Return counts [E, A] int64 of the |entries| of v [n, D] per (expert ids[n], bin), entry by entry — on v's
    device."""
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

"""Histogram of |entry| per (layer, expert) and activation type, on fixed log-spaced edges — torch only.

What a static magnitude threshold τ needs (`moeprof.schedule.thresholds`): the fraction of an expert's entries with
|a| < τ, for any τ. The top-p statistics describe vectors (their sparsity at each p), not the distribution of
single entries, so they cannot give it. The bins and the counting live in `moeprof.stats.abs_bins`; the counts
are read off the rows the top-p curve already sorted (a binary search per bin edge and row, and once per token
for type x, whose K routed copies share one sort).

Memory: L × E × A int64 per type: 48 layers × 128 experts × 202 × 8 B = 9.9 MB per type (Qwen3-30B-A3B shape),
39.7 MB for x, u, g, i (the per-vector sparsity histogram is L × E × P × 20: 15.7 MB per type at P = 16).
"""

from __future__ import annotations

import numpy as np
import torch

from moeprof.errors import InvalidArgument
from moeprof.schema import Field
from moeprof.stats.abs_bins import (  # noqa: F401 (re-exported: the bins are part of this statistic's schema)
    ABS_BINS,
    ABS_EDGES,
    ABS_HIGH,
    ABS_LOW,
    ABS_PER_DECADE,
    abs_bin_index,
    expert_bin_counts,
    sorted_row_bin_counts,
)
from moeprof.stats.base import Observation, TableAccumulator, register

_CHUNK = 1 << 22  # entries binned at once on the direct path (bounds the temporary index tensor)


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
        if obs.type != self.type or obs.expert_ids.numel() == 0 or (obs.vectors is None and obs.summary is None):
            return
        ids = obs.expert_ids.reshape(-1).long().to(self.device)  # [N]
        s = obs.vector_summary()
        if s.width == 0:
            return
        per_row = s.abs_bin_counts()  # [N, A] from the top-p sort; None when the summary came without it
        if per_row is not None:
            self.counts[obs.layer].index_add_(0, ids, per_row.to(self.device))
            return
        if obs.vectors is None:
            return
        v = obs.vectors.to(self.device)  # [N, D]
        rows = max(1, _CHUNK // v.shape[1])
        for start in range(0, v.shape[0], rows):
            self.counts[obs.layer] += expert_bin_counts(v[start:start + rows], ids[start:start + rows],
                                                        self.num_experts)

    def derived(self) -> dict[str, torch.Tensor]:
        return {"edges": torch.from_numpy(ABS_EDGES.copy())}

    @classmethod
    def from_hdf5(cls, group):
        """As every accumulator; a group binned on other edges (another moeprof) is refused, not mixed."""
        if "edges" in group and not np.array_equal(np.asarray(group["edges"][()], dtype=np.float64), ABS_EDGES):
            raise InvalidArgument("the |entry| histogram was binned on other edges than this moeprof's; profile again")
        return super().from_hdf5(group)

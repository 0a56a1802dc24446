"""Per-activation-type accumulators: the top-p sparsity curve, its per-vector histogram, magnitudes; and
`ActivationStats`, the view that shows them under their long-standing names."""

from __future__ import annotations

import numpy as np
import torch

from moeprof.schema import Field
from moeprof.stats.base import SPARSITY_UNITS, Observation, TableAccumulator, VectorSummary, register


def _per_vector(total: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Return total / vectors, broadcasting vectors [L, E] over trailing dims; NaN where no vector was seen."""
    n = vectors.double()
    while n.dim() < total.dim():
        n = n.unsqueeze(-1)
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))


@register
class SparsityCurve(TableAccumulator):
    """Token-averaged top-p sparsity curve of one activation type per (layer, expert): counts, sums, sqsums."""

    key = "sparsity_curve"
    group = "sparsity"
    STATE = (
        Field("width", ("L",), "int64", "entries per {name} vector [layer]", "entries", "max"),
        Field("vectors", ("L", "E"), "int64", "{name} vectors seen [layer, expert]", "vectors", "sum"),
        Field("sum", ("L", "E", "P"), "float64", "sum over vectors of the top-p sparsity of {name} "
              "[layer, expert, p] (exact state; mean = sum / vectors)", SPARSITY_UNITS, "sum"),
        Field("sqsum", ("L", "E", "P"), "float64", "sum over vectors of the squared top-p sparsity of {name} "
              "[layer, expert, p] (exact state for the standard deviation)", "(fraction of entries dropped)^2",
              "sum"),
    )
    DERIVED = (
        Field("mean", ("L", "E", "P"), "float64", "token-averaged top-p sparsity of {name} at each p "
              "[layer, expert, p]; NaN where the expert saw no tokens", SPARSITY_UNITS),
        Field("std", ("L", "E", "P"), "float64", "per-vector standard deviation of the top-p sparsity of {name} "
              "[layer, expert, p]", SPARSITY_UNITS),
    )

    def add(self, obs: Observation) -> None:
        if obs.type != self.type or obs.expert_ids.numel() == 0:
            return
        s = obs.vector_summary()
        ids = obs.expert_ids.reshape(-1).long().to(self.device)
        sp = s.sparsity().to(self.device)  # [N, P]
        self.width[obs.layer].clamp_(min=s.width)  # in place on the device: no host sync
        self.vectors[obs.layer].index_add_(0, ids, torch.ones_like(ids))
        self.sum[obs.layer].index_add_(0, ids, sp)
        self.sqsum[obs.layer].index_add_(0, ids, sp * sp)

    def mean(self) -> torch.Tensor:
        """Return token-averaged top-p sparsity [L, E, P] (NaN where an expert saw no tokens)."""
        return _per_vector(self.sum, self.vectors)

    def std(self) -> torch.Tensor:
        """Return the per-vector standard deviation of sparsity [L, E, P] (NaN where unseen)."""
        mean = self.mean()
        return (_per_vector(self.sqsum, self.vectors) - mean * mean).clamp(min=0).sqrt()

    def derived(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean(), "std": self.std()}


@register
class SparsityHistogram(TableAccumulator):
    """Histogram of per-vector top-p sparsity of one activation type per (layer, expert, p)."""

    key = "sparsity_hist"
    group = "sparsity"
    STATE = (Field("hist", ("L", "E", "P", "B"), "int64", "histogram of per-vector top-p sparsity of {name} over "
                   "hist_edges [layer, expert, p, bin]", "vectors", "sum"),)

    def add(self, obs: Observation) -> None:
        if obs.type != self.type or obs.expert_ids.numel() == 0:
            return
        E, P, B = self.num_experts, self.num_p, self.bins
        ids = obs.expert_ids.reshape(-1).long().to(self.device)
        s = obs.vector_summary().sparsity().to(self.device)  # [N, P]
        # exact kept counts make bin edges reachable (k/n = 0.7 with n = 5120): nudge so 0.7·20 = 13.999… lands in 14
        b = torch.floor(s * B + 1e-9).long().clamp_(0, B - 1)  # [N, P]
        flat = (ids[:, None] * P + torch.arange(P, device=self.device)) * B + b  # [N, P]
        self.hist[obs.layer] += torch.bincount(flat.reshape(-1), minlength=E * P * B).view(E, P, B)


_MAG_UNITS = "activation units"


@register
class Magnitudes(TableAccumulator):
    """Norms and peaks of one activation type per (layer, expert): L1, L2, max |entry|, max|v| / rms(v)."""

    key = "magnitude"
    group = "magnitude"
    STATE = (
        Field("vectors", ("L", "E"), "int64", "{name} vectors seen [layer, expert]", "vectors", "sum"),
        Field("l1_sum", ("L", "E"), "float64", "sum of the L1 norms of {name} [layer, expert]", _MAG_UNITS, "sum"),
        Field("l2_sum", ("L", "E"), "float64", "sum of the L2 norms of {name} [layer, expert]", _MAG_UNITS, "sum"),
        Field("max_abs_sum", ("L", "E"), "float64", "sum of the per-vector max |entry| of {name} [layer, expert]",
              _MAG_UNITS, "sum"),
        Field("max_abs", ("L", "E"), "float64", "largest |entry| of {name} seen [layer, expert]", _MAG_UNITS, "max"),
        Field("peak_ratio_sum", ("L", "E"), "float64", "sum of max|v| / rms(v) of {name} [layer, expert]", "ratio",
              "sum"),
    )
    DERIVED = (
        Field("l1_mean", ("L", "E"), "float64", "mean L1 norm of {name} [layer, expert]", _MAG_UNITS),
        Field("l2_mean", ("L", "E"), "float64", "mean L2 norm of {name} [layer, expert]", _MAG_UNITS),
        Field("max_abs_mean", ("L", "E"), "float64", "mean of the per-vector max |entry| of {name} [layer, expert]",
              _MAG_UNITS),
        Field("peak_ratio_mean", ("L", "E"), "float64", "mean of max|v| / rms(v) of {name}: how outlier-dominated "
              "vectors are [layer, expert]", "ratio"),
    )

    def add(self, obs: Observation) -> None:
        if obs.type != self.type or obs.expert_ids.numel() == 0:
            return
        E, layer = self.num_experts, obs.layer
        s = obs.vector_summary()
        ids = obs.expert_ids.reshape(-1).long().to(self.device)
        l1, l2, mx = (a.to(self.device) for a in (s.l1, s.l2, s.max_abs))
        self.vectors[layer].index_add_(0, ids, torch.ones_like(ids))
        self.l1_sum[layer].index_add_(0, ids, l1)
        self.l2_sum[layer].index_add_(0, ids, l2)
        self.max_abs_sum[layer].index_add_(0, ids, mx)
        rms = l2 / max(s.width, 1) ** 0.5
        self.peak_ratio_sum[layer].index_add_(0, ids, torch.where(rms > 0, mx / rms, torch.zeros_like(mx)))
        self.max_abs[layer] = torch.maximum(
            self.max_abs[layer],
            torch.zeros(E, dtype=torch.float64, device=self.device).scatter_reduce_(0, ids, mx, "amax"))

    def derived(self) -> dict[str, torch.Tensor]:
        # experts never routed a token: NaN, as in sparsity/mean
        return {f"{n}_mean": _per_vector(getattr(self, f"{n}_sum"), self.vectors)
                for n in ("l1", "l2", "max_abs", "peak_ratio")}

    def to_hdf5(self, group) -> None:
        """As every accumulator, except that max_abs of an expert that saw no vector is stored as NaN (not 0)."""
        super().to_hdf5(group)
        empty = (self.vectors == 0).cpu().numpy()
        if empty.any():
            stored = group["max_abs"][()]
            stored[empty] = np.nan
            group["max_abs"][...] = stored

    @classmethod
    def from_hdf5(cls, group):
        """As every accumulator; a stored NaN max_abs (no vector seen) is the neutral 0 of the max reduction."""
        acc = super().from_hdf5(group)
        acc.max_abs = torch.nan_to_num(acc.max_abs, nan=0.0)
        return acc


class ActivationStats:
    """The statistics of one activation type, under their long-standing names (a view on the accumulators).

    Attributes are the accumulators' own state tensors (updated in place by `add`): width [L], vectors [L, E],
    sparsity_sum / sparsity_sqsum [L, E, P], hist [L, E, P, B], l1_sum, l2_sum, max_abs_sum, max_abs,
    peak_ratio_sum [L, E].
    """

    def __init__(self, curve: SparsityCurve, hist: SparsityHistogram, magnitudes: Magnitudes):
        self._members = (curve, hist, magnitudes)
        self.type = curve.type
        self.num_layers, self.num_experts, self.num_p, self.bins = curve.num_layers, curve.num_experts, \
            curve.num_p, hist.bins
        self.width, self.vectors = curve.width, curve.vectors
        self.sparsity_sum, self.sparsity_sqsum = curve.sum, curve.sqsum
        self.hist = hist.hist
        for name in ("l1_sum", "l2_sum", "max_abs_sum", "max_abs", "peak_ratio_sum"):
            setattr(self, name, getattr(magnitudes, name))

    def add(self, layer: int, expert_ids: torch.Tensor, summary: VectorSummary) -> None:
        """Accumulate vectors of `summary` (row n went through expert `expert_ids[n]` of `layer`)."""
        n = expert_ids.numel()
        obs = Observation(layer, self.type, expert_ids, torch.arange(n), torch.zeros(n, dtype=torch.long),
                          summary=summary)
        for m in self._members:
            m.add(obs)

    def mean_sparsity(self) -> torch.Tensor:
        """Return token-averaged top-p sparsity [L, E, P] (NaN where an expert saw no tokens)."""
        return self._members[0].mean()

    def std_sparsity(self) -> torch.Tensor:
        """Return the per-vector standard deviation of sparsity [L, E, P] (NaN where unseen)."""
        return self._members[0].std()

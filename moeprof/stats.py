"""Streaming, mergeable statistics of activation sparsity per (layer, expert, type) — torch only.

Legend: L = layers, E = experts per layer (1 for a dense FFN), P = p-grid size, B = histogram bins,
N = vectors in one update (token-expert pairs for an MoE layer, tokens for a dense one), D = vector width.

Every accumulator has fixed-size state (memory does not grow with tokens) and `merge`, with
`merge(a, b) == accumulate(a ∪ b)` (sums add, maxima take the max, histograms add).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from moeprof.activations import ACTIVATION_TYPES, HIST_BINS, TYPE_NAMES  # noqa: F401 (re-exported)
from moeprof.topp import counts_from_prefix, descending_prefix


@dataclass
class VectorSummary:
    """Per-vector facts needed by the accumulators: kept counts [N, P] and magnitude summaries [N]."""

    counts: torch.Tensor  # [N, P] int64 kept entries at each p
    l1: torch.Tensor  # [N] float64
    l2: torch.Tensor  # [N] float64
    max_abs: torch.Tensor  # [N] float64
    width: int  # D

    @classmethod
    def of(cls, v: torch.Tensor, p_grid: Sequence[float]) -> "VectorSummary":
        """Summarize rows of v [N, D] (one sort per row for the whole p-curve)."""
        n = v.shape[0]
        if v.shape[-1] == 0:
            zeros = torch.zeros(n, dtype=torch.float64)
            return cls(torch.zeros(n, len(p_grid), dtype=torch.long), zeros, zeros, zeros, 0)
        # The sort behind the p-curve also yields the L1 norm (last prefix sum) and max |v| (first sorted entry).
        desc, prefix = descending_prefix(v)  # [N, D] each
        grid = torch.tensor([float(p) for p in p_grid], dtype=torch.float64, device=prefix.device)
        return cls(
            counts=counts_from_prefix(prefix, grid.expand(n, grid.numel())).cpu(),
            l1=prefix[:, -1].cpu(),
            l2=torch.linalg.vector_norm(v.float(), dim=-1).double().cpu(),
            max_abs=desc[:, 0].double().cpu(),
            width=int(v.shape[-1]),
        )

    def select(self, rows: torch.Tensor) -> "VectorSummary":
        """Return the summary of rows `rows` (e.g. repeat a token's input for each expert it was routed to)."""
        return VectorSummary(self.counts[rows], self.l1[rows], self.l2[rows], self.max_abs[rows], self.width)

    def sparsity(self) -> torch.Tensor:
        """Return per-vector top-p sparsity [N, P] (fraction of entries dropped)."""
        return 1.0 - self.counts.double() / max(self.width, 1)


@dataclass
class ActivationStats:
    """Accumulated statistics of one activation type over all (layer, expert) sites."""

    num_layers: int
    num_experts: int
    num_p: int
    bins: int = HIST_BINS
    width: torch.Tensor = field(default=None)  # [L] int64 vector width per layer (0 = not seen)
    vectors: torch.Tensor = field(default=None)  # [L, E] int64
    sparsity_sum: torch.Tensor = field(default=None)  # [L, E, P] float64
    sparsity_sqsum: torch.Tensor = field(default=None)  # [L, E, P] float64
    hist: torch.Tensor = field(default=None)  # [L, E, P, B] int64
    l1_sum: torch.Tensor = field(default=None)  # [L, E] float64
    l2_sum: torch.Tensor = field(default=None)  # [L, E] float64
    max_abs_sum: torch.Tensor = field(default=None)  # [L, E] float64
    max_abs: torch.Tensor = field(default=None)  # [L, E] float64
    peak_ratio_sum: torch.Tensor = field(default=None)  # [L, E] float64, sum of max|v| / rms(v)

    def __post_init__(self):
        L, E, P, B = self.num_layers, self.num_experts, self.num_p, self.bins
        f64 = dict(dtype=torch.float64)
        defaults = {
            "width": lambda: torch.zeros(L, dtype=torch.long),
            "vectors": lambda: torch.zeros(L, E, dtype=torch.long),
            "sparsity_sum": lambda: torch.zeros(L, E, P, **f64),
            "sparsity_sqsum": lambda: torch.zeros(L, E, P, **f64),
            "hist": lambda: torch.zeros(L, E, P, B, dtype=torch.long),
            "l1_sum": lambda: torch.zeros(L, E, **f64),
            "l2_sum": lambda: torch.zeros(L, E, **f64),
            "max_abs_sum": lambda: torch.zeros(L, E, **f64),
            "max_abs": lambda: torch.zeros(L, E, **f64),
            "peak_ratio_sum": lambda: torch.zeros(L, E, **f64),
        }
        for name, make in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, make())

    def add(self, layer: int, expert_ids: torch.Tensor, summary: VectorSummary) -> None:
        """Accumulate vectors of `summary` (row n went through expert `expert_ids[n]` of `layer`)."""
        if summary.counts.shape[0] == 0:
            return
        E, P, B = self.num_experts, self.num_p, self.bins
        ids = expert_ids.reshape(-1).long().cpu()
        s = summary.sparsity().cpu()  # [N, P]
        self.width[layer] = summary.width
        self.vectors[layer].index_add_(0, ids, torch.ones_like(ids))
        self.sparsity_sum[layer].index_add_(0, ids, s)
        self.sparsity_sqsum[layer].index_add_(0, ids, s * s)
        # exact kept counts make bin edges reachable (k/n = 0.7 with n = 5120): nudge so 0.7·20 = 13.999… lands in 14
        b = torch.floor(s * B + 1e-9).long().clamp_(0, B - 1)  # [N, P]
        flat = (ids[:, None] * P + torch.arange(P)) * B + b  # [N, P]
        self.hist[layer] += torch.bincount(flat.reshape(-1), minlength=E * P * B).view(E, P, B)
        l1, l2, mx = summary.l1.cpu(), summary.l2.cpu(), summary.max_abs.cpu()
        self.l1_sum[layer].index_add_(0, ids, l1)
        self.l2_sum[layer].index_add_(0, ids, l2)
        self.max_abs_sum[layer].index_add_(0, ids, mx)
        rms = l2 / max(summary.width, 1) ** 0.5
        self.peak_ratio_sum[layer].index_add_(0, ids, torch.where(rms > 0, mx / rms, torch.zeros_like(mx)))
        self.max_abs[layer] = torch.maximum(
            self.max_abs[layer], torch.zeros(E, dtype=torch.float64).scatter_reduce_(0, ids, mx, "amax"))

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        """Return the statistics of both streams together (neither input is modified)."""
        if (self.num_layers, self.num_experts, self.num_p, self.bins) != (
                other.num_layers, other.num_experts, other.num_p, other.bins):
            raise ValueError("cannot merge statistics of different shapes (layers, experts, p-grid or bins differ)")
        out = ActivationStats(self.num_layers, self.num_experts, self.num_p, self.bins)
        out.width = torch.maximum(self.width, other.width)
        for name in ("vectors", "sparsity_sum", "sparsity_sqsum", "hist", "l1_sum", "l2_sum", "max_abs_sum",
                     "peak_ratio_sum"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.max_abs = torch.maximum(self.max_abs, other.max_abs)
        return out

    def _per_vector(self, total: torch.Tensor) -> torch.Tensor:
        n = self.vectors.double()
        while n.dim() < total.dim():
            n = n.unsqueeze(-1)
        return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))

    def mean_sparsity(self) -> torch.Tensor:
        """Return token-averaged top-p sparsity [L, E, P] (NaN where an expert saw no tokens)."""
        return self._per_vector(self.sparsity_sum)

    def std_sparsity(self) -> torch.Tensor:
        """Return the per-vector standard deviation of sparsity [L, E, P] (NaN where unseen)."""
        mean = self.mean_sparsity()
        return (self._per_vector(self.sparsity_sqsum) - mean * mean).clamp(min=0).sqrt()


@dataclass
class RoutingStats:
    """Which experts tokens went to: counts and routing-weight sums per (layer, expert)."""

    num_layers: int
    num_experts: int
    tokens: torch.Tensor = field(default=None)  # [L, E] int64 (token, expert) assignments
    weight_sum: torch.Tensor = field(default=None)  # [L, E] float64
    layer_tokens: torch.Tensor = field(default=None)  # [L] int64 tokens entering each layer

    def __post_init__(self):
        if self.tokens is None:
            self.tokens = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)
        if self.weight_sum is None:
            self.weight_sum = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        if self.layer_tokens is None:
            self.layer_tokens = torch.zeros(self.num_layers, dtype=torch.long)

    def add(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor | None) -> None:
        """Accumulate one layer's routing: top_k_index [T, K] (and weights [T, K]; None = weight 1)."""
        ids = top_k_index.reshape(-1).long().cpu()
        w = (torch.ones(ids.shape, dtype=torch.float64) if top_k_weights is None
             else top_k_weights.reshape(-1).detach().double().cpu())
        self.tokens[layer].index_add_(0, ids, torch.ones_like(ids))
        self.weight_sum[layer].index_add_(0, ids, w)
        self.layer_tokens[layer] += top_k_index.shape[0]

    def merge(self, other: "RoutingStats") -> "RoutingStats":
        """Return the routing statistics of both streams together."""
        if (self.num_layers, self.num_experts) != (other.num_layers, other.num_experts):
            raise ValueError("cannot merge routing statistics of different shapes")
        return RoutingStats(self.num_layers, self.num_experts, self.tokens + other.tokens,
                            self.weight_sum + other.weight_sum, self.layer_tokens + other.layer_tokens)


@dataclass
class ProfileStats:
    """Everything a profile accumulates: routing plus one ActivationStats per profiled type."""

    num_layers: int
    num_experts: int
    p_grid: tuple[float, ...]
    types: tuple[str, ...] = ACTIVATION_TYPES
    activations: dict[str, ActivationStats] = field(default=None)
    routing: RoutingStats = field(default=None)

    def __post_init__(self):
        unknown = [t for t in self.types if t not in ACTIVATION_TYPES]
        if unknown:
            raise ValueError(f"unknown activation type(s) {unknown}; choose from {', '.join(ACTIVATION_TYPES)}")
        if self.activations is None:
            self.activations = {t: ActivationStats(self.num_layers, self.num_experts, len(self.p_grid))
                                for t in self.types}
        if self.routing is None:
            self.routing = RoutingStats(self.num_layers, self.num_experts)

    def merge(self, other: "ProfileStats") -> "ProfileStats":
        """Return the statistics of both profiles together (same model shape, p-grid and types)."""
        if tuple(self.p_grid) != tuple(other.p_grid) or tuple(self.types) != tuple(other.types):
            raise ValueError("cannot merge profiles with different p-grids or activation types")
        return ProfileStats(self.num_layers, self.num_experts, self.p_grid, self.types,
                            {t: self.activations[t].merge(other.activations[t]) for t in self.types},
                            self.routing.merge(other.routing))

"""Effective rank per (layer, expert, type): the exact Gram matrix of the activations, streamed and mergeable.

Legend: L = layers, R = layers whose Gram is kept, E = experts per layer, N = rows in one observation,
D = vector width of the type (x: hidden size; u/g/i: the largest expert FFN width; narrower rows are zero-padded,
which adds only zero singular values and so leaves the effective rank unchanged).

Definition (Roy & Vetterli, the paper's): for the token × feature matrix A [n, D] of an expert's activations,
with singular values σ_j, effective rank = exp(H(q)), q_j = σ_j / Σ σ, H(q) = −Σ q_j log q_j.
Method: A's singular values are sqrt(eig(AᵀA)), and AᵀA = Σ_rows vᵀv streams and merges by a sum, so the state
is the exact Gram [R, E, D, D] in float64 (all-reduced and merged like any summed field). Its size is
R · E · D² · 8 bytes per type, so `moeprof profile --rank` estimates it first and refuses past a budget; the
bounded alternative is a subset of layers (`--rank-layers`), each kept layer still exact.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from moeprof.activation_types import HIST_BINS
from moeprof.errors import InvalidArgument
from moeprof.schema import Field
from moeprof.stats.base import Observation, TableAccumulator, register

RANK_METHOD = "exact Gram (sum of v^T v per expert, float64); singular values = sqrt(eig(Gram))"


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """Return exp(entropy of the normalized singular values) over the last dim [..., D] -> [...] (NaN if all 0)."""
    s = singular_values.double().clamp(min=0)
    total = s.sum(-1, keepdim=True)
    q = s / total
    h = -torch.where(q > 0, q * q.log(), torch.zeros_like(q)).sum(-1)
    return torch.where(total.squeeze(-1) > 0, h.exp(), torch.full_like(h, float("nan")))


def gram_bytes(num_layers: int, num_experts: int, width: int) -> int:
    """Return the bytes of one type's Gram state: R · E · D² float64."""
    return num_layers * num_experts * width * width * 8


@register
class EffectiveRank(TableAccumulator):
    """Exact Gram matrix of one activation type per (kept layer, expert), and its effective rank [L, E].

    Not collected by default (a profile without --rank builds none and pays nothing); `for_layers` builds one.
    """

    key = "rank"
    group = "rank"
    collected = False
    STATE = (
        Field("vectors", ("L", "E"), "int64", "{name} vectors seen by the rank statistic [layer, expert]", "vectors",
              "sum"),
        Field("gram", ("R", "E", "D", "D"), "float64", "sum over {name} vectors v of v^T v [kept layer, expert, "
              "feature, feature] (exact state; singular values of the activation matrix = sqrt(eig))",
              "(activation)^2", "sum"),
    )
    DERIVED = (
        Field("effective_rank", ("L", "E"), "float64", "effective rank of the token x feature matrix of {name}: "
              "exp(entropy of its normalized singular values) [layer, expert]; NaN: layer not kept or no vectors",
              "dimensions"),
    )

    def __init__(self, num_layers: int, num_experts: int, num_p: int = 0, bins: int = HIST_BINS,
                 type: str | None = None, device: str | torch.device = "cpu", *, width: int = 0,
                 layers: Sequence[int] | None = None, **state: torch.Tensor):
        if "gram" in state:
            width = int(state["gram"].shape[-1])
        self.width = int(width)
        self.kept = list(range(num_layers)) if layers is None else [int(l) for l in layers]  # a setting, not state
        super().__init__(num_layers, num_experts, num_p, bins, type, device, **state)
        self.row_of = {l: r for r, l in enumerate(self.kept)}  # layer -> row of gram

    @classmethod
    def for_layers(cls, num_layers: int, num_experts: int, type: str, width: int,
                   layers: Sequence[int] | None = None, device: str | torch.device = "cpu") -> "EffectiveRank":
        """Return an empty accumulator for `type` rows of `width` entries, keeping `layers` (None: all)."""
        return cls(num_layers, num_experts, type=type, device=device, width=width, layers=layers)

    def _sizes(self) -> dict[str, int]:
        return {"L": self.num_layers, "E": self.num_experts, "R": len(self.kept), "D": self.width}

    def padded(self, width: int) -> "EffectiveRank":
        """Return this statistic with its Gram zero-padded to `width` features (exactly neutral: zero singular
        values carry no mass); self when it is that wide already."""
        if width == self.width:
            return self
        if width < self.width:
            raise ValueError(f"cannot narrow a {self.width}-wide Gram to {width}")
        state = self.state()
        gram = torch.zeros(*state["gram"].shape[:2], width, width, dtype=torch.float64, device=self.device)
        gram[..., :self.width, :self.width] = state["gram"]
        return self._with(**{**state, "gram": gram})

    def to(self, device):
        if torch.device(device) == self.device:
            return self
        return self._with(device=device, **self.state())

    def _with(self, device=None, **state) -> "EffectiveRank":
        return type(self)(self.num_layers, self.num_experts, self.num_p, self.bins, self.type,
                          self.device if device is None else device, layers=self.kept, **state)

    def merge(self, other):
        """Return the statistic of both streams: Grams and counts add (a narrower Gram is zero-padded first)."""
        if (type(other) is not type(self) or (self.num_layers, self.num_experts, self.type) != (
                other.num_layers, other.num_experts, other.type)):
            raise InvalidArgument("cannot merge effective-rank statistics of different shapes or types "
                             "(layers, experts or activation type differ)")
        if other.kept != self.kept:
            raise InvalidArgument(f"cannot merge effective-rank statistics kept on different layers ({self.kept} vs "
                             f"{other.kept}); profile both with the same --rank-layers")
        width = max(self.width, other.width)  # one side may have been built empty (width 0)
        a, b = self.padded(width), other.padded(width)
        return self._with(vectors=a.vectors + b.vectors.to(self.device), gram=a.gram + b.gram.to(self.device))

    @classmethod
    def from_hdf5(cls, group) -> "EffectiveRank":
        """Return the statistic a group holds (kept layers from its `layers` attribute)."""
        state = {f.name: torch.from_numpy(np.array(group[f.name][()], dtype=f.dtype)) for f in cls.STATE}
        L, E = state["vectors"].shape
        t = group.attrs.get("type")
        t = t.decode() if isinstance(t, bytes) else str(t)
        layers = [int(l) for l in group.attrs["layers"]] if "layers" in group.attrs else None
        return cls(L, E, type=t, layers=layers, **state)

    def add(self, obs: Observation) -> None:
        if obs.type != self.type or obs.layer not in self.row_of or obs.expert_ids.numel() == 0:
            return
        if obs.vectors is None:
            raise ValueError("effective rank needs the raw activation rows; the capture gave only their summary")
        v = obs.vectors.detach().to(self.device, torch.float64)  # [N, d]
        d = v.shape[-1]
        if d > self.width:  # built without a width (e.g. `empty`): grow once to the rows seen
            grown = self.padded(d)
            self.width, self.gram = grown.width, grown.gram
        ids = obs.expert_ids.reshape(-1).long().to(self.device)  # [N]
        self.vectors[obs.layer].index_add_(0, ids, torch.ones_like(ids))
        order = torch.argsort(ids, stable=True)
        experts, counts = torch.unique_consecutive(ids[order], return_counts=True)
        gram = self.gram[self.row_of[obs.layer]]  # [E, D, D]
        for e, rows in zip(experts.tolist(), torch.split(order, counts.tolist())):
            ve = v[rows]  # [n, d]
            gram[e, :d, :d] += ve.T @ ve

    def effective_rank(self) -> torch.Tensor:
        """Return the effective rank [L, E] (NaN for layers not kept and experts that saw no vector)."""
        out = torch.full((self.num_layers, self.num_experts), float("nan"), dtype=torch.float64)
        if not self.width:
            return out
        seen = self.vectors.cpu() > 0
        gram = self.gram.cpu()
        rows = [(r, layer, e) for r, layer in enumerate(self.kept) for e in torch.nonzero(seen[layer]).flatten().tolist()]
        if not rows:
            return out
        r_i, l_i, e_i = (torch.tensor(c) for c in zip(*rows))
        # One thread: the CPU eigensolver's threads oversubscribe a busy machine (measured 0.37 s per 128x128
        # matrix with the default threads on a loaded 2-core box, ~3 ms with one); the setting is restored.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            sv = torch.linalg.eigvalsh(gram[r_i, e_i]).clamp(min=0).sqrt()  # [n, D] singular values
        finally:
            torch.set_num_threads(threads)
        out[l_i, e_i] = effective_rank(sv)
        return out

    def derived(self) -> dict[str, torch.Tensor]:
        return {"effective_rank": self.effective_rank()}

    def to_hdf5(self, group) -> None:
        super().to_hdf5(group)
        group.attrs["method"] = RANK_METHOD if len(self.kept) == self.num_layers else (
            f"{RANK_METHOD}; rows {self.kept} of the profile only (the others NaN; a row is a decoder layer's site, "
            "see /sites/layer)")
        group.attrs["width"] = self.width
        group.attrs["layers"] = np.array(self.kept, dtype=np.int64)


def rank_budget_line(estimates: dict[str, int]) -> str:
    """Return a human line of the Gram memory per type and in total."""
    total = sum(estimates.values())
    parts = ", ".join(f"{t}: {b / 2**30:.2f} GiB" for t, b in estimates.items())
    return f"{total / 2**30:.2f} GiB ({parts})"


__all__ = ["EffectiveRank", "effective_rank", "gram_bytes", "rank_budget_line", "RANK_METHOD"]

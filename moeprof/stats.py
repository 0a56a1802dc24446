"""Streaming, mergeable statistics of activation sparsity per (layer, expert, type) — torch only.

Legend: L = layers, E = experts per layer (1 for a dense FFN), P = p-grid size, B = histogram bins,
N = vectors in one update (token-expert pairs for an MoE layer, tokens for a dense one), D = vector width,
K = routed slots per token.

Every statistic a profile collects is an *accumulator* (`Accumulator`): it is fed `Observation`s with `add`,
combines with `merge` (merge(a, b) == accumulate(a ∪ b)), and writes / reads its exact state with `to_hdf5` /
`from_hdf5`. The registered accumulators (`STATISTICS`) are what `ProfileStats` collects and what the store
writes and reads; a new statistic is one new class decorated with `@register`. Fixed-size accumulators declare
their state as a table of `moeprof.schema.Field` rows, each with its reduction (sum / max), so `merge`, `empty`,
`to_hdf5` and `from_hdf5` are derived from the table and a declared field can never be dropped by merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from moeprof.activations import ACTIVATION_TYPES, HIST_BINS, TYPE_NAMES  # noqa: F401 (re-exported)
from moeprof.schema import Field, put
from moeprof.topp import counts_from_prefix, descending_prefix

_DTYPES = {"int64": torch.long, "float64": torch.float64, "float32": torch.float32}
_REDUCE = {"sum": torch.add, "max": torch.maximum}  # how merge combines a state field (moeprof.schema.REDUCTIONS)


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


# ----------------------------------------------------------------------------------------------------------
# What every accumulator is fed


@dataclass
class Observation:
    """One call's facts at one site, the same object for every accumulator.

    Two kinds: a *routing* observation (type None: which expert each (token, slot) went to, with its weight)
    and an *activation* observation (type in x/u/g/i: vectors of that type, row n routed to expert_ids[n]).
    The raw vectors [N, D] are there when the caller had them (an accumulator that needs more than the p-curve,
    e.g. effective rank, reads them); the p-curve summary is computed from them once, on first request.
    """

    layer: int
    type: str | None  # None: a routing observation
    expert_ids: torch.Tensor  # [N] int64 expert of each row
    token_idx: torch.Tensor  # [N] int64 token of each row within the current batch
    slot: torch.Tensor  # [N] int64 routed slot (0..K-1) of each row
    vectors: torch.Tensor | None = None  # [N, D] raw activations (activation observations, when available)
    summary: VectorSummary | None = None  # p-curve facts of `vectors` (given, or computed on first request)
    p_grid: tuple[float, ...] = ()
    weights: torch.Tensor | None = None  # [N] float64 routing weight of each row (routing observations)
    num_tokens: int = 0  # tokens entering the layer (routing observations)

    @classmethod
    def routing(cls, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor | None) -> "Observation":
        """Return the routing observation of top_k_index [T, K] (weights [T, K]; None = weight 1)."""
        T, K = top_k_index.shape
        ids = top_k_index.reshape(-1).long().cpu()  # [T·K]
        w = (torch.ones(ids.shape, dtype=torch.float64) if top_k_weights is None
             else top_k_weights.reshape(-1).detach().double().cpu())
        return cls(layer, None, ids, torch.arange(T).repeat_interleave(K), torch.arange(K).repeat(T),
                   weights=w, num_tokens=T)

    def vector_summary(self) -> VectorSummary:
        """Return the p-curve summary of the rows (sorting the vectors once, then cached)."""
        if self.summary is None:
            self.summary = VectorSummary.of(self.vectors, self.p_grid)
        return self.summary


# ----------------------------------------------------------------------------------------------------------
# The protocol and the registry


@runtime_checkable
class Accumulator(Protocol):
    """A streaming statistic: fixed-size state, fed observations, mergeable, stored exactly in HDF5.

    A stream is fed as: for each batch, begin_batch(input_ids [B, S], first_sequence), add(obs) for every
    routing and activation observation of its forward, end_batch(B·S). merge(a, b) == the accumulator of a's
    stream followed by b's; to_hdf5 then from_hdf5 returns an equal state.

    key: the registry name; group: the HDF5 group it writes (under `<group>/<type>` when per_type);
    per_type: one instance per activation type (else one per profile); collected: part of every profile.
    """

    key: ClassVar[str]
    group: ClassVar[str]
    per_type: ClassVar[bool]
    collected: ClassVar[bool]

    def begin_batch(self, input_ids: torch.Tensor, first_sequence: int) -> None: ...

    def add(self, obs: Observation) -> None: ...

    def end_batch(self, num_tokens: int) -> None: ...

    def merge(self, other: "Accumulator") -> "Accumulator": ...

    def to_hdf5(self, group: Any) -> None: ...

    @classmethod
    def from_hdf5(cls, group: Any) -> "Accumulator": ...

    @classmethod
    def empty(cls, shape: "ProfileShape", type: str | None = None) -> "Accumulator": ...

    def state(self) -> dict[str, torch.Tensor]: ...


STATISTICS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add an accumulator to `STATISTICS` (what profiles collect and stores hold)."""
    if cls.key in STATISTICS:
        raise ValueError(f"an accumulator named {cls.key!r} is already registered ({STATISTICS[cls.key].__name__})")
    STATISTICS[cls.key] = cls
    return cls


@dataclass(frozen=True)
class ProfileShape:
    """The sizes an accumulator is built for (one place, so every registered class is built the same way)."""

    num_layers: int
    num_experts: int
    p_grid: tuple[float, ...]
    types: tuple[str, ...] = ACTIVATION_TYPES
    top_k: int = 1
    trace_tokens: int = 0
    bins: int = HIST_BINS


class TableAccumulator:
    """Base of the fixed-size accumulators: state = the tensors named in `STATE`, merged by each row's reduction.

    Subclasses declare STATE (merged, stored, read back) and DERIVED (stored for readers, recomputed from the
    state by `derived()`), and implement `add`. Sizes come from the dims: L, E, P, B.
    """

    key: ClassVar[str]
    group: ClassVar[str]
    per_type: ClassVar[bool] = True
    collected: ClassVar[bool] = True
    STATE: ClassVar[tuple[Field, ...]] = ()
    DERIVED: ClassVar[tuple[Field, ...]] = ()

    def __init__(self, num_layers: int, num_experts: int, num_p: int = 0, bins: int = HIST_BINS,
                 type: str | None = None, **state: torch.Tensor):
        self.num_layers, self.num_experts, self.num_p, self.bins = num_layers, num_experts, num_p, bins
        self.type = type
        sizes = self._sizes()
        for f in self.STATE:
            value = state.pop(f.name, None)
            setattr(self, f.name, value if value is not None else
                    torch.zeros([sizes[d] for d in f.dims], dtype=_DTYPES[f.dtype]))
        if state:
            raise TypeError(f"{self.__class__.__name__} has no state field(s) {sorted(state)}")

    def _sizes(self) -> dict[str, int]:
        """Return the sizes of the dims the state uses (L, E, P, B)."""
        sizes = {"L": self.num_layers, "E": self.num_experts, "P": self.num_p, "B": self.bins}
        return {d: sizes[d] for f in self.STATE for d in f.dims}

    @classmethod
    def empty(cls, shape: ProfileShape, type: str | None = None):
        """Return an accumulator with zero state for a profile of `shape` (and activation `type`)."""
        return cls(shape.num_layers, shape.num_experts, len(shape.p_grid), shape.bins, type)

    def begin_batch(self, input_ids: torch.Tensor, first_sequence: int) -> None:
        """Stream boundary (a batch [B, S] starts): nothing to do for statistics that ignore token positions."""

    def end_batch(self, num_tokens: int) -> None:
        """Stream boundary (a batch of `num_tokens` tokens ends)."""

    def state(self) -> dict[str, torch.Tensor]:
        """Return the exact state: {field name: tensor}, in STATE order."""
        return {f.name: getattr(self, f.name) for f in self.STATE}

    def merge(self, other):
        """Return the accumulator of both streams together (neither input is modified)."""
        if type(other) is not type(self) or self._sizes() != other._sizes() or self.type != other.type:
            raise ValueError(f"cannot merge {type(self).__name__} statistics of different shapes or types "
                             "(layers, experts, p-grid, bins or activation type differ)")
        merged = {f.name: _REDUCE[f.reduce](getattr(self, f.name), getattr(other, f.name)) for f in self.STATE}
        return type(self)(self.num_layers, self.num_experts, self.num_p, self.bins, self.type, **merged)

    def derived(self) -> dict[str, torch.Tensor]:
        """Return the DERIVED datasets computed from the state (means, standard deviations)."""
        return {}

    def to_hdf5(self, group) -> None:
        """Write the state (exact) and the derived datasets into an h5py-like group, each with doc and units."""
        if self.type is not None:
            group.attrs["type"] = self.type
        for f in self.STATE:
            put(group, f.name, getattr(self, f.name).numpy(), f.doc_for(self.type), f.units)
        derived = self.derived()
        for f in self.DERIVED:
            put(group, f.name, derived[f.name].numpy(), f.doc_for(self.type), f.units)

    @classmethod
    def from_hdf5(cls, group):
        """Return the accumulator whose state `group` holds (sizes from the dataset shapes, type from attrs)."""
        missing = [f.name for f in cls.STATE if f.name not in group]
        if missing:
            raise KeyError(f"{cls.__name__}: the group lacks state dataset(s) {missing}; read it through "
                           "moeprof.store (which upgrades older stores)")
        state = {f.name: torch.from_numpy(np.array(group[f.name][()], dtype=f.dtype)) for f in cls.STATE}
        sizes = {"L": 0, "E": 0, "P": 0, "B": HIST_BINS}
        for f in cls.STATE:
            sizes.update(zip(f.dims, state[f.name].shape))
        t = group.attrs.get("type") if cls.per_type else None
        t = t.decode() if isinstance(t, bytes) else (None if t is None else str(t))
        return cls(sizes["L"], sizes["E"], sizes["P"], sizes["B"], t, **state)


def _per_vector(total: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Return total / vectors, broadcasting vectors [L, E] over trailing dims; NaN where no vector was seen."""
    n = vectors.double()
    while n.dim() < total.dim():
        n = n.unsqueeze(-1)
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))


_SPARSITY_UNITS = "fraction of entries dropped"


@register
class SparsityCurve(TableAccumulator):
    """Token-averaged top-p sparsity curve of one activation type per (layer, expert): counts, sums, sqsums."""

    key = "sparsity_curve"
    group = "sparsity"
    STATE = (
        Field("width", ("L",), "int64", "entries per {name} vector [layer]", "entries", "max"),
        Field("vectors", ("L", "E"), "int64", "{name} vectors seen [layer, expert]", "vectors", "sum"),
        Field("sum", ("L", "E", "P"), "float64", "sum over vectors of the top-p sparsity of {name} "
              "[layer, expert, p] (exact state; mean = sum / vectors)", _SPARSITY_UNITS, "sum"),
        Field("sqsum", ("L", "E", "P"), "float64", "sum over vectors of the squared top-p sparsity of {name} "
              "[layer, expert, p] (exact state for the standard deviation)", "(fraction of entries dropped)^2",
              "sum"),
    )
    DERIVED = (
        Field("mean", ("L", "E", "P"), "float64", "token-averaged top-p sparsity of {name} at each p "
              "[layer, expert, p]; NaN where the expert saw no tokens", _SPARSITY_UNITS),
        Field("std", ("L", "E", "P"), "float64", "per-vector standard deviation of the top-p sparsity of {name} "
              "[layer, expert, p]", _SPARSITY_UNITS),
    )

    def add(self, obs: Observation) -> None:
        if obs.type != self.type or obs.expert_ids.numel() == 0:
            return
        s = obs.vector_summary()
        ids = obs.expert_ids.reshape(-1).long().cpu()
        sp = s.sparsity().cpu()  # [N, P]
        self.width[obs.layer] = max(int(self.width[obs.layer]), s.width)
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
        ids = obs.expert_ids.reshape(-1).long().cpu()
        s = obs.vector_summary().sparsity().cpu()  # [N, P]
        # exact kept counts make bin edges reachable (k/n = 0.7 with n = 5120): nudge so 0.7·20 = 13.999… lands in 14
        b = torch.floor(s * B + 1e-9).long().clamp_(0, B - 1)  # [N, P]
        flat = (ids[:, None] * P + torch.arange(P)) * B + b  # [N, P]
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
        ids = obs.expert_ids.reshape(-1).long().cpu()
        l1, l2, mx = s.l1.cpu(), s.l2.cpu(), s.max_abs.cpu()
        self.vectors[layer].index_add_(0, ids, torch.ones_like(ids))
        self.l1_sum[layer].index_add_(0, ids, l1)
        self.l2_sum[layer].index_add_(0, ids, l2)
        self.max_abs_sum[layer].index_add_(0, ids, mx)
        rms = l2 / max(s.width, 1) ** 0.5
        self.peak_ratio_sum[layer].index_add_(0, ids, torch.where(rms > 0, mx / rms, torch.zeros_like(mx)))
        self.max_abs[layer] = torch.maximum(
            self.max_abs[layer], torch.zeros(E, dtype=torch.float64).scatter_reduce_(0, ids, mx, "amax"))

    def derived(self) -> dict[str, torch.Tensor]:
        # experts never routed a token: NaN, as in sparsity/mean
        return {f"{n}_mean": _per_vector(getattr(self, f"{n}_sum"), self.vectors)
                for n in ("l1", "l2", "max_abs", "peak_ratio")}


@register
class RoutingStats(TableAccumulator):
    """Which experts tokens went to: counts and routing-weight sums per (layer, expert)."""

    key = "routing"
    group = "routing"
    per_type = False
    STATE = (
        Field("tokens", ("L", "E"), "int64", "tokens routed to each expert (one per (token, expert) assignment; a "
              "dense layer's single expert gets every token) [layer, expert]", "tokens", "sum"),
        Field("weight_sum", ("L", "E"), "float64", "sum of the routing weights given to each expert "
              "[layer, expert]", "routing weight", "sum"),
        Field("layer_tokens", ("L",), "int64", "tokens entering each layer [layer]", "tokens", "sum"),
    )

    def add(self, obs: Observation | int, top_k_index: torch.Tensor | None = None,
            top_k_weights: torch.Tensor | None = None) -> None:
        """Accumulate a routing observation; or, typed, one layer's top_k_index [T, K] (weights [T, K] or None)."""
        if not isinstance(obs, Observation):
            obs = Observation.routing(obs, top_k_index, top_k_weights)
        if obs.type is not None:
            return
        self.tokens[obs.layer].index_add_(0, obs.expert_ids, torch.ones_like(obs.expert_ids))
        self.weight_sum[obs.layer].index_add_(0, obs.expert_ids, obs.weights)
        self.layer_tokens[obs.layer] += obs.num_tokens


# ----------------------------------------------------------------------------------------------------------
# The per-token trace


_TRACE_ROWS = ("token_id", "sequence", "position", "expert", "weight")  # per-token arrays besides sparsity_<t>


@register
class TraceRecorder:
    """Per-token detail for the first `max_tokens` tokens: routing and sparsity at each p, per (layer, slot).

    Merging: merge(a, b) is the trace of a's token stream followed by b's (b's sequence indices shifted past
    a's). It is only meaningful for consecutive streams in that order (it is not commutative): b's rows are
    appended only while a recorded every token it saw and room is left, so the result equals the trace of the
    concatenated stream.
    """

    key = "trace"
    group = "trace"
    per_type = False
    collected = False  # a profile records it only when asked (--trace-tokens), beside ProfileStats
    STATE = (
        Field("token_id", ("N",), "int64", "token id [token]", ""),
        Field("sequence", ("N",), "int64", "packed sequence index [token]", ""),
        Field("position", ("N",), "int64", "position within its sequence [token]", ""),
        Field("expert", ("N", "L", "K"), "int64", "expert chosen in each routed slot [token, layer, slot]", ""),
        Field("weight", ("N", "L", "K"), "float32", "routing weight of each slot [token, layer, slot]",
              "routing weight"),
        Field("sparsity_{type}", ("N", "L", "K", "P"), "float32", "top-p sparsity of {name} at each p "
              "[token, layer, slot, p]", _SPARSITY_UNITS),
    )

    def __init__(self, max_tokens: int, num_layers: int, top_k: int, p_grid: Sequence[float], types: Sequence[str]):
        N, L, K, P = max_tokens, num_layers, top_k, len(p_grid)
        self.max_tokens = N
        self.token_id = torch.full((N,), -1, dtype=torch.long)
        self.sequence = torch.full((N,), -1, dtype=torch.long)
        self.position = torch.full((N,), -1, dtype=torch.long)
        self.expert = torch.full((N, L, K), -1, dtype=torch.long)
        self.weight = torch.full((N, L, K), float("nan"))
        self.sparsity = {t: torch.full((N, L, K, P), float("nan")) for t in types}
        self.offset = 0  # global index of the current batch's first token (= tokens seen before it)
        self.recorded = 0
        self.sequences = 0  # sequences seen

    @classmethod
    def empty(cls, shape: ProfileShape, type: str | None = None) -> "TraceRecorder":
        return cls(shape.trace_tokens, shape.num_layers, shape.top_k, shape.p_grid, shape.types)

    def begin_batch(self, input_ids: torch.Tensor, first_sequence: int) -> None:
        """Record token ids and positions of a batch [B, S] that starts at the current offset."""
        B, S = input_ids.shape
        self.sequences = max(self.sequences, first_sequence + B)
        n = max(0, min(self.max_tokens - self.offset, B * S))
        if n:
            sl = slice(self.offset, self.offset + n)
            self.token_id[sl] = input_ids.reshape(-1)[:n].cpu()
            self.position[sl] = torch.arange(B * S)[:n] % S
            self.sequence[sl] = first_sequence + torch.arange(B * S)[:n] // S
            self.recorded = max(self.recorded, self.offset + n)

    def end_batch(self, num_tokens: int) -> None:
        self.offset += num_tokens

    def add(self, obs: Observation) -> None:
        """Record the routing (type None) or the per-p sparsity (a traced type) of the rows within max_tokens."""
        if obs.type is not None and obs.type not in self.sparsity:
            return
        glob = obs.token_idx.cpu() + self.offset
        keep = glob < self.max_tokens
        rows, slot = glob[keep], obs.slot.cpu()[keep]
        if not rows.numel():
            return
        if obs.type is None:
            self.expert[rows, obs.layer, slot] = obs.expert_ids[keep]
            self.weight[rows, obs.layer, slot] = obs.weights[keep].float()
        else:
            s = obs.vector_summary().sparsity()
            self.sparsity[obs.type][rows, obs.layer, slot] = s[keep.to(s.device)].float().cpu()

    def state(self) -> dict[str, torch.Tensor]:
        """Return the exact state: the per-token arrays, sparsity_<t> per type, and the stream counters."""
        out = {"token_id": self.token_id, "sequence": self.sequence, "position": self.position,
               "expert": self.expert, "weight": self.weight}
        out.update({f"sparsity_{t}": a for t, a in self.sparsity.items()})
        out.update({k: torch.tensor(getattr(self, k)) for k in ("offset", "recorded", "sequences")})
        return out

    def merge(self, other: "TraceRecorder") -> "TraceRecorder":
        """Return the trace of this stream followed by `other`'s (see the class doc)."""
        if (self.max_tokens, self.expert.shape, list(self.sparsity)) != (
                other.max_tokens, other.expert.shape, list(other.sparsity)) or any(
                self.sparsity[t].shape != other.sparsity[t].shape for t in self.sparsity):
            raise ValueError("cannot merge traces of different sizes (max tokens, layers, slots, p-grid or types)")
        out = TraceRecorder(self.max_tokens, 0, 0, (), ())
        for k in _TRACE_ROWS:
            setattr(out, k, getattr(self, k).clone())
        out.sparsity = {t: a.clone() for t, a in self.sparsity.items()}
        n = min(other.recorded, self.max_tokens - self.offset) if self.recorded == self.offset else 0
        if n > 0:
            dst, src = slice(self.offset, self.offset + n), slice(0, n)
            for k in ("token_id", "position", "expert", "weight"):
                getattr(out, k)[dst] = getattr(other, k)[src]
            out.sequence[dst] = other.sequence[src] + self.sequences
            for t in out.sparsity:
                out.sparsity[t][dst] = other.sparsity[t][src]
        out.recorded = self.recorded + max(n, 0)
        out.offset = self.offset + other.offset
        out.sequences = self.sequences + other.sequences
        return out

    def to_hdf5(self, group) -> None:
        """Write the recorded rows (the stream counters as attributes) into an h5py-like group."""
        n = self.recorded
        group.attrs["doc"] = "per-token detail of the first tokens profiled (bounded by --trace-tokens)"
        group.attrs["max_tokens"] = self.max_tokens
        group.attrs["tokens_seen"] = self.offset
        group.attrs["sequences_seen"] = self.sequences
        *rows, sparsity = self.STATE
        for f in rows:
            put(group, f.name, getattr(self, f.name)[:n].numpy(), f.doc_for(), f.units)
        for t, arr in self.sparsity.items():
            put(group, sparsity.name.format(type=t), arr[:n].numpy(), sparsity.doc_for(t), sparsity.units)

    @classmethod
    def from_hdf5(cls, group) -> "TraceRecorder":
        """Return the trace a group holds (a group without the v2 counters: max_tokens = tokens seen = rows)."""
        rows = {k: torch.from_numpy(np.asarray(group[k][()])) for k in _TRACE_ROWS}
        n, L, K = rows["expert"].shape
        types = [t for t in ACTIVATION_TYPES if f"sparsity_{t}" in group]
        sparsity = {t: torch.from_numpy(np.asarray(group[f"sparsity_{t}"][()])) for t in types}
        P = next(iter(sparsity.values())).shape[-1] if sparsity else 0
        attrs = group.attrs
        out = cls(int(attrs.get("max_tokens", n)), L, K, range(P), types)
        for k, v in rows.items():
            getattr(out, k)[:n] = v
        for t, v in sparsity.items():
            out.sparsity[t][:n] = v
        out.recorded = n
        out.offset = int(attrs.get("tokens_seen", n))
        out.sequences = int(attrs.get("sequences_seen", int(rows["sequence"].max()) + 1 if n else 0))
        return out


# ----------------------------------------------------------------------------------------------------------
# What a profile accumulates


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


def member_keys(types: Sequence[str]) -> list[tuple[str, str | None]]:
    """Return the (registry key, type) of every accumulator a profile of these types collects."""
    return [(k, t) for k, cls in STATISTICS.items() if cls.collected for t in (types if cls.per_type else (None,))]


@dataclass
class ProfileStats:
    """Everything a profile accumulates: one instance of every collected registered accumulator.

    `members` maps (registry key, type) to the accumulator (type None for per-profile ones such as routing).
    `activations[t]` and `routing` are the long-standing views on them.
    """

    num_layers: int
    num_experts: int
    p_grid: tuple[float, ...]
    types: tuple[str, ...] = ACTIVATION_TYPES
    members: dict[tuple[str, str | None], Any] = field(default=None)

    def __post_init__(self):
        unknown = [t for t in self.types if t not in ACTIVATION_TYPES]
        if unknown:
            raise ValueError(f"unknown activation type(s) {unknown}; choose from {', '.join(ACTIVATION_TYPES)}")
        if self.members is None:
            shape = ProfileShape(self.num_layers, self.num_experts, tuple(self.p_grid), tuple(self.types))
            self.members = {(k, t): STATISTICS[k].empty(shape, t) for k, t in member_keys(self.types)}
        self.activations = {t: ActivationStats(self.members[("sparsity_curve", t)],
                                               self.members[("sparsity_hist", t)], self.members[("magnitude", t)])
                            for t in self.types}

    @property
    def routing(self) -> RoutingStats:
        return self.members[("routing", None)]

    def add(self, obs: Observation) -> None:
        """Feed one observation to every accumulator."""
        for m in self.members.values():
            m.add(obs)

    def merge(self, other: "ProfileStats") -> "ProfileStats":
        """Return the statistics of both profiles together (same model shape, p-grid and types)."""
        if tuple(self.p_grid) != tuple(other.p_grid) or tuple(self.types) != tuple(other.types):
            raise ValueError("cannot merge profiles with different p-grids or activation types")
        return ProfileStats(self.num_layers, self.num_experts, self.p_grid, self.types,
                            {k: m.merge(other.members[k]) for k, m in self.members.items()})

    @classmethod
    def from_store(cls, store) -> "ProfileStats":
        """Return the statistics a store holds (a `moeprof.store.Store`; see its doc for how v1 stores read)."""
        types = tuple(store.types)
        members = {(k, t): STATISTICS[k].from_hdf5(store.member_group(STATISTICS[k], t))
                   for k, t in member_keys(types)}
        return cls(store.num_layers, store.num_experts, tuple(float(p) for p in store.p_grid), types, members)

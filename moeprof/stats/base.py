"""The accumulator protocol: what every statistic is fed (`Observation`), its methods, the registry, and
`TableAccumulator`, the base that derives merge / storage from a declared state table — torch only.

Legend: L = layers, E = experts per layer, P = p-grid size, B = histogram bins, N = rows in one observation,
D = vector width, K = routed slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from moeprof.activation_types import ACTIVATION_TYPES, HIST_BINS
from moeprof.errors import InvalidArgument
from moeprof.schema import Field, put
from moeprof.stats.abs_bins import sorted_row_bin_counts
from moeprof.topp import ascending_abs_prefix, counts_from_prefix

SPARSITY_UNITS = "fraction of entries dropped"
_DTYPES = {"int64": torch.long, "float64": torch.float64, "float32": torch.float32}
# how the table merge combines a state field (moeprof.schema.REDUCTIONS; "concat" state merges itself: the trace)
_REDUCE = {"sum": torch.add, "max": torch.maximum}


class SortedRows:
    """|v| of some rows sorted ascending [N0, D] (the top-p sort's output), and their |entry| bin counts [N0, A],
    read off the sorted rows on first request and then kept (shared by every selection of the rows)."""

    def __init__(self, ascending: torch.Tensor):
        self.ascending = ascending
        self._bin_counts: torch.Tensor | None = None

    def bin_counts(self) -> torch.Tensor:
        if self._bin_counts is None:
            self._bin_counts = sorted_row_bin_counts(self.ascending)
        return self._bin_counts


@dataclass
class VectorSummary:
    """Per-vector facts needed by the accumulators: kept counts [N, P] and magnitude summaries [N].

    `sorted_rows` (with `rows`, which of its rows each vector is; None = row n) keeps the sort behind the counts,
    so that the |entry| histogram is read off it (`abs_bin_counts`) instead of binning every entry again.
    """

    counts: torch.Tensor  # [N, P] int64 kept entries at each p
    l1: torch.Tensor  # [N] float64
    l2: torch.Tensor  # [N] float64
    max_abs: torch.Tensor  # [N] float64
    width: int  # D
    sorted_rows: SortedRows | None = None
    rows: torch.Tensor | None = None  # [N] int64 row of sorted_rows of each vector (None: the identity)
    _sparsity: torch.Tensor | None = field(default=None, repr=False, compare=False)  # sparsity(), once computed

    @classmethod
    def of(cls, v: torch.Tensor, p_grid: Sequence[float]) -> "VectorSummary":
        """Summarize rows of v [N, D] (one sort per row for the whole p-curve), on v's device: the
        accumulators add on their own device, so a GPU run copies nothing to the host per call."""
        n = v.shape[0]
        if v.shape[-1] == 0:
            zeros = torch.zeros(n, dtype=torch.float64)
            return cls(torch.zeros(n, len(p_grid), dtype=torch.long), zeros, zeros, zeros, 0)
        # The sort behind the p-curve also yields the L1 norm (last prefix sum), max |v| (last sorted entry) and the
        # |entry| histogram (edge positions in the sorted rows).
        ascending, prefix = ascending_abs_prefix(v)  # [N, D] each
        grid = torch.tensor([float(p) for p in p_grid], dtype=torch.float64, device=prefix.device)
        return cls(
            counts=counts_from_prefix(prefix, grid.expand(n, grid.numel())),
            l1=prefix[:, -1].double(),
            l2=torch.linalg.vector_norm(v.float(), dim=-1).double(),
            max_abs=ascending[:, -1].double(),
            width=int(v.shape[-1]),
            sorted_rows=SortedRows(ascending),
        )

    def select(self, rows: torch.Tensor) -> "VectorSummary":
        """Return the summary of rows `rows` (e.g. repeat a token's input for each expert it was routed to)."""
        src = rows if self.rows is None else self.rows[rows]
        return VectorSummary(self.counts[rows], self.l1[rows], self.l2[rows], self.max_abs[rows], self.width,
                             self.sorted_rows, src if self.sorted_rows is not None else None)

    def abs_bin_counts(self) -> torch.Tensor | None:
        """Return each vector's entries per |entry| bin [N, A] int64 (`moeprof.stats.abs_bins`), read off the sorted
        rows; None when the summary was built without them."""
        if self.sorted_rows is None:
            return None
        counts = self.sorted_rows.bin_counts()
        return counts if self.rows is None else counts[self.rows]

    def sparsity(self) -> torch.Tensor:
        """Return per-vector top-p sparsity [N, P] (fraction of entries dropped)."""
        if self._sparsity is None:  # read by the curve and the histogram of the same observation
            self._sparsity = 1.0 - self.counts.double() / max(self.width, 1)
        return self._sparsity


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
        dev = top_k_index.device  # stays there: the accumulators add on their own device
        ids = top_k_index.reshape(-1).long()  # [T·K]
        w = (torch.ones(ids.shape, dtype=torch.float64, device=dev) if top_k_weights is None
             else top_k_weights.reshape(-1).detach().double())
        return cls(layer, None, ids, torch.arange(T, device=dev).repeat_interleave(K),
                   torch.arange(K, device=dev).repeat(T), weights=w, num_tokens=T)

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
    device: str = "cpu"  # where fixed-size state lives (the model's device: adds never copy to the host)


class TableAccumulator:
    """Base of the fixed-size accumulators: state = the tensors named in `STATE`, merged by each row's reduction.

    Subclasses declare STATE (merged, stored, read back) and DERIVED (stored for readers, recomputed from the
    state by `derived()`), and implement `add`. Sizes come from the dims: L, E, P, B. The state lives on
    `device` (`to(device)` moves it); `add` brings each observation there, `to_hdf5` copies to the host once.
    Distributed runs reduce the STATE fields across ranks by their declared reductions (`moeprof.distributed`).
    """

    key: ClassVar[str]
    group: ClassVar[str]
    per_type: ClassVar[bool] = True
    collected: ClassVar[bool] = True
    STATE: ClassVar[tuple[Field, ...]] = ()
    DERIVED: ClassVar[tuple[Field, ...]] = ()

    def __init__(self, num_layers: int, num_experts: int, num_p: int = 0, bins: int = HIST_BINS,
                 type: str | None = None, device: str | torch.device = "cpu", **state: torch.Tensor):
        self.num_layers, self.num_experts, self.num_p, self.bins = num_layers, num_experts, num_p, bins
        self.type = type
        self.device = torch.device(device)
        sizes = self._sizes()
        for f in self.STATE:
            value = state.pop(f.name, None)
            setattr(self, f.name, value.to(self.device) if value is not None else
                    torch.zeros([sizes[d] for d in f.dims], dtype=_DTYPES[f.dtype], device=self.device))
        if state:
            raise TypeError(f"{self.__class__.__name__} has no state field(s) {sorted(state)}")

    def _sizes(self) -> dict[str, int]:
        """Return the sizes of the dims the state uses (L, E, P, B)."""
        sizes = {"L": self.num_layers, "E": self.num_experts, "P": self.num_p, "B": self.bins}
        return {d: sizes[d] for f in self.STATE for d in f.dims}

    @classmethod
    def empty(cls, shape: ProfileShape, type: str | None = None):
        """Return an accumulator with zero state for a profile of `shape` (and activation `type`)."""
        return cls(shape.num_layers, shape.num_experts, len(shape.p_grid), shape.bins, type, shape.device)

    def to(self, device: str | torch.device):
        """Return this accumulator with its state on `device` (self when it is there already)."""
        if torch.device(device) == self.device:
            return self
        return type(self)(self.num_layers, self.num_experts, self.num_p, self.bins, self.type, device,
                          **self.state())

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
            raise InvalidArgument(f"cannot merge {type(self).__name__} statistics of different shapes or types "
                             "(layers, experts, p-grid, bins or activation type differ)")
        merged = {f.name: _REDUCE[f.reduce](getattr(self, f.name), getattr(other, f.name).to(self.device))
                  for f in self.STATE}
        return type(self)(self.num_layers, self.num_experts, self.num_p, self.bins, self.type, self.device, **merged)

    def derived(self) -> dict[str, torch.Tensor]:
        """Return the DERIVED datasets computed from the state (means, standard deviations)."""
        return {}

    def to_hdf5(self, group) -> None:
        """Write the state (exact) and the derived datasets into an h5py-like group, each with doc and units."""
        if self.type is not None:
            group.attrs["type"] = self.type
        for f in self.STATE:
            put(group, f.name, getattr(self, f.name).cpu().numpy(), f.doc_for(self.type), f.units)
        derived = self.derived()
        for f in self.DERIVED:
            put(group, f.name, derived[f.name].cpu().numpy(), f.doc_for(self.type), f.units)

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
        return cls(sizes["L"], sizes["E"], sizes["P"], sizes["B"], t, "cpu", **state)

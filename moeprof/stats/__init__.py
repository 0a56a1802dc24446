"""Streaming, mergeable statistics of activation sparsity per (layer, expert, type) — torch only.

Legend: L = layers, E = experts per layer (1 for a dense FFN), P = p-grid size, B = histogram bins,
N = vectors in one update (token-expert pairs for an MoE layer, tokens for a dense one), D = vector width,
K = routed slots per token.

Every statistic a profile collects is an *accumulator* (`Accumulator`): it is fed `Observation`s with `add`,
combines with `merge` (merge(a, b) == accumulate(a ∪ b)), and writes / reads its exact state with `to_hdf5` /
`from_hdf5`. The registered accumulators (`STATISTICS`) are what `ProfileStats` collects and what the store
writes and reads; a new statistic (e.g. effective rank) is one new module here holding one class decorated
with `@register`, imported below. Fixed-size accumulators declare
their state as a table of `moeprof.schema.Field` rows, each with its reduction (sum / max), so `merge`, `empty`,
`to_hdf5` and `from_hdf5` are derived from the table and a declared field can never be dropped by merge.
"""

from moeprof.activation_types import ACTIVATION_TYPES, HIST_BINS, TYPE_NAMES  # noqa: F401 (re-exported)
from moeprof.stats.base import (  # noqa: F401
    STATISTICS,
    Accumulator,
    Observation,
    ProfileShape,
    TableAccumulator,
    VectorSummary,
    register,
)

# Registration order is the order of a profile's members and of the store's groups.
from moeprof.stats.activation import ActivationStats, Magnitudes, SparsityCurve, SparsityHistogram  # noqa: F401,E402
from moeprof.stats.routing import RoutingStats  # noqa: F401,E402
from moeprof.stats.trace import TraceRecorder  # noqa: F401,E402
from moeprof.stats.rank import EffectiveRank, effective_rank  # noqa: F401,E402
from moeprof.stats.abs_hist import ABS_BINS, ABS_EDGES, AbsHistogram  # noqa: F401,E402
from moeprof.stats.profile_stats import ProfileStats, member_keys  # noqa: F401,E402

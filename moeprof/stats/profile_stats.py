"""`ProfileStats`: one instance of every collected registered accumulator — what a profile accumulates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from moeprof.activation_types import ACTIVATION_TYPES
from moeprof.errors import InvalidArgument
from moeprof.stats.activation import ActivationStats
from moeprof.stats.base import STATISTICS, Observation, ProfileShape
from moeprof.stats.routing import RoutingStats


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
            raise InvalidArgument(f"unknown activation type(s) {unknown}; choose from {', '.join(ACTIVATION_TYPES)}")
        if self.members is None:
            shape = ProfileShape(self.num_layers, self.num_experts, tuple(self.p_grid), tuple(self.types))
            self.members = {(k, t): STATISTICS[k].empty(shape, t) for k, t in member_keys(self.types)}
        self.activations = {t: ActivationStats(self.members[("sparsity_curve", t)],
                                               self.members[("sparsity_hist", t)], self.members[("magnitude", t)])
                            for t in self.types}

    @property
    def routing(self) -> RoutingStats:
        return self.members[("routing", None)]

    def to(self, device) -> "ProfileStats":
        """Return these statistics with every member that has a device (`to`) moved to `device`."""
        return ProfileStats(self.num_layers, self.num_experts, self.p_grid, self.types,
                            {k: m.to(device) if hasattr(m, "to") else m for k, m in self.members.items()})

    def add(self, obs: Observation) -> None:
        """Feed one observation to every accumulator."""
        for m in self.members.values():
            m.add(obs)

    def merge(self, other: "ProfileStats") -> "ProfileStats":
        """Return the statistics of both profiles together (same model shape, p-grid and types)."""
        if tuple(self.p_grid) != tuple(other.p_grid) or tuple(self.types) != tuple(other.types):
            raise InvalidArgument("cannot merge profiles with different p-grids or activation types")
        if set(self.members) != set(other.members):
            differ = sorted(f"{k}/{t}" if t else k for k, t in set(self.members) ^ set(other.members))
            raise InvalidArgument(f"cannot merge profiles that collected different statistics ({', '.join(differ)} "
                             "in one only, e.g. --rank on one run); profile both with the same options")
        return ProfileStats(self.num_layers, self.num_experts, self.p_grid, self.types,
                            {k: m.merge(other.members[k]) for k, m in self.members.items()})

    @classmethod
    def from_store(cls, store) -> "ProfileStats":
        """Return the statistics a store holds (a `moeprof.store.Store`; see its doc for how v1 stores read):
        every collected accumulator, and the optional per-type ones the run asked for (e.g. effective rank)."""
        types = tuple(store.types)
        keys = member_keys(types) + [(k, t) for k, cls in STATISTICS.items() if not cls.collected and cls.per_type
                                     for t in types if store.has_member(cls, t)]
        members = {(k, t): STATISTICS[k].from_hdf5(store.member_group(STATISTICS[k], t)) for k, t in keys}
        return cls(store.num_layers, store.num_experts, tuple(float(p) for p in store.p_grid), types, members)

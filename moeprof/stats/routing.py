"""The routing accumulator: which experts tokens went to, and with what weight."""

from __future__ import annotations

import torch

from moeprof.schema import Field
from moeprof.stats.base import Observation, TableAccumulator, register


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
        ids = obs.expert_ids.to(self.device)
        self.tokens[obs.layer].index_add_(0, ids, torch.ones_like(ids))
        self.weight_sum[obs.layer].index_add_(0, ids, obs.weights.to(self.device))
        self.layer_tokens[obs.layer] += obs.num_tokens

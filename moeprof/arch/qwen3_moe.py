"""Qwen3-MoE (transformers 5): `mlp = Qwen3MoeSparseMoeBlock(gate: TopKRouter, experts: fused Qwen3MoeExperts)`.

Experts hold `gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`; the router returns
top-k weights renormalized when `norm_topk_prob`. Layers listed in `mlp_only_layers` are dense MLPs.
"""

from dataclasses import dataclass

from moeprof.arch.base import ROUTED, Adapter, Site
from moeprof.arch.layout import experts_layout


@dataclass(frozen=True)
class Qwen3MoeAdapter(Adapter):
    def moe_site(self, idx, mlp, config, act):
        experts = mlp.experts
        return Site(idx, ROUTED, mlp, experts_layout(experts, act), top_k=config.num_experts_per_tok,
                    experts=experts, router=mlp.gate)


ADAPTER = Qwen3MoeAdapter(family="qwen3_moe", model_types=("qwen3_moe",))

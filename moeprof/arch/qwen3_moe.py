"""Qwen3-MoE (transformers 5): `mlp = Qwen3MoeSparseMoeBlock(gate: TopKRouter, experts: fused Qwen3MoeExperts)`.

Experts hold `gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`; the router returns
top-k weights renormalized when `norm_topk_prob`. Layers listed in `mlp_only_layers` are dense MLPs.
"""

from dataclasses import dataclass

from moeprof.arch.base import Adapter, Site


@dataclass(frozen=True)
class Qwen3MoeAdapter(Adapter):
    def moe_site(self, idx, mlp, config, act):
        experts = mlp.experts
        return Site(idx, "moe", mlp, experts.num_experts, config.num_experts_per_tok, config.hidden_size,
                    experts.down_proj.shape[-1], act, experts=experts, router=mlp.gate)


ADAPTER = Qwen3MoeAdapter(family="qwen3_moe", model_types=("qwen3_moe",))

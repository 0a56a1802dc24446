"""Tiny random models of every supported family (no downloads), shared by the test modules."""

import torch

from moeprof.arch import decoder_layers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _build(cls, config_cls, **extra):
    torch.manual_seed(0)
    model = cls(config_cls(**{**COMMON, **extra, **_overrides})).eval()
    # Random init leaves activations tiny and nearly uniform; scale weights so curves have some shape.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model


FAMILIES = {
    "llama": lambda: _build(LlamaForCausalLM, LlamaConfig),
    "mistral": lambda: _build(MistralForCausalLM, MistralConfig, sliding_window=None),
    "qwen2": lambda: _build(Qwen2ForCausalLM, Qwen2Config),
    "qwen3": lambda: _build(Qwen3ForCausalLM, Qwen3Config, head_dim=12),
    "gemma3_text": lambda: _build(Gemma3ForCausalLM, Gemma3TextConfig, head_dim=12,
                                  hidden_activation="gelu_pytorch_tanh", sliding_window=16),
    "qwen3_moe": lambda: _build(Qwen3MoeForCausalLM, Qwen3MoeConfig, head_dim=12, moe_intermediate_size=24,
                                num_experts=7, num_experts_per_tok=3, norm_topk_prob=True),
}


_overrides: dict = {}


def tiny(family: str, **overrides):
    """Return a tiny random model of `family` (config fields in `overrides` replace the defaults)."""
    _overrides.clear()
    _overrides.update(overrides)
    try:
        return FAMILIES[family]()
    finally:
        _overrides.clear()


def reference_activations(model, ids):
    """Logits and, per layer, (expert_ids [N], {type: [N, D]}) recomputed from weights and the FFN input."""
    layers = decoder_layers(model)
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, l=l: inputs.__setitem__(l, a[0].detach()))
             for l, layer in enumerate(layers)]
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    out = {}
    with torch.no_grad():
        for l, layer in enumerate(layers):
            mlp = layer.mlp
            x = inputs[l].reshape(-1, inputs[l].shape[-1])  # [T, H]
            if hasattr(mlp, "experts"):
                ex = mlp.experts
                probs = torch.softmax(x @ mlp.gate.weight.T, dim=-1)
                w, idx = torch.topk(probs, mlp.gate.top_k, dim=-1)  # [T, K]
                e = idx.reshape(-1)
                xs = x.repeat_interleave(idx.shape[1], dim=0)  # [S, H]
                I = ex.down_proj.shape[-1]
                gu = torch.bmm(ex.gate_up_proj[e], xs.unsqueeze(-1)).squeeze(-1)  # [S, 2I]
                gate, up = gu[:, :I], gu[:, I:]
                act = ex.act_fn
            else:
                e = torch.zeros(x.shape[0], dtype=torch.long)
                xs, gate, up, act = x, x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T, mlp.act_fn
            g = act(gate)
            out[l] = (e, {"x": xs, "u": up, "g": g, "i": g * up})
    return logits, out

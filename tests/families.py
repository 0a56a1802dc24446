"""Tiny random models of every supported family (no downloads), shared by the test modules."""

import torch
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

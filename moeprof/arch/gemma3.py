"""Gemma3 (text, and the text stack of the multimodal model): GLU with tanh-GELU (`hidden_activation`)."""

from moeprof.arch.base import Adapter

ADAPTER = Adapter(family="gemma3", model_types=("gemma3_text", "gemma3"), activation_key="hidden_activation")

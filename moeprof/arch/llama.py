"""Dense Llama-style GLU FFNs: Llama, Mistral (gate_proj, up_proj, down_proj, SiLU)."""

from moeprof.arch.base import Adapter

ADAPTER = Adapter(family="llama", model_types=("llama", "mistral"))

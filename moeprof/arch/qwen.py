"""Dense Qwen2 / Qwen2.5 / Qwen3: the Llama GLU layout with SiLU."""

from moeprof.arch.base import Adapter

ADAPTER = Adapter(family="qwen", model_types=("qwen2", "qwen3"))

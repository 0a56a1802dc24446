"""moeprof: per-expert activation-sparsity profiling for MoE and dense GLU LLMs."""

__version__ = "0.1.0"

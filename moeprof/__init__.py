"""moeprof: per-expert activation-sparsity profiling for MoE and dense GLU LLMs."""

__version__ = "0.1.0"

_LAZY = {"sparsify_": "moeprof.schedule", "Schedule": "moeprof.schedule", "sparsify": "moeprof.capture"}


def __getattr__(name):
    """`moeprof.sparsify_`, `moeprof.Schedule`, `moeprof.sparsify`: imported on first use (import moeprof stays light)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moeprof' has no attribute {name!r}")

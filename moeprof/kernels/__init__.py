"""Sparse MoE expert kernels: top-p inside each expert, fused with the grouped expert GEMMs.

`grouped_topp_glu` is the public entry point; the torch reference (`moeprof.kernels.reference`) is also the
CPU path, and the Triton kernel (`moeprof.kernels.triton_grouped`) is imported only when it is used.
"""

from __future__ import annotations

import torch

from .reference import (
    ACT_ALIASES,
    SPARSIFY_TYPES,
    clear_transposed_cache,
    release_kernel_copies,
    topp_threshold,
    torch_grouped_topp_glu,
    transposed_cache_bytes,
    transposed_expert_weight,
)

__all__ = [
    "grouped_topp_glu", "torch_grouped_topp_glu", "triton_grouped_topp_glu", "topp_threshold",
    "transposed_expert_weight", "clear_transposed_cache", "release_kernel_copies", "transposed_cache_bytes",
    "ACT_ALIASES",
    "SPARSIFY_TYPES",
]

BACKENDS = ("auto", "torch", "triton")


def triton_grouped_topp_glu(*args, **kwargs):
    """Return what `grouped_topp_glu(..., backend="triton")` returns (imports Triton on first use)."""
    from .triton_grouped import triton_grouped_topp_glu as impl

    return impl(*args, **kwargs)


def grouped_topp_glu(x, top_k_index, top_k_weights, gate_up_proj, down_proj, p, *, sparsify="i", act="silu",
                     backend="auto", return_stats=False):
    """Return y [T, H] of the routed GLU experts with top-p applied inside each expert (and stats on request).

    x [T, H]; top_k_index, top_k_weights [T, K]; gate_up_proj [E, 2I, H]; down_proj [E, H, I] (transformers 5
    fused layout); p: float or [E] per-expert top-p (p = 1 everywhere is the dense result); sparsify: "i"
    (intermediate σ(W_g x) ⊙ W_u x) or "x" (the expert's input); act: "silu" or "gelu_tanh".
    backend: "torch" (reference, the CPU fast path), "triton", or "auto" (Triton on CUDA, torch elsewhere).
    return_stats: also return the realized sparsity [T, K] (fp32): the fraction of the sparsified vector of
    each (token, slot) pair that was dropped.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    impl = triton_grouped_topp_glu if backend == "triton" else torch_grouped_topp_glu
    return impl(x, top_k_index, top_k_weights, gate_up_proj, down_proj, p, sparsify=sparsify, act=act,
                return_stats=return_stats)

"""What `moeprof generate`'s decode timing measures, and the speed-up sparsity could give at best.

Skipping entries of x drops columns of gate and up (2/3 of an expert's weights), of i columns of down (1/3);
u and g save nothing (g still needs W_g x). At batch 1 decode reads every weight once per token, so the ideal
speed-up at sparsity s is 1/(1 − 2s/3) for x, 1/(1 − s/3) for i, 1 for u and g (DESIGN §2, docs/kernels.md).
Worked example: i at s = 0.6 → 1/(1 − 0.2) = 1.25.
"""

from __future__ import annotations

SKIPPED_WEIGHT_SHARE = {"x": 2 / 3, "i": 1 / 3, "u": 0.0, "g": 0.0}


def speed_ceiling(type: str, sparsity: float) -> float:
    """Return the batch-1 decode speed-up reachable at `sparsity` of `type` if every skipped weight read were free:
    1 / (1 − share·s), share = the expert weights its zeros let the kernel skip."""
    return 1.0 / (1.0 - SKIPPED_WEIGHT_SHARE.get(type, 0.0) * float(sparsity))


def timing_note(type: str, sparsity: float, speedup: float, *, device: str = "cpu") -> str:
    """Return the lines that say what the decode timing measured and how to read its speed-up."""
    ceiling = speed_ceiling(type, sparsity)
    lines = [f"timing: wall-clock greedy decode, batch 1, prefill excluded (a 1-token generate is subtracted), one run "
             f"each, dense and sparsified, on this machine ({device}). The ceiling at sparsity {sparsity:.3f} of "
             f"{type} is {ceiling:.2f}x (1/(1 − {SKIPPED_WEIGHT_SHARE.get(type, 0.0):.2g}·s): only the weights its "
             "zeros let the kernel skip)."]
    if speedup < 1.0:
        lines.append(f"below 1 ({speedup:.2f}x): the sparsified path pays for the top-p threshold of every vector "
                     "(a sort per row) and a gather; on the CPU torch path at this size, where each expert's "
                     "weights are small and decode is not bound by reading them, that costs more than the "
                     "skipped reads save. The gain needs large experts (benchmarks/kernels/bench_decode_cpu.py, "
                     "docs/results.md) or the GPU kernel.")
    elif speedup > ceiling * 1.05:
        lines.append(f"above the ceiling ({speedup:.2f}x > {ceiling:.2f}x): timing noise or a faster gather than the "
                     "dense GEMV it is compared with, not sparsity alone (docs/kernels.md)")
    return "\n".join(lines)

"""GPU: the Triton grouped top-p GLU kernel vs a dense grouped GEMM, one Qwen3-30B-A3B-shaped MoE layer.

NOT RUN YET: no GPU was available when this was written (see docs/kernels.md). Needs CUDA and Triton.

Shape: H 2048, I 768, E 128, K 8, bf16. Regimes: decode (T = 1, 4, 16 tokens) and prefill (T = 512, 4096).
For each: the dense baseline (torch._grouped_mm over tokens grouped by expert when available, else the stock
transformers Qwen3MoeExperts forward), the Triton kernel at p = 1 (its dense cost), and the kernel at target
sparsity 0.5 / 0.8 of type i and x (p per expert chosen from a calibration pass so the top-p rule realizes
it). Times are CUDA-event medians.

Run: python benchmarks/kernels/bench_gpu.py [--tokens 1 4 16 512 4096] [--reps 50]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from moeprof.kernels import grouped_topp_glu, torch_grouped_topp_glu

H, I, E, K = 2048, 768, 128, 8


def cuda_ms(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def dense_grouped(x, idx, w, gate_up, down):
    """Dense routed experts: tokens grouped by expert, torch._grouped_mm when present, else a per-expert loop."""
    T = x.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    xs = x[order // K]  # [P, H]
    if hasattr(torch, "_grouped_mm"):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        gu = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)  # [P, 2I]
        gate, up = gu.chunk(2, dim=-1)
        out = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)  # [P, H]
    else:
        out = torch.empty(xs.shape[0], H, dtype=x.dtype, device=x.device)
        start = 0
        for e, m in enumerate(counts.tolist()):
            if m:
                gate, up = F.linear(xs[start:start + m], gate_up[e]).chunk(2, dim=-1)
                out[start:start + m] = F.linear(F.silu(gate) * up, down[e])
                start += m
    y = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    y.index_add_(0, order // K, out.float() * w.reshape(-1)[order, None].float())
    return y.to(x.dtype)


def p_for_sparsity(x, idx, w, gate_up, down, sparsify, s):
    """Per-expert p whose mean realized sparsity on this batch is about s (bisection on a shared p)."""
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        _, sp = torch_grouped_topp_glu(x, idx, w, gate_up, down, mid, sparsify=sparsify, return_stats=True)
        lo, hi = (mid, hi) if float(sp.mean()) > s else (lo, mid)
    return torch.full((E,), (lo + hi) / 2, device=x.device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 512, 4096])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device; use benchmarks/kernels/bench_decode_cpu.py on the CPU")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, H, generator=g, device=dev) / H ** 0.5).bfloat16()
    down = (torch.randn(E, H, I, generator=g, device=dev) / I ** 0.5).bfloat16()
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, bf16, H {H} I {I} E {E} K {K}")
    print("tokens  type  s      dense_ms  kernel_ms  dense/kernel  s_realized")
    for T in args.tokens:
        x = torch.randn(T, H, generator=g, device=dev).bfloat16()
        w, idx = torch.softmax(torch.randn(T, E, generator=g, device=dev), -1).topk(K, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).bfloat16()
        dense_ms = cuda_ms(lambda: dense_grouped(x, idx, w, gate_up, down), args.reps)
        for t in ("i", "x"):
            for s in [0.0] + list(args.sparsities):
                p = torch.ones(E, device=dev) if s == 0.0 else p_for_sparsity(x, idx, w, gate_up, down, t, s)
                _, sp = grouped_topp_glu(x, idx, w, gate_up, down, p, sparsify=t, backend="triton",
                                         return_stats=True)
                ms = cuda_ms(lambda: grouped_topp_glu(x, idx, w, gate_up, down, p, sparsify=t, backend="triton"),
                             args.reps)
                print(f"{T:6d}  {t:>4}  {s:4.2f}  {dense_ms:8.3f}  {ms:9.3f}  {dense_ms / ms:12.2f}  "
                      f"{float(sp.mean()):10.3f}")


if __name__ == "__main__":
    main()

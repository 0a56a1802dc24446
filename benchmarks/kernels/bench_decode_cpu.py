"""CPU batch-1 decode of one Qwen3-30B-A3B-shaped MoE expert layer: dense vs moeprof's top-p torch path.

Shape: H 2048, I 768, E 128, K 8 (transformers 5 fused layout), one token per step. For each dtype and target
sparsity s of type i (intermediate) and x (expert input), prints the median step time of
  dense   - a plain per-expert F.linear loop (the fastest dense path measured here; also timed: the stock
            transformers Qwen3MoeExperts forward with its default experts implementation),
  sparse  - moeprof.kernels.grouped_topp_glu(backend="torch"), which takes the gather path at batch 1,
  p1      - the same call at p = 1 (the sparse path's own dense cost: it gathers every row; for bf16 on this
            box a row-gather-sum over all rows is ~25% faster than the F.linear GEMV, so dense/sparse partly
            reflects that and p1/sparse is the pure sparsity gain),
and dense ÷ sparse (median of per-step ratios, dense and sparse steps alternating on the same routings so
both see the same machine load) next to the ideal: i saves only the down projection, 1/(1 − s/3); for x the issue quotes
1/(1 − s), but W_d still runs densely on σ(W_g x̃) ⊙ W_u x̃, so 1/(1 − 2s/3) is the reachable ceiling.

The per-expert p of each step is chosen so the top-p rule keeps exactly round((1 − s)·n) entries of that
step's vector (the realized sparsity is printed as a check). Each step uses a different routing from a pool
of --routings, so the weights stream from DRAM as in real decoding (the 300 MB L3 of the test box would
otherwise hold the 8 active experts).

Run: .venv/bin/python benchmarks/kernels/bench_decode_cpu.py [--threads 1] [--steps 40] [--dtypes bf16 fp32]
     [--clock cpu]   # time.process_time per step: on a shared machine, what other people's load does not stretch
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moeprof.kernels import clear_transposed_cache, grouped_topp_glu, transposed_expert_weight

H, I, E, K = 2048, 768, 128, 8
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def dense_experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """y [T, H]: the dense routed GLU experts by a per-expert F.linear loop (batch-1 friendly)."""
    y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            gate, up = F.linear(x[t:t + 1], gate_up_proj[e]).chunk(2, dim=-1)  # [1, I] each
            y[t] += top_k_weights[t, k].float() * F.linear(F.silu(gate) * up, down_proj[e])[0].float()
    return y.to(x.dtype)


def p_for_sparsity(v: torch.Tensor, s: float) -> torch.Tensor:
    """p per row of v [R, n] whose top-p set keeps exactly round((1 − s)·n) entries (midpoint of the step)."""
    k = max(1, round((1 - s) * v.shape[-1]))
    c = v.abs().float().sort(-1, descending=True).values.double().cumsum(-1)  # [R, n]
    lo = c[:, k - 2] if k >= 2 else torch.zeros_like(c[:, 0])
    return ((lo + c[:, k - 1]) / 2 / c[:, -1]).float()


def intermediate(x, e, gate_up_proj):
    gate, up = F.linear(x, gate_up_proj[e]).float().chunk(2, dim=-1)
    return F.silu(gate) * up  # [1, I]


CLOCK = [time.perf_counter]  # --clock cpu: time.process_time


def median_ms(fn, steps):
    times = []
    for step in range(steps):
        t0 = CLOCK[0]()
        fn(step)
        times.append(CLOCK[0]() - t0)
    return statistics.median(times) * 1e3


def interleaved_ms(fns, steps):
    """Per fn: (median ms, median per-step ratio of fns[0]'s time to its time); fns take turns every step
    (rotating order), so all see the same machine load."""
    times = [[] for _ in fns]
    for step in range(steps):
        for j in range(len(fns)):
            i = (j + step) % len(fns)
            t0 = CLOCK[0]()
            fns[i](step)
            times[i].append(CLOCK[0]() - t0)
    return [(statistics.median(ts) * 1e3, statistics.median(a / b for a, b in zip(times[0], ts))) for ts in times]


def run(dtype_name: str, steps: int, n_routings: int, sparsities, types, seed: int = 0):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)  # [E, 2I, H]
    down = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)  # [E, H, I]
    xs = torch.randn(n_routings, 1, H, generator=g).to(dtype)  # one token per step
    routings = []
    for r in range(n_routings):
        w, idx = torch.softmax(torch.randn(1, E, generator=g), -1).topk(K, dim=-1)
        routings.append((idx, (w / w.sum(-1, keepdim=True)).to(dtype)))  # norm_topk_prob, as in 30B-A3B

    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    stock = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                           num_experts_per_tok=K, num_hidden_layers=1))
    stock.gate_up_proj.data = gate_up
    stock.down_proj.data = down
    for t in types:  # build the transposed copies outside the timed region (cost: see docs/kernels.md)
        transposed_expert_weight(down if t == "i" else gate_up)

    def step_args(step):
        r = step % n_routings
        return xs[r], routings[r][0], routings[r][1]

    with torch.no_grad():
        for step in range(4):  # warm-up
            dense_experts(*step_args(step), gate_up, down)
        dense_ms = median_ms(lambda s: dense_experts(*step_args(s), gate_up, down), steps)
        stock_ms = median_ms(lambda s: stock(*step_args(s)), steps)
        rows = []
        for t in types:
            for s in sparsities:
                p_steps = []
                for r in range(n_routings):
                    x, idx, _ = step_args(r)
                    p = torch.ones(E)
                    if t == "i":
                        for e in idx[0].tolist():
                            p[e] = p_for_sparsity(intermediate(x, e, gate_up), s)[0]
                    else:
                        p[idx[0]] = p_for_sparsity(x, s)[0]
                    p_steps.append(p)
                realized = [grouped_topp_glu(*step_args(r), gate_up, down, p_steps[r], sparsify=t,
                                             backend="torch", return_stats=True)[1].mean().item()
                            for r in range(n_routings)]
                (dms, _), (p1_ms, _), (ms, speedup) = interleaved_ms([
                    lambda st: dense_experts(*step_args(st), gate_up, down),
                    lambda st: grouped_topp_glu(*step_args(st), gate_up, down, 1.0, sparsify=t, backend="torch"),
                    lambda st: grouped_topp_glu(*step_args(st), gate_up, down, p_steps[st % n_routings],
                                                sparsify=t, backend="torch"),
                ], steps)
                ideal = 1 / (1 - s / 3) if t == "i" else 1 / (1 - s)
                reach = 1 / (1 - s / 3) if t == "i" else 1 / (1 - 2 * s / 3)
                rows.append((t, s, statistics.mean(realized), dms, p1_ms, ms, speedup, ideal, speedup / ideal,
                             reach, speedup / reach))
    clear_transposed_cache()
    print(f"\n{dtype_name}: dense loop {dense_ms:.2f} ms/step, stock Qwen3MoeExperts {stock_ms:.2f} ms/step "
          f"({torch.get_num_threads()} thread(s), median of {steps} steps, {n_routings} routings)")
    print("type  s_target  s_realized  dense_ms  p1_ms  sparse_ms  dense/sparse  ideal(issue)  frac  ceiling  frac")
    for t, s, sr, dms, p1, ms, sp, ideal, frac, reach, frac2 in rows:
        print(f"{t:>4}  {s:8.2f}  {sr:10.3f}  {dms:8.2f}  {p1:5.2f}  {ms:9.2f}  {sp:12.2f}  {ideal:12.2f}  "
              f"{frac:4.0%}  {reach:7.2f}  {frac2:4.0%}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8])
    ap.add_argument("--types", nargs="+", default=["i", "x"], choices=["i", "x"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--routings", type=int, default=16, help="distinct routings cycled through (DRAM-bound)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process time (shared machines)")
    args = ap.parse_args()
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU threads {args.threads}, clock {args.clock}")
    for name in args.dtypes:
        run(name, args.steps, args.routings, args.sparsities, args.types)


if __name__ == "__main__":
    main()

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

--block: the whole MoE block as a user runs it (the figure to quote; docs/performance.md). One Qwen3-MoE layer of
the 30B-A3B shape (`build_random`, bf16), one token per step: the stock transformers block forward (router +
default `grouped_mm` experts) vs the same block inside `moeprof.sparsify(model, type, p)` (router + the grouped
top-p kernel) and vs that path at p = 1; the router alone. A uniform p is bisected on the kernel's realized
sparsity to hit --sparsities (default x 0.56, i 0.66). Variants take turns in rounds (rotating order); printed:
the speed-up, the issue's ideal 1/(1 − f s) (f = 2/3 for x, 1/3 for i: the experts' FLOPs only), the Amdahl ideal
with the measured router, the p = 1 path against stock (its kernels' own gain, not sparsity's) and the sparse
block against its own p = 1 with that ideal, then each variant's steps replayed one by one.

    PYTHONPATH=. python benchmarks/kernels/bench_decode_cpu.py --block --clock cpu --rounds 12 --steps 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time

import numpy as np

import torch
import torch.nn.functional as F

from moeprof.kernels import clear_transposed_cache, grouped_topp_glu, transposed_expert_weight

H, I, E, K = 2048, 768, 128, 8
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_SPARSITIES = [0.5, 0.8]


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



# ----- --block: the whole MoE block (router + experts), sparse vs the stock transformers forward ----------------

FLOP_SHARE = {"x": 2 / 3, "i": 1 / 3}  # the experts' FLOPs that top-p of this type removes, per unit of sparsity
BLOCK_TARGETS = {"x": 0.56, "i": 0.66}


def build_block(seed: int = 0):
    """Return (model, its one MoE block): Qwen3-30B-A3B's layer shapes, 1 layer, random bf16 weights."""
    from moeprof.models import build_random, config_from_recipe
    from moeprof.recipes import read_toml

    model = build_random(config_from_recipe(read_toml("recipes/qwen3-30b-a3b.toml")), layers=1, vocab_size=256,
                         dtype="bfloat16", seed=seed)
    return model, model.model.layers[0].mlp


def calibrate_p(mlp, hs, type: str, target: float) -> float:
    """Return the uniform p whose realized sparsity over the pool `hs` is `target` (bisection on the kernel's own
    realized sparsity: the same GEMVs, roundings and routing as the timed runs)."""
    xs = torch.cat([h.view(-1, H) for h in hs])  # [N, H]
    with torch.no_grad():
        _, w, idx = mlp.gate(xs)
    ex = mlp.experts

    def sparsity(p):
        return grouped_topp_glu(xs, idx, w, ex.gate_up_proj, ex.down_proj, p, sparsify=type, backend="torch",
                                return_stats=True)[1].mean().item()

    lo, hi = 0.0, 1.0  # sparsity falls as p rises
    for _ in range(18):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sparsity(mid) > target else (lo, mid)
    return (lo + hi) / 2


class _Steps:
    """A step timer: `mark(name)` closes the step that began at the previous mark (or at creation)."""

    def __init__(self, clock):
        self.clock, self.t, self.names = clock, [clock()], []

    def mark(self, name: str) -> None:
        self.t.append(self.clock())
        self.names.append(name)

    def seconds(self) -> dict[str, float]:
        return {n: b - a for n, a, b in zip(self.names, self.t, self.t[1:])}


def block_breakdown(mlp, h, type: str, p: float, clock) -> dict[str, float]:
    """Seconds of each step of one sparse block forward, replayed step by step with `moeprof.kernels.reference`'s
    own CPU-gather helpers (the order and calls of `_cpu_gather`, one token): what the block time is made of."""
    from moeprof.kernels.reference import _np_topp_threshold, glu_act

    ex = mlp.experts
    gu_w, dn_w = ex.gate_up_proj, ex.down_proj
    steps = _Steps(clock)
    mark = steps.mark
    with torch.no_grad():
        x = h.view(-1, H)
        _, w, idx = mlp.gate(x)
        mark("router (linear, softmax, top-8)")
        pe = idx.reshape(-1).numpy()
        tok = np.zeros(K, dtype=np.int64)
        pp = np.full(K, p, dtype=np.float32)
        if type == "x":
            xf = x.float().numpy()
            mag = np.abs(xf)
            tau = _np_topp_threshold(mag, pp, tok)
            mark("top-p thresholds (numpy sort of |x|, H = 2048)")
            keep = mag >= tau[:, None]
            f = np.flatnonzero(keep)
            r = f // H
            j = f - r * H
            kept = keep.sum(-1)
            rows = torch.from_numpy(pe[r] * H + j)
            offsets = torch.from_numpy(np.cumsum(kept) - kept)
            weights = torch.from_numpy(xf.ravel()[tok[r] * H + j]).to(dn_w.dtype)
            table = transposed_expert_weight(gu_w).view(E * H, 2 * I)
            mark("kept-entry lists (mask, nonzero, bag offsets, weights)")
            gu = F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights).float()
            mark("gate/up: row gather-sum of the kept input columns (embedding_bag)")
            hh = glu_act(gu[:, :I], "silu").mul_(gu[:, I:]).to(dn_w.dtype)
            mark("SiLU(gate) * up")
            out = torch.empty(K, H, dtype=dn_w.dtype)
            for k, e in enumerate(pe.tolist()):
                torch.matmul(hh[k:k + 1], dn_w[e].T, out=out[k:k + 1])
            mark("down: 8 dense GEMVs (bf16)")
            torch.bmm(w.float().view(1, 1, K), out.float().view(1, K, H))
            mark("combine (routing weights, sum over the 8)")
        else:
            xw = x.to(gu_w.dtype)
            gu = torch.empty(K, 2 * I, dtype=gu_w.dtype)
            for k, e in enumerate(pe.tolist()):
                torch.matmul(xw, gu_w[e].T, out=gu[k:k + 1])
            mark("gate/up: 8 dense GEMVs (bf16)")
            gu = gu.float()
            hh = glu_act(gu[:, :I], "silu").mul_(gu[:, I:]).numpy()
            mark("SiLU(gate) * up")
            mag = np.abs(hh)
            tau = _np_topp_threshold(mag, pp, None)
            mark("top-p thresholds (numpy sort of |i|, 8 x 768)")
            keep = mag >= tau[:, None]
            f = np.flatnonzero(keep)
            r = f // I
            j = f - r * I
            rows = torch.from_numpy(pe[r] * I + j)
            weights = torch.from_numpy(hh.ravel()[f] * w.float().numpy().reshape(-1)[r]).to(dn_w.dtype)
            table = transposed_expert_weight(dn_w).view(E * I, H)
            kept = keep.sum(-1)
            offsets = torch.from_numpy(np.cumsum(kept) - kept)
            mark("kept-entry lists (mask, nonzero, bag offsets, weights)")
            out = F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights)
            mark("down: row gather-sum of the kept rows of W_d^T, weighted (embedding_bag)")
            out.float().sum(0)
            mark("combine (sum over the 8)")
    return steps.seconds()


def stock_breakdown(mlp, h, clock) -> dict[str, float]:
    """Seconds of the stock block's steps (transformers' grouped_mm experts, replayed): router, the two grouped GEMMs."""
    ex = mlp.experts
    steps = _Steps(clock)
    mark = steps.mark
    with torch.no_grad():
        x = h.view(-1, H)
        _, w, idx = mlp.gate(x)
        mark("router (linear, softmax, top-8)")
        ids, perm = torch.sort(idx.reshape(-1))
        xs = x[perm // K]
        offs = torch.cumsum(torch.histc(ids.float(), bins=E, min=0, max=E - 1), 0, dtype=torch.int32)
        mark("sort pairs by expert, offsets")
        gu = F.grouped_mm(xs, ex.gate_up_proj.transpose(-2, -1), offs=offs)
        mark("gate/up: grouped_mm (bf16)")
        hh = F.silu(gu[:, :I]) * gu[:, I:]
        mark("SiLU(gate) * up")
        out = F.grouped_mm(hh, ex.down_proj.transpose(-2, -1), offs=offs)
        mark("down: grouped_mm (bf16)")
        (out * w.reshape(-1)[perm, None]).sum(0)
        mark("combine (routing weights, sum over the 8)")
    return steps.seconds()


def run_block(types, targets, rounds: int, steps: int, pool: int, seed: int = 0, breakdown: bool = True):
    """The whole-block comparison; prints the table and the breakdowns, returns the rows (for --json)."""
    from moeprof.capture import sparsify

    model, mlp = build_block(seed)
    g = torch.Generator().manual_seed(seed + 1)
    hs = [torch.randn(1, 1, H, generator=g).to(torch.bfloat16) for _ in range(pool)]  # one token per step
    clock = CLOCK[0]
    results = []
    for type, target in zip(types, targets):
        p = calibrate_p(mlp, hs, type, target)
        transposed_expert_weight(mlp.experts.gate_up_proj if type == "x" else mlp.experts.down_proj)
        variants = {  # name → the context it runs in (None: stock)
            "stock": lambda: contextlib.nullcontext(),
            "sparse": lambda: sparsify(model, type=type, p=p),
            "sparse_p1": lambda: sparsify(model, type=type, p=1.0),
            "router": lambda: contextlib.nullcontext(),
        }
        times = {name: [] for name in variants}
        ratios = {"stock/sparse": [], "stock/sparse_p1": [], "sparse_p1/sparse": []}
        realized = []
        with torch.no_grad():
            for rnd in range(rounds):
                med = {}
                names = list(variants)
                names = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate who goes first
                for name in names:
                    with variants[name]() as real:
                        fn = (lambda x: mlp.gate(x.view(-1, H))) if name == "router" else mlp
                        fn(hs[rnd % pool])  # untimed: the context's first call builds its p table
                        ts = []
                        for st in range(steps):
                            x = hs[(rnd * steps + st) % pool]
                            t0 = clock()
                            fn(x)
                            ts.append(clock() - t0)
                    if name == "sparse":
                        realized.append(real.flop_weighted)
                    times[name] += ts
                    med[name] = statistics.median(ts)
                ratios["stock/sparse"].append(med["stock"] / med["sparse"])
                ratios["stock/sparse_p1"].append(med["stock"] / med["sparse_p1"])
                ratios["sparse_p1/sparse"].append(med["sparse_p1"] / med["sparse"])
            parts = {"stock": [], "sparse": [], "sparse_p1": []}
            for rnd in range(max(rounds, 8) if breakdown else 0):
                x = hs[rnd % pool]
                parts["stock"].append(stock_breakdown(mlp, x, clock))
                parts["sparse"].append(block_breakdown(mlp, x, type, p, clock))
                parts["sparse_p1"].append(block_breakdown(mlp, x, type, 1.0, clock))
        ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        s = statistics.mean(realized)
        f = FLOP_SHARE[type]
        speedup = statistics.median(ratios["stock/sparse"])
        ideal_experts = 1 / (1 - f * s)  # the issue's: the experts' FLOPs only, everything else free
        t_r = ms["router"]
        ideal_block = ms["stock"] / (t_r + (ms["stock"] - t_r) * (1 - f * s))  # Amdahl: the router cannot shrink
        steps_ms = {v: {k: statistics.median(d[k] for d in parts[v]) * 1e3 for k in parts[v][0]} if parts[v] else {}
                    for v in parts}
        proj = next((k for k in steps_ms["sparse_p1"] if "embedding_bag" in k), None)
        own = statistics.median(ratios["sparse_p1/sparse"])
        ideal_own = ms["sparse_p1"] / (ms["sparse_p1"] - s * steps_ms["sparse_p1"][proj]) if proj else math.nan
        results.append(dict(type=type, p=p, s_target=target, s_realized=s, ms=ms, speedup=speedup,
                            ideal_experts=ideal_experts, frac_experts=speedup / ideal_experts,
                            ideal_block=ideal_block, frac_block=speedup / ideal_block,
                            p1_vs_stock=statistics.median(ratios["stock/sparse_p1"]),
                            own_speedup=own, ideal_own=ideal_own, frac_own=own / ideal_own, breakdown=steps_ms))
    print_block(results, rounds, steps, pool)
    return results


def print_block(results, rounds, steps, pool):
    print(f"\nwhole MoE block, batch-1 decode: {rounds} rounds x {steps} steps per variant (interleaved, rotating "
          f"order), {pool} inputs cycled; load average {os.getloadavg()[0]:.1f}")
    print("type  p       s      stock_ms  sparse_ms  router_ms  speed-up  ideal(experts)  frac  "
          "ideal(block)  frac  | p=1 vs stock  sparse vs p=1  its ideal  frac")
    for r in results:
        ms = r["ms"]
        print(f"{r['type']:>4}  {r['p']:.4f}  {r['s_realized']:.3f}  {ms['stock']:8.2f}  {ms['sparse']:9.2f}  "
              f"{ms['router']:9.3f}  {r['speedup']:8.3f}  {r['ideal_experts']:14.3f}  {r['frac_experts']:4.0%}  "
              f"{r['ideal_block']:12.3f}  {r['frac_block']:4.0%}  | {r['p1_vs_stock']:12.3f}  "
              f"{r['own_speedup']:13.3f}  {r['ideal_own']:9.3f}  {r['frac_own']:4.0%}")
    print("ideal(experts) = 1/(1 - f s), f = 2/3 (x) or 1/3 (i): the issue's ideal, over the experts' FLOPs only;\n"
          "ideal(block) = T_stock / (T_router + (T_stock - T_router)(1 - f s)): the router (measured) cannot shrink;\n"
          "p=1 vs stock > 1 means the sparse path's kernels beat the stock GEMVs before any entry is dropped (the row\n"
          "gather streams bf16 rows faster than the GEMV), so 'sparse vs p=1' against T_p1 / (T_p1 - s T_gather,p1)\n"
          "is the gain of sparsity alone.")
    for r in results:
        for variant in ("stock", "sparse", "sparse_p1"):
            parts = r["breakdown"][variant]
            if not parts:
                continue
            total = r["ms"][variant]
            label = {"stock": "stock block", "sparse": f"sparse block (s {r['s_realized']:.3f})",
                     "sparse_p1": "sparse block at p = 1"}[variant]
            print(f"\n{r['type']}: {label}, {total:.2f} ms (median per step); steps replayed one by one:")
            for name, v in parts.items():
                print(f"  {v:7.3f} ms  {v / total:6.1%}  {name}")
            rest = total - sum(parts.values())
            print(f"  {rest:7.3f} ms  {rest / total:6.1%}  the rest: dispatch through transformers and moeprof "
                  f"(argument checks, bookkeeping of realized sparsity), unpacking")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    ap.add_argument("--sparsities", nargs="+", type=float, default=DEFAULT_SPARSITIES)
    ap.add_argument("--types", nargs="+", default=["x", "i"], choices=["i", "x"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--routings", type=int, default=16, help="distinct routings cycled through (DRAM-bound)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process time (shared machines)")
    ap.add_argument("--block", action="store_true",
                    help="the whole MoE block (router + experts): moeprof's sparse block vs the stock transformers "
                         "forward; --sparsities default to x 0.56, i 0.66; bf16")
    ap.add_argument("--rounds", type=int, default=12, help="--block: interleaved rounds")
    ap.add_argument("--json", help="--block: also write the rows to this JSON file")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="--block: skip the step-by-step replay (it uses helpers of the current kernel code)")
    args = ap.parse_args()
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU threads {args.threads}, clock {args.clock}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.block:
        sparsities = args.sparsities if args.sparsities != DEFAULT_SPARSITIES else [BLOCK_TARGETS[t] for t in args.types]
        if len(sparsities) != len(args.types):
            ap.error("--block takes one sparsity per type (--types x i --sparsities 0.56 0.66)")
        rows = run_block(args.types, sparsities, args.rounds, args.steps, args.routings,
                         breakdown=not args.no_breakdown)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    for name in args.dtypes:
        run(name, args.steps, args.routings, args.sparsities, args.types)


if __name__ == "__main__":
    main()

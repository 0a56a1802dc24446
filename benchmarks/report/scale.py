"""Scale of `moeprof report`: page size and time to interactive of a Qwen3-30B-A3B-shaped study.

A synthetic store of 48 layers × 128 experts (top-8 routing with skewed loads, some dead experts), 4 activation
types and 16 p values is written through the store's own writer (`ProfileStats` → `write_profile`), with a
critical record and a schedule. The report page is written, then opened from disk in headless Chromium with the
network off (`moeprof.report.browser`), three times; printed per load: the wall time until the page says it is
ready (every section drawn), when plotly.js finished initializing, and the main thread's busy time; then the
time to redraw the heatmap and leaderboard after a change of p.

    PYTHONPATH=$PWD python benchmarks/report/scale.py [--layers 48 --experts 128 --loads 3 --out outputs/bench-report]

Needs Debian's `chromium` (or MOEPROF_CHROMIUM) and the `plotly` package.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from moeprof.report.browser import Browser
from moeprof.report.html import write_report
from moeprof.schedule import Schedule
from moeprof.stats import ProfileStats, VectorSummary
from moeprof.store import Critical, ProfileMeta, write_critical, write_profile, write_schedule

P_GRID = tuple(float(p) for p in np.round(np.linspace(0.5, 0.995, 16), 4))


def synthetic_store(path, *, layers: int, experts: int, types=("x", "u", "g", "i"), p_grid=P_GRID,
                    tokens: int = 256, top_k: int = 8, width: int = 32, seed: int = 0) -> Path:
    """Write a store of random activations: expert e of layer l sees |N(0, 1)|^a_{l,e} vectors (a per-expert
    exponent, so sparsity differs by expert), routed top-k from skewed router scores (the last expert of every
    fourth layer is never chosen: dead)."""
    g = torch.Generator().manual_seed(seed)
    stats = ProfileStats(layers, experts, p_grid, tuple(types))
    for l in range(layers):
        scores = torch.randn(tokens, experts, generator=g) + torch.linspace(1.5, 0.0, experts)  # [T, E] skewed
        if l % 4 == 0:
            scores[:, -1] = -1e9
        ids = scores.topk(top_k, dim=-1).indices.reshape(-1)  # [T * K]
        stats.routing.add(l, ids.view(tokens, top_k), None)
        alpha = 1.0 + 2.0 * torch.rand(experts, generator=g)  # [E]
        for k, t in enumerate(types):
            base = torch.randn(ids.numel(), width, generator=g).abs()  # [T * K, D]
            v = base ** (alpha[ids][:, None] * (1.0 + 0.25 * k))
            stats.activations[t].add(l, ids, VectorSummary.of(v, p_grid))
    meta = ProfileMeta(model="synthetic/qwen3-30b-a3b-shape", model_type="qwen3_moe", architecture="Synthetic",
                       is_moe=True, top_k=top_k, hidden_size=width, model_config={"hidden_size": width},
                       data_sources=["synthetic:random"], tokens=tokens, seq_len=tokens, batch_size=1,
                       dtype="float32", device="cpu")
    return write_profile(path, stats, meta, intermediate_sizes=[width] * layers, site_kinds=["moe"] * layers)


def add_critical_and_schedule(path, *, layers: int, experts: int, type: str = "i", seed: int = 0) -> None:
    """Store a made-up critical search of `type` and a schedule (for the sections that show them)."""
    rng = np.random.default_rng(seed)
    ps = np.array([0.9, 0.7, 0.8, 0.85, 0.875, 0.8625])
    sparsity = 1.0 - ps ** 1.5
    ratio = 1.0 - 0.08 * sparsity ** 2
    passed = ratio >= 0.99
    best = int(np.argmax(np.where(passed, sparsity, -1)))
    attrs = dict(type=type, rule="topp", task="ppl:synthetic", target=0.99, critical_p=float(ps[best]),
                 critical_sparsity_token=float(sparsity[best]), critical_sparsity_flop=float(sparsity[best] * 0.97),
                 dense_score=0.05, critical_score=float(0.05 * ratio[best]), critical_ratio=float(ratio[best]),
                 ratio_ci_low=float(ratio[best] - 0.002), ratio_ci_high=float(ratio[best] + 0.002), ci_level=0.95,
                 num_evaluations=len(ps) + 1)
    arrays = {"per_expert_sparsity": rng.uniform(0.2, 0.6, (layers, experts)),
              "tolerance_sparsity": rng.uniform(0.1, 0.8, (layers, experts)),
              "points/p": ps, "points/score": 0.05 * ratio, "points/ratio": ratio, "points/sparsity_token": sparsity,
              "points/sparsity_flop": sparsity * 0.97, "points/passed": passed}
    write_critical(path, Critical.from_items(attrs, arrays))
    table = np.round(rng.uniform(0.7, 0.95, (layers, experts)), 3)
    table[rng.random((layers, experts)) < 0.05] = np.nan
    schedule = Schedule(table, type, "topp", "synthetic/qwen3-30b-a3b-shape",
                        provenance={"method": "synthetic", "target": 0.99, "heldout_ratio": 0.9912,
                                    "heldout_ratio_ci": [0.9890, 0.9934], "sparsity_flop": 0.41,
                                    "anchor_p": 0.85, "anchor_sparsity_flop": 0.38, "chosen": "multiplier"})
    write_schedule(path, "synthetic", schedule)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--loads", type=int, default=3)
    ap.add_argument("--out", default="outputs/bench-report")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / f"synthetic-{args.layers}x{args.experts}.h5"
    t0 = time.perf_counter()
    synthetic_store(store, layers=args.layers, experts=args.experts)
    add_critical_and_schedule(store, layers=args.layers, experts=args.experts)
    t1 = time.perf_counter()
    page = write_report([store], out / "report.html")
    t2 = time.perf_counter()
    print(f"store {args.layers} x {args.experts}, 4 types, {len(P_GRID)} p values: written in {t1 - t0:.1f} s")
    print(f"report: {page.stat().st_size / 1e6:.2f} MB, written in {t2 - t1:.1f} s ({page})")
    with Browser() as b:
        for k in range(args.loads):
            pg = b.open(page, timeout_s=120)
            ready_ms = pg.evaluate("window.moeprof.readyMs")
            plotly_ms = pg.evaluate("performance.getEntriesByName('moeprof-plotly-end')[0].startTime")
            busy = pg.metrics()
            switch_ms = pg.evaluate("""(async () => { const t = performance.now(); window.moeprof.select('p', 0.5);
                await new Promise(r => requestAnimationFrame(() => setTimeout(r, 0))); return performance.now() - t; })()""")
            cells = pg.evaluate("document.getElementById('heatmap').dataset.cells")
            print(f"load {k + 1}: ready {ready_ms / 1000:.2f} s after navigation (plotly.js initialized at "
                  f"{plotly_ms / 1000:.2f} s), main thread busy {busy['TaskDuration']:.2f} s (script "
                  f"{busy['ScriptDuration']:.2f} s); p switch redraw {switch_ms:.0f} ms; heatmap cells {cells}; "
                  f"errors {pg.errors or 'none'}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work slows every figure)")


if __name__ == "__main__":
    main()

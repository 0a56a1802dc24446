"""Scale of `moeprof report`: page size and load time of a Qwen3-30B-A3B-shaped study in headless Chromium.

A synthetic store of 48 layers × 128 experts (top-8 routing with skewed loads, some dead experts), 4 activation
types and 16 p values is written through the store's own writer (`ProfileStats` → `write_profile`), with a
critical record and a schedule. The report page is written, then opened from disk with the network off
(`moeprof.report.browser`) --loads times in one browser (the first load also pays for the browser's start-up).
Printed per load, and as medians at the end:

- ready: wall time from navigation until every section is drawn (the page's `body[data-ready]`);
- cpu: CPU time of the renderer's main thread over the same span (from /proc). Other jobs on a shared machine
  lengthen the wall time, this far less (a little where they share a physical core); on a quiet machine
  ready ≈ cpu + a little (waits between tasks, work on other threads);
- first screen: when the summary, leaderboard and heatmap are drawn and the selectors answer (each later section
  is drawn in a task of its own after it);
- plotly: when plotly.js had been parsed and run; steps: wall ms of each step of the first drawing;
- p change: wall / CPU ms to redraw the heatmap and the leaderboard after choosing another p (3 values).

    PYTHONPATH=$PWD python benchmarks/report/scale.py [--layers 48 --experts 128 --loads 5 --reuse-store]

Needs Debian's `chromium` (or MOEPROF_CHROMIUM) and Linux's /proc.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from moeprof.report.browser import Browser
from moeprof.report.html import PLOTLY_ASSET, data_json, embedded_data, plotly_js, write_report
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


SWITCH_JS = """(async () => { const t = performance.now(); window.moeprof.select('p', %s);
    await new Promise(r => requestAnimationFrame(() => setTimeout(r, 0))); return performance.now() - t; })()"""


def renderer_cpu_s(root_pid: int) -> dict[int, float]:
    """Return {pid: CPU seconds (user + system) of its main thread} for every Chromium renderer under `root_pid`
    (Linux /proc). Unlike the wall time, and unlike DevTools' TaskDuration (the wall time of the main thread's
    tasks), CPU time does not grow when other jobs share the cores."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo, tick = {}, [root_pid], os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            if b"--type=renderer" not in (Path("/proc") / str(pid) / "cmdline").read_bytes():
                continue
            fields = (Path("/proc") / str(pid) / "task" / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            continue
    return out


def _cpu_since(b: Browser, before: dict[int, float]) -> float:
    """Return the renderers' main-thread CPU seconds since `before` (a renderer started since counts from 0)."""
    after = renderer_cpu_s(b.pid)
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def _loadavg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def measure_load(b: Browser, page: Path, p_grid, switches: int = 3) -> dict:
    """Open `page` once; return its wall and CPU times, the per-step breakdown and a p change's redraw time."""
    cpu0 = renderer_cpu_s(b.pid)
    pg = b.open(page, timeout_s=120)
    cpu_s = _cpu_since(b, cpu0)
    ready_ms = pg.evaluate("window.moeprof.readyMs")
    first_ms = pg.evaluate("window.moeprof.firstScreenMs || -1")  # -1: a page older than progressive drawing
    plotly_ms = pg.evaluate("performance.getEntriesByName('moeprof-plotly-end')[0].startTime")
    steps = pg.evaluate("Object.fromEntries(performance.getEntriesByType('measure')"
                        ".filter(m => m.name.startsWith('moeprof-')).map(m => [m.name.slice(8), m.duration]))")
    switch = []
    for p in (p_grid[0], p_grid[-1], p_grid[len(p_grid) // 2])[:switches]:
        before = renderer_cpu_s(b.pid)
        wall = pg.evaluate(SWITCH_JS % p)
        switch.append((wall, 1000 * _cpu_since(b, before)))
    cells = pg.evaluate("document.getElementById('heatmap').dataset.cells")
    errors = pg.errors
    b.send("Target.closeTarget", targetId=pg.target)
    return dict(ready_s=ready_ms / 1000, first_s=first_ms / 1000, cpu_s=cpu_s, plotly_s=plotly_ms / 1000,
                steps=steps, switch=switch, cells=cells, errors=errors)


def compare_pages(pages: list[Path], rounds: int) -> None:
    """Load each page in turn, `rounds` times, in one browser (after one warm-up load); print medians per page."""
    print(f"load average (1/5/15 min) at start {_loadavg()} on {os.cpu_count()} CPUs")
    runs: dict[Path, list[dict]] = {p: [] for p in pages}
    with Browser() as b:
        b.send("Target.closeTarget", targetId=b.open(pages[0], timeout_s=180).target)
        for _ in range(rounds):
            for p in pages:
                runs[p].append(measure_load(b, p, P_GRID, switches=1))
    for p, rs in runs.items():
        cpu = [r["cpu_s"] for r in rs]
        print(f"{p}: {p.stat().st_size / 1e6:.2f} MB; ready {np.median([r['ready_s'] for r in rs]):.2f} s wall, "
              f"{np.median(cpu):.2f} s CPU ({', '.join(f'{c:.2f}' for c in cpu)}); p change "
              f"{np.median([r['switch'][0][0] for r in rs]):.0f} ms wall / "
              f"{np.median([r['switch'][0][1] for r in rs]):.0f} ms CPU; errors {sum(len(r['errors']) for r in rs)}")
    print(f"load average (1/5/15 min) at end {_loadavg()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--out", default="outputs/bench-report")
    ap.add_argument("--reuse-store", action="store_true",
                    help="keep the synthetic store of an earlier run in --out (writing it takes 10-60 s)")
    ap.add_argument("--pages", nargs="+", type=Path,
                    help="compare these report pages instead (e.g. written by other commits): loaded in turn, "
                         "--loads rounds, one browser; median ready (wall, CPU) and p change per page")
    args = ap.parse_args()
    if args.pages:
        return compare_pages(args.pages, args.loads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / f"synthetic-{args.layers}x{args.experts}.h5"
    print(f"machine: {os.cpu_count()} CPUs; load average (1/5/15 min) at start {_loadavg()}")
    if args.reuse_store and store.exists():
        print(f"store {store}: reused (--reuse-store)")
    else:
        t0 = time.perf_counter()
        synthetic_store(store, layers=args.layers, experts=args.experts)
        add_critical_and_schedule(store, layers=args.layers, experts=args.experts)
        print(f"store {args.layers} x {args.experts}, 4 types, {len(P_GRID)} p values: written in "
              f"{time.perf_counter() - t0:.1f} s")
    t1 = time.perf_counter()
    page = write_report([store], out / "report.html")
    t2 = time.perf_counter()
    mb = page.stat().st_size / 1e6
    data_mb = len(data_json(embedded_data(page.read_text(encoding="utf-8"))).encode()) / 1e6
    print(f"page: {mb:.2f} MB = plotly.js {len(plotly_js().encode()) / 1e6:.2f} MB ({PLOTLY_ASSET}) + data JSON "
          f"{data_mb:.2f} MB + the page's own script and style; written in {t2 - t1:.1f} s ({page})")
    print("per load (see this script's docstring): ready and cpu in s, first screen and plotly in s (wall), steps "
          "in ms (wall), p change in ms (wall/CPU)")
    runs = []
    with Browser() as b:
        for k in range(args.loads):
            r = measure_load(b, page, P_GRID)
            runs.append(r)
            steps = ", ".join(f"{name} {ms:.0f}" for name, ms in r["steps"].items())
            switch = ", ".join(f"{w:.0f}/{c:.0f}" for w, c in r["switch"])
            print(f"load {k + 1}: ready {r['ready_s']:.2f}, cpu {r['cpu_s']:.2f}, first screen {r['first_s']:.2f}, "
                  f"plotly {r['plotly_s']:.2f}; steps: {steps}; p change {switch}; heatmap cells {r['cells']}; "
                  f"errors {r['errors'] or 'none'}")

    def med(key):
        return float(np.median([r[key] for r in runs]))

    walls = [w for r in runs for w, _ in r["switch"]]
    cpus = [c for r in runs for _, c in r["switch"]]
    print(f"RESULT {args.layers} x {args.experts}, 4 types, {len(P_GRID)} p: page {mb:.2f} MB; every section drawn "
          f"(ready) after {med('ready_s'):.2f} s wall (median of {len(runs)} loads, "
          f"{min(r['ready_s'] for r in runs):.2f}-{max(r['ready_s'] for r in runs):.2f}), main-thread CPU "
          f"{med('cpu_s'):.2f} s; first screen {med('first_s'):.2f} s; p change {np.median(walls):.0f} ms wall / "
          f"{np.median(cpus):.0f} ms CPU; load average {_loadavg()} (1/5/15 min) on {os.cpu_count()} CPUs")
    print("On a busy machine the wall times grow with the load average, the CPU times far less: read the 2 s goal "
          "from a run on a quiet machine (load average well under 1).")


if __name__ == "__main__":
    main()

"""Backbone figures: capture overhead, p-curve cost, and profile peak memory vs tokens.

    .venv/bin/python benchmarks/profile/bench_profile.py overhead --model tiny-moe --batch-size 4 --seq-len 256
    .venv/bin/python benchmarks/profile/bench_profile.py overhead --model smollm2 --batch-size 2 --seq-len 256
    .venv/bin/python benchmarks/profile/bench_profile.py overhead --model tiny-moe --without abs_hist   # its share
    .venv/bin/python benchmarks/profile/bench_profile.py overhead --model qwen3-30b-a3b-shape --batch-size 1 \
        --seq-len 512 --threads 1          # Qwen3-30B-A3B layers (random weights, --layers 2, vocab 8192)
    .venv/bin/python benchmarks/profile/bench_profile.py breakdown --model qwen3-30b-a3b-shape --batch-size 1 \
        --seq-len 512 --threads 1          # where a captured forward's extra time goes (docs/performance.md)
    .venv/bin/python benchmarks/profile/bench_profile.py curve            # topp_curve on [4096, 768] ÷ one torch.sort
    .venv/bin/python benchmarks/profile/bench_profile.py memory --model tiny-moe --tokens 4096   # 1× vs 10× tokens

Timings are medians of repeated runs on whatever machine runs them; quote them with the command. Each run is
timed twice: wall clock, and the CPU time of the process (`time.process_time`): on a shared machine the CPU time
of a one-thread run (--threads 1) is what other people's load does not stretch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


SHAPED = {"qwen3-30b-a3b-shape": "recipes/qwen3-30b-a3b.toml"}  # --model names built with random weights


def _model(args):
    """Return the model of --model: a loadable spec, or a recipe's shapes with random weights (--layers, vocab
    8192: the real head would dominate a 2-layer forward)."""
    if args.model in SHAPED:
        from moeprof.models import build_random, config_from_recipe
        from moeprof.recipes import read_toml

        return build_random(config_from_recipe(read_toml(SHAPED[args.model])), layers=args.layers,
                            vocab_size=8192, dtype=args.dtype)
    from moeprof.models import load_model

    return load_model(args.model, dtype=args.dtype)[0]


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _interleaved(fns: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Return {name: {"wall_s", "cpu_s"}} medians of `repeats` rounds, each round running every fn once (in turn,
    so a noisy neighbour slows them alike)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = _clocks()
            fn()
            w1, c1 = _clocks()
            times[name][0].append(w1 - w0)
            times[name][1].append(c1 - c0)
    first = next(iter(fns))  # per round, each fn's time over the first fn's: paired, so a load change between
    # rounds cancels (the median of these ratios is the steadier figure on a shared machine)
    return {name: {"wall_s": statistics.median(w), "cpu_s": statistics.median(c),
                   "cpu_ratio_paired": statistics.median(b / a for a, b in zip(times[first][1], c))}
            for name, (w, c) in times.items()}


def _stats_for(sites, without=()):
    from moeprof.stats import ProfileStats
    from moeprof.topp import DEFAULT_P_GRID

    stats = ProfileStats(len(sites), max(s.num_experts for s in sites), DEFAULT_P_GRID)
    for key in [k for k in stats.members if k[0] in without]:  # e.g. --without abs_hist: its cost
        del stats.members[key]
    return stats


def overhead(args) -> dict:
    from moeprof.arch import adapter_for
    from moeprof.capture import profile_capture

    model = _model(args)
    sites = adapter_for(model).sites(model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(0))

    def stock():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    def captured():
        with torch.inference_mode(), profile_capture(model, _stats_for(sites, args.without), sites=sites):
            model(input_ids=ids, use_cache=False)

    med = _interleaved({"stock": stock, "capture": captured}, args.repeats)
    return {"model": args.model, "dtype": args.dtype, "batch": [args.batch_size, args.seq_len],
            "without": args.without, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "stock_wall_s": round(med["stock"]["wall_s"], 4), "capture_wall_s": round(med["capture"]["wall_s"], 4),
            "overhead_x_wall": round(med["capture"]["wall_s"] / med["stock"]["wall_s"], 3),
            "stock_cpu_s": round(med["stock"]["cpu_s"], 4), "capture_cpu_s": round(med["capture"]["cpu_s"], 4),
            "overhead_x_cpu": round(med["capture"]["cpu_s"] / med["stock"]["cpu_s"], 3),
            "overhead_x_cpu_paired": round(med["capture"]["cpu_ratio_paired"], 3),
            "load_average": round(os.getloadavg()[0], 2)}


def _first_rows(token_idx: torch.Tensor) -> torch.Tensor:
    """Return the first row of each distinct token in token_idx [N] (type x: one of its K routed copies)."""
    tokens, inverse = torch.unique(token_idx, return_inverse=True)
    first = torch.full((tokens.numel(),), token_idx.numel(), dtype=torch.long)
    return first.scatter_reduce_(0, inverse, torch.arange(token_idx.numel()), "amin")


def breakdown(args) -> dict:
    """Where a captured forward's extra time goes: the forward through moeprof's experts function with nothing
    observed ("experts path"), then each step of the statistics timed on the observations of one real captured
    forward (kept aside), as a fraction of the stock forward."""
    from moeprof.arch import adapter_for
    from moeprof.capture import Engine, all_finite, attach, profile_capture
    from moeprof.stats.base import SortedRows
    from moeprof.topp import DEFAULT_P_GRID, ascending_abs_prefix, counts_from_prefix

    model = _model(args)
    sites = adapter_for(model).sites(model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(0))

    class Keep:  # an observer that keeps every observation of one forward
        def __init__(self, type):
            self.type, self.seen = type, []

        def add(self, obs):
            self.seen.append(obs)

    keep = Keep("x")  # (an observer names a type; it is fed every observation)
    with torch.inference_mode(), attach(model, Engine(sites, stats=_stats_for(sites), observers=[keep])):
        model(input_ids=ids, use_cache=False)
    observations = [o for o in keep.seen if o.type is not None]
    routing = [o for o in keep.seen if o.type is None]

    def stock():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    def experts_path():  # moeprof's experts function, observing nothing: the GEMMs and the copies around them
        with torch.inference_mode(), attach(model, Engine(sites)):
            model(input_ids=ids, use_cache=False)

    def captured():
        with torch.inference_mode(), profile_capture(model, _stats_for(sites), sites=sites):
            model(input_ids=ids, use_cache=False)

    grid = torch.tensor(DEFAULT_P_GRID, dtype=torch.float64)
    # type x arrives as K copies of each token's row sharing one summary: its steps run on the distinct rows
    rows = [(o, o.vectors[_first_rows(o.token_idx)] if o.type == "x" else o.vectors) for o in observations]
    sorted_rows = [(o, ascending_abs_prefix(v)) for o, v in rows]

    def each(fn):
        return lambda: [fn(o, v) for o, v in rows]

    def member(key):
        fresh = _stats_for(sites)
        accs = [fresh.members[(key, t)] for t in fresh.types] if key != "routing" else [fresh.members[(key, None)]]
        return lambda: [a.add(o) for a in accs for o in (routing if key == "routing" else observations)]

    steps = {
        "stock forward": stock,
        "captured forward": captured,
        "experts path (no statistics)": experts_path,
        "finite check": each(lambda o, v: all_finite(v)),
        "sort |v| + prefix sums": each(lambda o, v: ascending_abs_prefix(v)),
        "top-p counts (searchsorted)": lambda: [counts_from_prefix(p, grid.expand(p.shape[0], -1))
                                                for _, (_, p) in sorted_rows],
        "|entry| histogram rows (searchsorted)": lambda: [SortedRows(a).bin_counts() for _, (a, _) in sorted_rows],
        "L2 norms": each(lambda o, v: torch.linalg.vector_norm(v.float(), dim=-1)),
        "x: summary rows per routed copy": lambda: [o.summary.select(torch.arange(o.expert_ids.numel()))
                                                    for o in observations if o.type == "x"],
        "sparsity curve add": member("sparsity_curve"),
        "sparsity histogram add": member("sparsity_hist"),
        "|entry| histogram add": member("abs_hist"),
        "magnitude add": member("magnitude"),
        "routing add": member("routing"),
    }
    med = _interleaved(steps, args.repeats)
    base = med["stock forward"]
    return {"model": args.model, "dtype": args.dtype, "batch": [args.batch_size, args.seq_len],
            "threads": torch.get_num_threads(), "repeats": args.repeats,
            "rows": {name: {"wall_s": round(m["wall_s"], 4), "cpu_s": round(m["cpu_s"], 4),
                            "cpu_frac_of_stock": round(m["cpu_s"] / base["cpu_s"], 4)} for name, m in med.items()}}


def curve(args) -> dict:
    from moeprof.topp import DEFAULT_P_GRID, topp_curve

    v = torch.randn(4096, 768, generator=torch.Generator().manual_seed(0))
    t_sort = _median_time(lambda: torch.sort(v.abs(), dim=-1, descending=True), args.repeats)
    t_curve = _median_time(lambda: topp_curve(v, DEFAULT_P_GRID), args.repeats)
    return {"shape": [4096, 768], "p_grid": len(DEFAULT_P_GRID), "sort_s": round(t_sort, 4),
            "topp_curve_s": round(t_curve, 4), "ratio_x": round(t_curve / t_sort, 3)}


_CHILD = """
import json, resource, sys, tempfile, os
from moeprof.models import load_model
from moeprof.profile import profile
model, tok = load_model(sys.argv[1])
with tempfile.TemporaryDirectory() as d:
    r = profile(model, tok, [sys.argv[3]], os.path.join(d, "m.h5"), model_id=sys.argv[1],
                max_tokens=int(sys.argv[2]), seq_len=256, batch_size=4, show_progress=False)
print(json.dumps({"tokens": r.tokens, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def memory(args) -> dict:
    rows = []
    for factor in (1, 10):
        out = subprocess.run([sys.executable, "-c", _CHILD, args.model, str(args.tokens * factor), args.data],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"model": args.model, "runs": rows,
            "peak_ratio_10x_over_1x": round(rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["overhead", "breakdown", "curve", "memory"])
    parser.add_argument("--model", default="tiny-moe")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of a --model built from a recipe's "
                        f"shapes ({', '.join(SHAPED)})")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--data", default="owt:train", help="corpus spec or file for the memory run")
    parser.add_argument("--without", nargs="*", default=[], help="overhead: leave these registered statistics out "
                        "(e.g. abs_hist: the |entry| histogram's share of the overhead)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"overhead": overhead, "breakdown": breakdown, "curve": curve, "memory": memory}[args.what](args)))


if __name__ == "__main__":
    main()

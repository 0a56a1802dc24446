"""Backbone figures: capture overhead, p-curve cost, and profile peak memory vs tokens.

    .venv/bin/python benchmarks/profile/bench_profile.py overhead --model tiny-moe --batch-size 4 --seq-len 256
    .venv/bin/python benchmarks/profile/bench_profile.py overhead --model smollm2 --batch-size 2 --seq-len 256
    .venv/bin/python benchmarks/profile/bench_profile.py overhead --model tiny-moe --without abs_hist   # its share
    .venv/bin/python benchmarks/profile/bench_profile.py curve            # topp_curve on [4096, 768] ÷ one torch.sort
    .venv/bin/python benchmarks/profile/bench_profile.py memory --model tiny-moe --tokens 4096   # 1× vs 10× tokens

Timings are medians of repeated runs on whatever machine runs them; quote them with the command.
"""

from __future__ import annotations

import argparse
import json
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


def overhead(args) -> dict:
    from moeprof.arch import adapter_for
    from moeprof.capture import profile_capture
    from moeprof.models import load_model
    from moeprof.stats import ProfileStats
    from moeprof.topp import DEFAULT_P_GRID

    model, _ = load_model(args.model, dtype=args.dtype)
    sites = adapter_for(model).sites(model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(0))

    def stock():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    def captured():
        stats = ProfileStats(len(sites), max(s.num_experts for s in sites), DEFAULT_P_GRID)
        for key in [k for k in stats.members if k[0] in args.without]:  # e.g. --without abs_hist: its cost
            del stats.members[key]
        with torch.inference_mode(), profile_capture(model, stats, sites=sites):
            model(input_ids=ids, use_cache=False)

    # Interleaved (stock, captured) pairs: a noisy neighbour slows both alike; min and median both reported.
    stock(), captured()
    times = {"stock": [], "capture": []}
    for _ in range(args.repeats):
        for name, fn in (("stock", stock), ("capture", captured)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {"model": args.model, "dtype": args.dtype, "batch": [args.batch_size, args.seq_len], "without": args.without,
            "stock_s": round(med["stock"], 4), "capture_s": round(med["capture"], 4),
            "overhead_x_median": round(med["capture"] / med["stock"], 3),
            "overhead_x_min": round(best["capture"] / best["stock"], 3), "threads": torch.get_num_threads()}


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
    parser.add_argument("what", choices=["overhead", "curve", "memory"])
    parser.add_argument("--model", default="tiny-moe")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--data", default="owt:train", help="corpus spec or file for the memory run")
    parser.add_argument("--without", nargs="*", default=[], help="overhead: leave these registered statistics out "
                        "(e.g. abs_hist: the |entry| histogram's share of the overhead)")
    args = parser.parse_args()
    print(json.dumps({"overhead": overhead, "curve": curve, "memory": memory}[args.what](args)))


if __name__ == "__main__":
    main()

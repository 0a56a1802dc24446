"""Full evaluations of `moeprof schedule` with and without `--from STORE` (the store's uniform critical p as anchor).

    PYTHONPATH=. python benchmarks/schedule/from_store.py --model tiny-moe --task ppl:wikipedia --tokens 8192

Runs, in-process through the CLI (`moeprof.cli.main`), in --dir (default outputs/bench/from-store, the store is
made afresh):
1. `moeprof critical MODEL --type T --task TASK --out DIR/store.h5` (profiles wikipedia:heldout first: no store);
2. `moeprof schedule MODEL --type T --task TASK --out DIR/search.json` (anchor searched);
3. `moeprof schedule ... --from DIR/store.h5 --out DIR/from-store.json` (anchor from the store).
Then times, on the schedule's calibration split, one full evaluation and `expert_curves` (what reading the curves
from a store could save at most) and prints one JSON line: evaluations (all / anchor), anchor p, chosen
candidate, calibration and held-out FLOP-weighted sparsity and ratio, and wall seconds of each step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--type", default="i")
    ap.add_argument("--task", default="ppl:wikipedia")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--tokens", type=int, default=8192, help="--max-tokens of both commands")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dir", default="outputs/bench/from-store")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from moeprof.cli import main as cli

    out = Path(args.dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = ["--type", args.type, "--task", args.task, "--target", str(args.target), "--seq-len", str(args.seq_len),
              "--max-tokens", str(args.tokens)]
    store = out / "store.h5"
    wall = {}

    def step(name, argv):
        t0 = time.perf_counter()
        code = cli(argv)
        wall[name] = round(time.perf_counter() - t0, 1)
        if code != 0:
            raise SystemExit(f"{name}: exit {code}")

    step("critical", ["critical", args.model, *common, "--out", str(store)])
    step("schedule", ["schedule", args.model, *common, "--out", str(out / "search.json")])
    step("schedule_from", ["schedule", args.model, *common, "--from", str(store), "--out", str(out / "from-store.json")])

    from moeprof.optimize import DEFAULT_GRID, expert_curves
    from moeprof.evaluate.task import task_splits
    from moeprof.models import load_model
    from moeprof.schedule import Schedule
    from moeprof.store import open_store

    with open_store(store) as st:
        rec = st.critical(type=args.type, rule="topp")
        stored = {"critical_p": rec.attrs["critical_p"], "evaluations": rec.attrs["num_evaluations"]}
    rows = {}
    for name in ("search", "from-store"):
        prov = Schedule.load(out / f"{name}.json").provenance
        rows[name] = {"evaluations": prov["evaluations"], "anchor_evaluations": len(prov["anchor_search"]),
                      "multiplier_evaluations": len(prov["search"]), "anchor_p": prov["anchor_p"],
                      "anchor_from": prov.get("anchor_from"), "chosen": prov["chosen"],
                      "calibration_sparsity_flop": prov["sparsity_flop"], "calibration_ratio": prov["ratio"],
                      "heldout_sparsity_flop": prov["heldout_sparsity_flop"], "heldout_ratio": prov["heldout_ratio"]}
    model, tok = load_model(args.model)
    splits = task_splits(model, tok, task=args.task, type=args.type, seq_len=args.seq_len, max_tokens=args.tokens)
    t0 = time.perf_counter()
    splits.calibration(None)
    one_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    expert_curves(model, splits.calibration_tokens, type=args.type, p_grid=DEFAULT_GRID)
    curves = time.perf_counter() - t0
    print(json.dumps({"model": args.model, "task": args.task, "type": args.type, "tokens": args.tokens,
                      "store": stored, "without_from": rows["search"], "with_from": rows["from-store"],
                      "wall_s": wall, "one_calibration_evaluation_s": round(one_eval, 2),
                      "expert_curves_s": round(curves, 2)}))


if __name__ == "__main__":
    main()

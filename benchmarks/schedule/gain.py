"""Held-out sparsity gain of an optimized per-(layer, expert) schedule over the uniform critical p.

Both are fitted to the same constraint (calibration score ≥ target × dense, on the task's calibration split) and
then measured on the held-out split neither saw: FLOP-weighted realized sparsity and score ratio.

    PYTHONPATH=. python benchmarks/schedule/gain.py --model tiny-moe --type i --task ppl:wikipedia --tokens 8192
    PYTHONPATH=. python benchmarks/schedule/gain.py --model smollm2 --type i --task ppl:wikipedia --tokens 2048 \
        --probe-sequences 4 --out outputs/bench/smollm2-i.json

The optimizer (moeprof.optimize) runs its default, anchored method; --no-anchor, --anchor-search grid,
--joint-probes and --two-point-probes select the variants the tables of docs/results.md compare. The uniform baseline is
always the same find_critical call on the calibration split, whatever the optimizer did.

Writes the schedule (--out) and prints one JSON line with both results.

--random-splits N (issue 27's bar): the task's corpus (train and held-out pooled, --tokens each) is reshuffled into N
random calibration / held-out halves (seeds 0 … N−1); the optimizer (its margin at --confidence) runs on each and
the held-out ratio, the verdict's gain over uniform p at equal held-out score, and what was written are printed,
then how many held-out ratios missed the target:

    PYTHONPATH=. python benchmarks/schedule/gain.py --model tiny-moe --task ppl:wikipedia --tokens 2048 \
        --random-splits 10 --confidence 0.9

(--seeds 8,9 runs only those seeds, to complete a run that was cut.) With --transfer, the schedule and the
uniform p are also scored on the other tasks given (e.g. ppl:owt,arc_easy,hellaswag).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--type", default="i")
    ap.add_argument("--task", default="ppl:wikipedia")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-evals", type=int, default=20)
    ap.add_argument("--probe-sequences", type=int, default=8,
                    help="calibration sequences each layer's NLL probe runs on (L forwards of this slice)")
    ap.add_argument("--probe-floor", action="store_true",
                    help="a layer whose NLL probe measured no increase gets 2·SE of it, not ~0 (see moeprof.optimize)")
    ap.add_argument("--no-anchor", action="store_true",
                    help="the earlier method: ΔNLL layer probes at p = 0.5, no uniform grid anchor (see moeprof.optimize)")
    ap.add_argument("--anchor-search", default="critical", choices=("critical", "grid"),
                    help="how the uniform anchor is found: find_critical (the baseline's search) or grid bisection")
    ap.add_argument("--joint-probes", action="store_true",
                    help="probe each layer's move below the anchor p with every other layer at the anchor p")
    ap.add_argument("--two-point-probes", action="store_true",
                    help="probe each layer also at 1 - 2(1 - anchor p) and interpolate its factor (2L probes)")
    ap.add_argument("--method", default="lagrangian", choices=("lagrangian", "marginal"),
                    help="marginal: layer groups reallocated from joint two-sided KL probes (see moeprof.optimize)")
    ap.add_argument("--marginal-groups", type=int, default=10)
    ap.add_argument("--marginal-rounds", type=int, default=3)
    ap.add_argument("--marginal-sequences", type=int, default=None)
    ap.add_argument("--transfer", default="")
    ap.add_argument("--transfer-limit", type=int, default=200)
    ap.add_argument("--out", default="outputs/schedule-gain.json")
    ap.add_argument("--confidence", type=float, default=0.9, help="the acceptance margin (OptimizeConfig.confidence)")
    ap.add_argument("--random-splits", type=int, default=0, help="N random calibration / held-out splits (see above)")
    ap.add_argument("--seeds", default=None,
                    help="with --random-splits: run only these seeds (e.g. 8,9 or 8-9) to complete a cut run; the "
                         "summary then counts only the seeds run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.random_splits:
        random_splits(args)
        return

    from moeprof.optimize import OptimizeConfig, optimize_schedule
    from moeprof.evaluate.task import task_splits
    from moeprof.critical.search import find_critical
    from moeprof.models import load_model, model_id

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    splits = task_splits(model, tok, task=args.task, type=args.type, seq_len=args.seq_len, max_tokens=args.tokens,
                         limit=args.limit)
    config = OptimizeConfig(type=args.type, task=args.task, target=args.target, model_id=model_id(args.model),
                            max_evals=args.max_evals, layer_probe_sequences=args.probe_sequences,
                            probe_floor=args.probe_floor, anchor=False if args.no_anchor else None,
                            two_point_probes=args.two_point_probes, anchor_search=args.anchor_search,
                            joint_probes=args.joint_probes, method=args.method, marginal_groups=args.marginal_groups,
                            marginal_rounds=args.marginal_rounds, marginal_sequences=args.marginal_sequences)
    run = optimize_schedule(model, tok, config, splits=splits,
                            on_eval=lambda r: print("  eval", json.dumps(r), flush=True),
                            on_stage=lambda s: print(f"[{time.perf_counter() - t0:7.0f} s] {s}", flush=True))
    run.schedule.save(args.out)
    print(f"[{time.perf_counter() - t0:7.0f} s] uniform critical p on the same calibration split", flush=True)
    # the uniform baseline under the same constraint, on the same calibration split (the cached dense reused)
    uni = find_critical(splits.calibration, target=args.target, type=args.type, task=args.task,
                        dense=run.search.dense, extend=True)
    held_uni = splits.heldout(uni.critical_p)
    result = {
        "model": args.model, "type": args.type, "task": args.task, "target": args.target, "tokens": args.tokens,
        "seq_len": args.seq_len, "probe_sequences": args.probe_sequences, "probe_floor": args.probe_floor,
        "anchor": not args.no_anchor, "anchor_search": args.anchor_search, "chosen": run.chosen,
        "anchor_p": run.anchor_p, "method": args.method,
        "marginal": [{"moves": r.moves, "kl": r.kl, "sparsity": r.sparsity, "accepted": r.accepted}
                     for r in run.marginal_rounds],
        "marginal_probes": run.marginal_probes,
        "layer_probe": ([run.layer_probe_measure, run.layer_probe_p, run.layer_probe_p_low, run.layer_probe_context_p]
                        if run.layer_probes else [None] * 4),
        "layer_probes": run.layer_probes,
        "refined": [r["refine"] for r in run.search.evaluations if "refine" in r],
        "schedule": {"calibration_ratio": run.ratio, "calibration_sparsity_flop": run.sparsity_flop,
                     "heldout_ratio": run.heldout_ratio, "heldout_sparsity_flop": run.heldout_sparsity_flop,
                     "evaluations": run.evaluations, "safe_experts": len(run.schedule.safe_experts)},
        "uniform": {"critical_p": uni.critical_p, "calibration_ratio": uni.critical_ratio,
                    "calibration_sparsity_flop": uni.critical_sparsity_flop, "evaluations": uni.num_evaluations,
                    "heldout_ratio": held_uni.score / run.heldout_dense.score,
                    "heldout_sparsity_flop": held_uni.sparsity_flop_overall},
    }
    result["gain_points"] = 100 * (result["schedule"]["heldout_sparsity_flop"] - result["uniform"]["heldout_sparsity_flop"])
    if args.transfer:
        import numpy as np

        rows = []
        for task in args.transfer.split(","):
            other = task_splits(model, tok, task=task, type=args.type, seq_len=args.seq_len, max_tokens=args.tokens,
                                limit=args.transfer_limit if not task.startswith("ppl:") else args.limit)
            d = other.heldout(None)
            s = other.heldout(torch.as_tensor(run.schedule.p))
            u = other.heldout(uni.critical_p)
            rows.append({"task": task, "dense": d.score, "schedule_ratio": s.score / d.score,
                         "schedule_sparsity_flop": s.sparsity_flop_overall, "uniform_ratio": u.score / d.score,
                         "uniform_sparsity_flop": u.sparsity_flop_overall})
            print("  transfer", json.dumps(rows[-1]), flush=True)
        result["transfer"] = rows
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result))


def split_seeds(n: int, spec: str | None) -> list[int]:
    """Return the seeds to run: 0 … n−1, or those `spec` names ("8,9", "6-9"), each in [0, n)."""
    if not spec:
        return list(range(n))
    seeds = []
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        seeds.extend(range(int(a), int(b or a) + 1))
    bad = [s for s in seeds if not 0 <= s < n]
    if bad:
        raise SystemExit(f"--seeds {spec}: seeds must lie in [0, {n}) (--random-splits {n}), got {bad}")
    return sorted(set(seeds))


def random_splits(args) -> None:
    """The held-out miss rate over `args.random_splits` random calibration / held-out splits of one corpus."""
    from moeprof import corpora
    from moeprof.evaluate.perplexity import sequences_from_file
    from moeprof.evaluate.task import TaskSplits, task_evaluator
    from moeprof.models import load_model, model_id
    from moeprof.optimize import OptimizeConfig, optimize_schedule

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    name = args.task[4:]
    pool = torch.cat([sequences_from_file(tok, corpora.text_file(name, split), seq_len=args.seq_len,
                                          max_tokens=args.tokens) for split in ("train", "heldout")])
    rows = []
    for seed in split_seeds(args.random_splits, args.seeds):
        perm = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))
        half = pool.shape[0] // 2
        cal, held = pool[perm[:half]], pool[perm[half:2 * half]]
        on = dict(type=args.type, batch_size=8)
        splits = TaskSplits(task_evaluator(model, tok, args.task, sequences=cal, **on).evaluate,
                            task_evaluator(model, tok, args.task, sequences=held, **on).evaluate, cal,
                            {"calibration": f"{name} random half {seed}", "heldout": f"{name} other half {seed}",
                             "calibration_tokens": int(cal.numel()), "heldout_tokens": int(held.numel())})
        config = OptimizeConfig(type=args.type, task=args.task, target=args.target, model_id=model_id(args.model),
                                max_evals=args.max_evals, method=args.method, confidence=args.confidence,
                                layer_probe_sequences=args.probe_sequences)
        run = optimize_schedule(model, tok, config, splits=splits)
        v = run.verdict
        row = {"seed": seed, "calibration_ratio": run.ratio, "heldout_ratio": run.heldout_ratio,
               "heldout_ci": run.heldout_ci, "heldout_sparsity_flop": run.heldout_sparsity_flop,
               "optimized_heldout_ratio": v.heldout_ratio, "optimized_heldout_ci": v.heldout_ratio_ci,
               "chosen": run.chosen, "written": v.written, "gain_points": v.gain_points,
               "noise_points": v.noise_points, "uniform_p": v.uniform_p, "miss": v.worst_ratio < args.target,
               "written_miss": run.heldout_ratio < args.target, "wall_s": time.perf_counter() - t0}
        rows.append(row)
        print("  split", json.dumps(row), flush=True)
    misses = sum(r["written_miss"] for r in rows)
    print(json.dumps({"model": args.model, "task": args.task, "tokens_per_split": args.tokens, "type": args.type,
                      "seeds": [r["seed"] for r in rows],
                      "target": args.target, "confidence": args.confidence, "method": args.method,
                      "splits": len(rows), "heldout_misses": misses,
                      "mean_heldout_ratio": sum(r["heldout_ratio"] for r in rows) / len(rows),
                      "mean_gain_points": sum(r["gain_points"] or 0 for r in rows) / len(rows),
                      "optimized_misses": sum(r["miss"] for r in rows),
                      "wall_s": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    main()

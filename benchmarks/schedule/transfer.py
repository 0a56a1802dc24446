"""Transfer table: a schedule calibrated on one task, scored on others, against uniform p at the SAME calibration
sparsity (issue 10).

The uniform p is found by bisection on the schedule's calibration split (the same data and token budget) so that
its FLOP-weighted realized sparsity equals the schedule's there (experts the schedule leaves dense count 0). Both
are then scored on each transfer task, data the schedule never saw: `ppl:<corpus>` on the corpus's held-out split,
an lm-eval multiple-choice task on its first --limit documents. Prints one JSON line per task and a final one.

    PYTHONPATH=. python benchmarks/schedule/transfer.py --model tiny-moe --schedule outputs/bench/tiny-moe-i.json \
        --tokens 8192 --tasks ppl:wikipedia,ppl:owt,arc_easy,hellaswag --limit 50
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--schedule", required=True)
    ap.add_argument("--tasks", default="ppl:wikipedia,ppl:owt,arc_easy,hellaswag")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of each perplexity split")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--limit", type=int, default=50, help="documents of each multiple-choice task")
    ap.add_argument("--bisect-steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="also write the result JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from moeprof.critical.search import bootstrap_ratio_ci
    from moeprof.evaluate.task import resolve_task, task_evaluator, task_splits
    from moeprof.models import load_model, model_id
    from moeprof.schedule import setting

    t0 = time.perf_counter()
    say = lambda s: print(f"[{time.perf_counter() - t0:7.0f} s] {s}", flush=True)  # noqa: E731
    model, tok = load_model(args.model)
    st = setting(schedule=args.schedule)
    schedule, table = st.schedule, st.table(model, model_id(args.model))
    cal_task = schedule.provenance.get("task", "ppl:wikipedia")
    splits = task_splits(model, tok, task=cal_task, type=schedule.type, rule=schedule.rule, seq_len=args.seq_len,
                         max_tokens=args.tokens)
    target = splits.calibration(table).sparsity_flop_overall
    say(f"schedule's calibration sparsity (FLOP, dense experts count 0) on {cal_task}: {target:.4f}")
    lo, hi = 0.0, 1.0  # sparsity falls as p rises: find p with sparsity(p) = target
    for _ in range(args.bisect_steps):
        mid = (lo + hi) / 2
        s = splits.calibration(mid).sparsity_flop_overall
        say(f"  uniform p {mid:.4f}: calibration sparsity {s:.4f}")
        lo, hi = (mid, hi) if s > target else (lo, mid)
    p_uni = (lo + hi) / 2
    uni_cal = splits.calibration(p_uni)
    say(f"uniform p {p_uni:.4f}: calibration sparsity {uni_cal.sparsity_flop_overall:.4f}")

    rows = []
    for name in args.tasks.split(","):
        task = resolve_task(name)
        ev = task_evaluator(model, tok, task, type=schedule.type, rule=schedule.rule, seq_len=args.seq_len,
                            max_tokens=args.tokens, limit=None if task.is_perplexity else args.limit)
        evaluate = ev.evaluate
        data = f"{task.text}:heldout, {ev.tokens} tokens" if task.is_perplexity else f"documents [0, {args.limit})"
        dense, sched, uni = evaluate(None), evaluate(table), evaluate(p_uni)
        row = {"task": name, "data": data, "dense": dense.score, "chance": None if task.is_perplexity else
               task.spec.chance,
               "schedule_ratio": sched.score / dense.score, "schedule_ci": bootstrap_ratio_ci(dense, sched),
               "schedule_sparsity_flop": sched.sparsity_flop_overall,
               "uniform_ratio": uni.score / dense.score, "uniform_ci": bootstrap_ratio_ci(dense, uni),
               "uniform_sparsity_flop": uni.sparsity_flop_overall}
        rows.append(row)
        say("transfer " + json.dumps(row))
    result = {"model": args.model, "schedule": args.schedule, "calibration_task": cal_task,
              "calibration_sparsity_flop": target, "uniform_p": p_uni,
              "uniform_calibration_sparsity_flop": uni_cal.sparsity_flop_overall, "rows": rows,
              "wall_s": time.perf_counter() - t0}
    if args.out:
        from moeprof.atomic import write_text

        write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

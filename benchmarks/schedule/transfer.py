"""Transfer: a schedule calibrated on some corpora, judged on a corpus it was not calibrated on (issue 27, item 5b).

For each direction CALIBRATION>SCORED (default: `ppl:wikipedia,ppl:owt>ppl:code` and its reverse
`ppl:code>ppl:wikipedia;ppl:owt`): the schedule optimizer runs on the calibration task with default settings (what
`moeprof schedule MODEL --type i --task CALIBRATION --max-tokens TOKENS` does), then each scored task gets the verdict
of `moeprof eval --schedule S --task T` (`moeprof.optimize.verdict.judge_schedule`, on T's held-out split, the same
evaluator): the ratio against the target with its paired-bootstrap CI, uniform p at equal score, the schedule's gain
over it in FLOP-weighted points and the noise. The calibration task's own held-out verdict (the optimizer's) is
printed too, as the row whose `scored` is `heldout of CALIBRATION`. One JSON line per (calibration, scored task).

    PYTHONPATH=. python benchmarks/schedule/transfer.py --model tiny-moe --tokens 8192
    PYTHONPATH=. python benchmarks/schedule/transfer.py --model smollm2 --tokens 2048 \
        --out-dir outputs/bench/transfer-smollm2

When the verdict on the calibration task's held-out split found no gain over uniform p, the file holds the uniform
table and its verdict on any task says only that; the table the optimizer found (the provenance's `optimized_p`)
is then judged too, the same way, in rows with `"table": "optimized (not written)"`.

`--schedule S.json --score T1;T2` judges a saved schedule instead (no optimizer run), and its `optimized_p` if any. Scored tasks are separated by
";" (a "," inside one task names a task of several corpora, as `--task` does). Each written schedule is saved under
--out-dir.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DEFAULT_DIRECTIONS = ("ppl:wikipedia,ppl:owt>ppl:code", "ppl:code>ppl:wikipedia;ppl:owt")


def parse_direction(text: str) -> tuple[str, list[str]]:
    """Return (calibration task, [scored tasks]) of "CAL>T1;T2"."""
    cal, sep, scored = text.partition(">")
    tasks = [t.strip() for t in scored.split(";") if t.strip()]
    if not sep or not cal.strip() or not tasks:
        raise SystemExit(f"--directions {text!r}: give CALIBRATION>SCORED[;SCORED...], e.g. "
                         "ppl:wikipedia,ppl:owt>ppl:code")
    return cal.strip(), tasks


def verdict_row(v, **head) -> dict:
    """Return the JSON row of a Verdict (the numbers the docs' table shows)."""
    ci = v.heldout_ratio_ci
    return {**head, "ratio": v.heldout_ratio, "ratio_ci": None if ci is None else list(ci),
            "parts": v.heldout_parts or None, "meets_target": v.meets_target, "resolvable": v.resolvable,
            "sparsity_flop": v.sparsity_flop, "uniform_p": v.uniform_p, "uniform_bound": v.uniform_bound,
            "uniform_sparsity_flop": v.uniform_sparsity_flop, "gain_points": v.gain_points,
            "noise_points": v.noise_points, "beats_uniform": v.beats_uniform, "tokens": v.tokens,
            "uniform_evaluations": v.uniform_evaluations, "schedule_is_uniform": v.schedule_is_uniform,
            "uniform_points": getattr(v, "uniform_points", None),
            "lines": v.lines()}


def judge_on(model, tok, schedule, table, task: str, *, seq_len: int, max_tokens: int):
    """The verdict `moeprof eval --schedule S --task T` prints: the same evaluator (T's held-out split) and function."""
    from moeprof.evaluate.task import task_evaluator
    from moeprof.optimize.verdict import judge_schedule

    evaluate = task_evaluator(model, tok, task, type=schedule.type, rule=schedule.rule, seq_len=seq_len,
                              max_tokens=max_tokens).evaluate
    dense = evaluate(None)
    points: dict = {}
    v = judge_schedule(schedule, evaluate, dense, evaluate(table), task=task, points=points)
    # the uniform evaluations the verdict bisected (p, ratio, FLOP sparsity): what its gain and noise come from
    v.uniform_points = [[p, pt.score / dense.score, pt.sparsity_flop_overall] for p, pt in sorted(points.items())]
    return v


def tables_of(schedule, table) -> list[tuple[str, object, object]]:
    """Return [(label, schedule, table)]: the written table, then the optimizer's own when the file holds the uniform
    table instead (`optimized_p` in its provenance), as a Schedule with that table and the same provenance."""
    import dataclasses

    import numpy as np

    out = [("written", schedule, table)]
    kept = (schedule.provenance or {}).get("optimized_p")
    if kept is not None:
        p = np.array(kept, dtype=float)  # (null → NaN: dense)
        out.append(("optimized (not written)", dataclasses.replace(schedule, p=p), torch.as_tensor(p)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--type", default="i")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of each split of each corpus (--max-tokens)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--directions", nargs="+", default=list(DEFAULT_DIRECTIONS),
                    help="CALIBRATION>SCORED[;SCORED...] (default: %(default)s)")
    ap.add_argument("--schedule", default=None, help="judge this saved schedule on --score (no optimizer run)")
    ap.add_argument("--score", default=None, help="with --schedule: the scored tasks, separated by ';'")
    ap.add_argument("--out-dir", default="outputs/bench/transfer", help="where each optimized schedule is saved")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from moeprof.models import load_model, model_id
    from moeprof.optimize import OptimizeConfig, optimize_schedule
    from moeprof.schedule import Schedule, setting

    t0 = time.perf_counter()
    say = lambda s: print(f"[{time.perf_counter() - t0:7.0f} s] {s}", flush=True)  # noqa: E731
    model, tok = load_model(args.model)
    mid = model_id(args.model)
    head = {"model": args.model, "type": args.type, "tokens_per_split": args.tokens, "seq_len": args.seq_len}
    if args.schedule:
        if not args.score:
            raise SystemExit("--schedule needs --score T1;T2 (the tasks to judge it on)")
        schedule = Schedule.load(args.schedule)
        table = setting(schedule=args.schedule).table(model, mid)
        cal = (schedule.provenance or {}).get("task")
        for task in [t.strip() for t in args.score.split(";") if t.strip()]:
            for label, sch, tab in tables_of(schedule, table):
                v = judge_on(model, tok, sch, tab, task, seq_len=args.seq_len, max_tokens=args.tokens)
                print(json.dumps(verdict_row(v, **head, calibration=cal, scored=task, schedule=args.schedule,
                                             table=label, wall_s=time.perf_counter() - t0)), flush=True)
        return

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for direction in args.directions:
        cal, scored = parse_direction(direction)
        say(f"optimizing on {cal} ({args.tokens} tokens per split of each corpus)")
        config = OptimizeConfig(type=args.type, task=cal, target=args.target, model_id=mid, seq_len=args.seq_len,
                                max_tokens=args.tokens)
        run = optimize_schedule(model, tok, config, on_stage=lambda s: say("  " + s))
        path = out_dir / f"{args.model}-{args.type}-{cal.replace('ppl:', '').replace(',', '+')}.json"
        run.schedule.save(path)
        say(f"wrote {path} ({run.chosen}); calibration ratio {run.ratio:.4f}, sparsity {run.sparsity_flop:.4f}")
        common = {**head, "calibration": cal, "schedule": str(path), "chosen": run.chosen,
                  "calibration_ratio": run.ratio, "calibration_sparsity_flop": run.sparsity_flop,
                  "evaluations": run.evaluations}
        if run.verdict is not None:  # (the verdict of the optimizer's table, whatever was written)
            print(json.dumps(verdict_row(run.verdict, **common, scored=f"heldout of {cal}",
                                         table="optimized" if run.optimized_p is None else "optimized (not written)",
                                         wall_s=time.perf_counter() - t0)), flush=True)
        schedule = Schedule.load(path)
        table = setting(schedule=str(path)).table(model, mid)
        for task in scored:
            for label, sch, tab in tables_of(schedule, table):
                say(f"the verdict on {task} ({label} table)")
                v = judge_on(model, tok, sch, tab, task, seq_len=args.seq_len, max_tokens=args.tokens)
                print(json.dumps(verdict_row(v, **common, scored=task, table=label, wall_s=time.perf_counter() - t0)),
                      flush=True)


if __name__ == "__main__":
    main()

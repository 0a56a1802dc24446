"""Static magnitude thresholds τ [L, E] against the top-p schedule they are derived from (issue 10, the "plus").

A runtime that cannot sort per token (TEAL-style) keeps |a| ≥ τ with one static τ per expert. This script profiles
the model on the calibration text (or takes --store), derives τ from a schedule (--schedule, else uniform --p) with
`moeprof.schedule.threshold_schedule` (each expert's τ puts its scheduled sparsity of the profile's |entry|
histogram below τ), then scores both on held-out Wikipedia (and on the calibration split) and prints:

- scheduled (the schedule's rule, per token) realized sparsity and score ratio vs dense, with a bootstrap CI;
- the same for the τ rule;
- per-expert sparsity error of τ against the schedule on the same tokens: mean |Δ| and max |Δ| over the experts
  both sparsified on at least --min-tokens tokens (token-weighted per expert).

    PYTHONPATH=. python benchmarks/schedule/thresholds.py --model tiny-moe \
        --schedule outputs/bench/tiny-moe-v2-i.json --tokens 8192
    PYTHONPATH=. python benchmarks/schedule/thresholds.py --model tiny-moe --p 0.9 --tokens 8192   # uniform

The last line printed is the result JSON (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--schedule", help="a top-p schedule file (default: uniform --p)")
    ap.add_argument("--p", type=float, default=0.9, help="uniform p when no --schedule (default 0.9)")
    ap.add_argument("--type", default="i", help="activation type of the uniform schedule (default i)")
    ap.add_argument("--store", help="the model's profile store (default: profile --calibration now)")
    ap.add_argument("--calibration", default="wikipedia:train", help="text profiled for τ (default wikipedia:train)")
    ap.add_argument("--heldout", default="wikipedia", help="corpus whose held-out split scores both (default "
                    "wikipedia)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens profiled, and tokens of each scored split")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--min-tokens", type=int, default=16, help="experts with fewer tokens leave the error figures")
    ap.add_argument("--out", help="also write the result JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from moeprof import corpora
    from moeprof.capture import sparsify
    from moeprof.critical.search import bootstrap_ratio_ci
    from moeprof.evaluate.perplexity import DenseReference, perplexity, sequences_from_file
    from moeprof.evaluate.point import EvalPoint, point_from_realized
    from moeprof.models import load_model, model_id
    from moeprof.profile import profile
    from moeprof.schedule import Schedule, setting, threshold_schedule, uniform

    t0 = time.perf_counter()
    say = lambda s: print(f"[{time.perf_counter() - t0:6.1f} s] {s}", flush=True)  # noqa: E731
    model, tok = load_model(args.model)
    mid = model_id(args.model)
    schedule = (Schedule.load(args.schedule) if args.schedule
                else uniform(model, type=args.type, p=args.p, model_id=mid))
    table = setting(schedule=schedule).table(model, mid)
    store = args.store
    if store is None:
        store = Path("outputs/bench") / f"{Path(args.model).name}-{schedule.type}-tau-profile.h5"
        store.parent.mkdir(parents=True, exist_ok=True)
        say(f"profiling {args.model} on {args.calibration} ({args.tokens} tokens) into {store}")
        profile(model, tok, [args.calibration], store, model_id=mid, types=(schedule.type,), max_tokens=args.tokens,
                seq_len=args.seq_len, show_progress=False)
    tau = threshold_schedule(schedule, store)
    tau_table = torch.as_tensor(tau.p, dtype=torch.float64)
    say(f"τ for {int(np.isfinite(tau.p).sum())} experts (targets: {tau.provenance['target_from']})")

    rows = []
    splits = [("heldout", args.heldout, "heldout"), ("calibration", args.calibration.split(":")[0], "train")]
    for label, corpus, split in splits:
        seqs = sequences_from_file(tok, corpora.text_file(corpus, split), seq_len=args.seq_len, max_tokens=args.tokens)
        ref = DenseReference(model, seqs, batch_size=8, keep_logprobs=False)

        def evaluate(rule, p, ref=ref):  # = moeprof.evaluate.runners.perplexity_evaluator, keeping token counts
            with sparsify(model, type=schedule.type, rule=rule, p=p) as realized:
                res = perplexity(model, reference=ref)
            return point_from_realized(p, res.score, realized, score_kind="inv_ppl", example_values=res.seq_nll,
                                       example_weights=res.seq_tokens), realized.tokens.numpy()

        r = ref.result
        dense = EvalPoint(None, r.score, score_kind="inv_ppl", example_values=r.seq_nll, example_weights=r.seq_tokens)
        (sched, n_a), (static, n_b) = evaluate(schedule.rule, table), evaluate("threshold", tau_table)
        a, b = sched.per_expert_sparsity, static.per_expert_sparsity  # [L, E] realized, NaN where not sparsified
        err = np.abs(b - a)
        ok = np.isfinite(err) & (n_a >= args.min_tokens) & (n_b >= args.min_tokens)
        row = {"split": label, "data": f"{corpus}:{split}, {seqs.numel()} tokens", "dense_ppl": 1 / dense.score,
               "scheduled": {"rule": schedule.rule, "sparsity_token": sched.sparsity_token,
                             "sparsity_flop": sched.sparsity_flop_overall, "ratio": sched.score / dense.score,
                             "ratio_ci": bootstrap_ratio_ci(dense, sched)},
               "threshold": {"sparsity_token": static.sparsity_token, "sparsity_flop": static.sparsity_flop_overall,
                             "ratio": static.score / dense.score, "ratio_ci": bootstrap_ratio_ci(dense, static)},
               "experts_compared": int(ok.sum()),
               "per_expert_abs_error_mean": float(err[ok].mean()) if ok.any() else None,
               "per_expert_abs_error_max": float(err[ok].max()) if ok.any() else None,
               "per_expert_signed_error_mean": float((b - a)[ok].mean()) if ok.any() else None}
        rows.append(row)
        say(f"{label}: scheduled sparsity {row['scheduled']['sparsity_token']:.4f} ratio "
            f"{row['scheduled']['ratio']:.4f} | τ sparsity {row['threshold']['sparsity_token']:.4f} ratio "
            f"{row['threshold']['ratio']:.4f} | per-expert |Δ| mean {row['per_expert_abs_error_mean']:.4f} max "
            f"{row['per_expert_abs_error_max']:.4f} over {row['experts_compared']} experts")
    result = {"model": args.model, "schedule": args.schedule or f"uniform p {args.p} ({schedule.type})",
              "store": str(store), "rows": rows, "wall_s": time.perf_counter() - t0}
    if args.out:
        from moeprof.atomic import write_text

        write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

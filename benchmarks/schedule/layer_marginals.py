"""How much can ANY per-layer reallocation of p gain over uniform p? Measure the layers' marginal costs jointly.

At the uniform critical p0 (found by `find_critical` on the calibration split), every layer sits at p0; then each
group of `--group` consecutive layers is moved to p0 − δ and to p0 + δ with all other layers at p0, and the
calibration KL(dense ‖ sparsified) per token and the FLOP-weighted sparsity are measured (2·G + 2 evaluations with the check).
KL, unlike the perplexity ratio, is smooth in p (the ratio's jitter between neighbouring p is a third of the 1 %
budget at 2,048 tokens), and its mean is close to the NLL increase the constraint limits.

This is one round of the optimizer's own reallocation (`moeprof.optimize.marginal_reallocation`,
`--method marginal`): from the three points per group a convex quadratic KL_g(x_g) in the group's share x_g of the
overall sparsity; with the groups' KL additive, the shares maximizing Σ x_g at the KL of uniform p0 are the
optimum of that local model (`water_fill`; each group within `--trust`·δ in p). Its predicted gain is the
reallocation's headroom to second order; the optimum is probed for real (KL, ratio, sparsity on calibration) and,
when within 2 % of the uniform KL, scored on the held-out split beside uniform p0. It also prints the local
model's KL increase for +5 points over uniform p0, spread evenly and allocated at least KL.

    PYTHONPATH=. python benchmarks/schedule/layer_marginals.py --model smollm2 --tokens 4096 --group 3 [--p0 0.9645]
    PYTHONPATH=. python benchmarks/schedule/layer_marginals.py --model tiny-moe --tokens 2048 --group 1

Prints one JSON line per evaluation and a summary line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from moeprof.optimize import layer_groups, marginal_reallocation, water_fill


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--type", default="i")
    ap.add_argument("--task", default="ppl:wikipedia")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group", type=int, default=5, help="consecutive layers moved together (1 = per layer)")
    ap.add_argument("--delta", type=float, default=0.02, help="the move in p of a group, both ways")
    ap.add_argument("--trust", type=float, default=2.0, help="the allocation moves a group at most trust·delta in p")
    ap.add_argument("--p0", type=float, default=None, help="skip the uniform search: this p is the anchor")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from moeprof.evaluate.task import task_splits
    from moeprof.critical.search import find_critical
    from moeprof.evaluate.runners import perplexity_evaluator
    from moeprof.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    splits = task_splits(model, tok, task=args.task, type=args.type, seq_len=args.seq_len, max_tokens=args.tokens)
    cal = perplexity_evaluator(model, splits.calibration_tokens, type=args.type, proxies=True)
    dense = cal(None)
    if args.p0 is None:
        p0 = find_critical(cal, target=args.target, type=args.type, task=args.task, dense=dense, extend=True).critical_p
    else:
        p0 = args.p0
    from moeprof.schedule import uniform

    shape = uniform(model, type=args.type, p=p0).p.shape  # [L, E] (E = 1 for a dense model)
    L = shape[0]

    L = shape[0]
    runs: list[dict] = []

    def kl_eval(table: torch.Tensor) -> tuple[float, float]:  # one calibration forward with the KL proxy
        r = cal(table)
        runs.append({"ratio": r.score / dense.score, "kl": r.extra["kl"], "s": r.sparsity_flop_overall})
        print(json.dumps({**runs[-1], "t": round(time.perf_counter() - t0)}), flush=True)
        return float(r.extra["kl"]), float(r.sparsity_flop_overall)

    start = np.full(shape, float(p0))
    groups = layer_groups(L, -(-L // args.group))  # groups of `--group` consecutive layers
    # one round of the optimizer's own reallocation: the probes, the local model, its optimum, checked by a probe
    table, rounds = marginal_reallocation(kl_eval, start, groups, rounds=1, delta=args.delta, trust=args.trust)
    r = rounds[0]
    base, cand = runs[0], runs[-1]  # the start; the last candidate probed
    a, b = np.array(r.curvature), np.array(r.marginal)

    def cost(x: np.ndarray) -> float:  # the local model's KL increase for shares x
        return float(np.nansum(a * x * x + b * x))

    G = len(groups)
    even = cost(np.full(G, 0.05 / G))  # +5 points spread evenly
    lo_b, hi_b = 0.0, 1.0  # +5 points at least KL: bisection on the budget of the same water-filling
    coef = np.column_stack([np.nan_to_num(a), np.nan_to_num(b), np.zeros(G)])
    for _ in range(50):
        mid = (lo_b + hi_b) / 2
        x = water_fill(coef, np.full(G, -1.0), np.full(G, 1.0), mid, steps=2000)
        lo_b, hi_b = (lo_b, mid) if x.sum() >= 0.05 else (mid, hi_b)
    if not np.all(np.nan_to_num(a) > 0):  # a group fitted linear would take the whole +5 points: extrapolation
        hi_b = None
    held_d = splits.heldout(None)
    held_u = splits.heldout(torch.as_tensor(start))
    held_a = splits.heldout(torch.as_tensor(table)) if r.accepted else None
    summary = {
        "model": args.model, "tokens": args.tokens, "group": args.group, "groups": G, "delta": args.delta,
        "trust": r.trust, "p0": p0, "candidates": r.candidates, "accepted": r.accepted,
        "marginal_kl_per_sparsity": b.tolist(), "curvature": a.tolist(),
        "predicted_gain_points": 100 * r.predicted, "p_allocation": np.round(np.nanmax(table, axis=1), 4).tolist(),
        "kl_increase_for_5_points": {"even": even, "best_allocation": hi_b, "uniform_kl": base["kl"]},
        "calibration": {"uniform": base, "allocation": cand},
        "heldout": {"uniform": {"s": held_u.sparsity_flop_overall, "ratio": held_u.score / held_d.score},
                    "allocation": None if held_a is None else {"s": held_a.sparsity_flop_overall,
                                                               "ratio": held_a.score / held_d.score}},
        "realized_gain_points_calibration": 100 * (cand["s"] - base["s"]),
        "wall_s": time.perf_counter() - t0,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

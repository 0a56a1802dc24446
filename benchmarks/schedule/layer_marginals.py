"""How much can ANY per-layer reallocation of p gain over uniform p? Measure the layers' marginal costs jointly.

At the uniform critical p0 (found by `find_critical` on the calibration split), every layer sits at p0; then each
group of `--group` consecutive layers is moved to p0 − δ and to p0 + δ with all other layers at p0, and the
calibration KL(dense ‖ sparsified) per token and the FLOP-weighted sparsity are measured (2·G + 1 evaluations).
KL, unlike the perplexity ratio, is smooth in p (the ratio's jitter between neighbouring p is a third of the 1 %
budget at 2,048 tokens), and its mean is close to the NLL increase the constraint limits.

From the three points per group, a convex quadratic KL_g(x_g) in the group's share x_g of the overall sparsity
(`moeprof.critical.allocate._quadratic`); with the groups' KL additive, the allocation maximizing Σ x_g at the KL of
uniform p0 is the optimum of that local model (`water_fill`; each group moves at most `--trust`·δ in p). That predicted gain is the reallocation's headroom to
first and second order; the allocation is then evaluated for real on the calibration and held-out splits, beside
uniform p0.

    PYTHONPATH=. python benchmarks/schedule/layer_marginals.py --model smollm2 --tokens 4096 --group 5
    PYTHONPATH=. python benchmarks/schedule/layer_marginals.py --model tiny-moe --tokens 8192 --group 1

Prints one JSON line per evaluation and a summary line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from moeprof.critical.allocate import _quadratic as quadratic
from moeprof.critical.allocate import water_fill


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

    from moeprof.critical.allocate import task_splits
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
    from moeprof.schedule import Schedule

    shape = Schedule.uniform(model, type=args.type, p=p0).p.shape  # [L, E] (E = 1 for a dense model)
    L = shape[0]

    def run(p_layers: np.ndarray, label: str) -> dict:
        table = torch.as_tensor(np.repeat(p_layers[:, None], shape[1], axis=1), dtype=torch.float32)
        r = cal(table)
        row = {"label": label, "ratio": r.score / dense.score, "kl": r.extra["kl"], "s": r.sparsity_flop_overall,
               "t": round(time.perf_counter() - t0)}
        print(json.dumps(row), flush=True)
        return {**row, "point": r}

    base = run(np.full(L, p0), f"uniform p0 {p0:.4f}")
    groups = [list(range(g, min(g + args.group, L))) for g in range(0, L, args.group)]
    xs, ks, ps = [], [], []
    for idx in groups:
        rows = {}
        for dp in (-args.delta, args.delta):
            p = np.full(L, p0)
            p[idx] = min(p0 + dp, 1.0)
            rows[dp] = run(p, f"layers {idx[0]}-{idx[-1]} p {p0 + dp:.4f}")
        # the group's share of the overall FLOP-weighted sparsity: its change moves the overall one-for-one
        x = np.array([rows[-args.delta]["s"], base["s"], rows[args.delta]["s"]])
        xs.append(x - base["s"])
        ks.append(np.array([rows[-args.delta]["kl"], base["kl"], rows[args.delta]["kl"]]))
        ps.append(np.array([p0 - args.delta, p0, min(p0 + args.delta, 1.0)]))
    coef = np.array([quadratic(x, k - base["kl"]) for x, k in zip(xs, ks)])
    # trust region: trust·(the measured move) either way, linear in p
    lo = np.array([args.trust * x[2] for x in xs])
    hi = np.array([args.trust * x[0] for x in xs])
    x_opt = water_fill(coef, lo, hi, 0.0)  # at the KL of uniform p0 (the q_g are relative to it)
    p_opt = np.full(L, p0)
    for g, idx in enumerate(groups):  # x → p along the measured points (linear, extrapolated in the trust region)
        side = 0 if x_opt[g] >= 0 else 2  # xs[g] = [x at p0 − δ (> 0), 0, x at p0 + δ (< 0)]
        slope = (ps[g][side] - p0) / xs[g][side] if xs[g][side] != 0 else 0.0
        p_opt[idx] = min(1.0, p0 + slope * x_opt[g])
    predicted_gain = float(x_opt.sum())
    alloc = run(p_opt, "local-model optimum")
    held_u = splits.heldout(torch.full(shape, float(p0)))
    held_a = splits.heldout(torch.as_tensor(np.repeat(p_opt[:, None], shape[1], axis=1), dtype=torch.float32))
    held_d = splits.heldout(None)
    summary = {
        "model": args.model, "tokens": args.tokens, "group": args.group, "delta": args.delta, "p0": p0,
        "marginal_kl_per_sparsity": [float(c[1]) for c in coef],  # dKL/dx at x0 (b of the quadratic)
        "predicted_gain_points": 100 * predicted_gain, "p_allocation": np.round(p_opt, 4).tolist(),
        "calibration": {"uniform": {"s": base["s"], "kl": base["kl"], "ratio": base["ratio"]},
                        "allocation": {"s": alloc["s"], "kl": alloc["kl"], "ratio": alloc["ratio"]}},
        "heldout": {"uniform": {"s": held_u.sparsity_flop_overall, "ratio": held_u.score / held_d.score},
                    "allocation": {"s": held_a.sparsity_flop_overall, "ratio": held_a.score / held_d.score}},
        "realized_gain_points_calibration": 100 * (alloc["s"] - base["s"]),
        "wall_s": time.perf_counter() - t0,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

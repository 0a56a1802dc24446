"""Evaluations per critical search, before and after the aimed scan (issue 26), on real evaluators.

    PYTHONPATH=. python benchmarks/critical/evaluations.py --models tiny-moe qwen3-30b-a3b-shape smollm2

"before" is the search as it was: the fixed scan (0.9, 0.7, then p_min), and the check one scan step below the
first failure; "after" is the default now: the scan aims each step at the crossing the ratios seen predict, and
nothing below a failure is evaluated. Both searches run on the same deterministic evaluator (perplexity of type i
top-p, dense cached), memoized by p so the second search reuses the first one's forwards; each counts its own.
tiny-moe: held-out Wikipedia, --tokens tokens; the 30B-A3B-shaped model (random weights, 2 layers, vocab 8192):
random token ids, --tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import moeprof.critical.search as search


def evaluator(name: str, tokens: int, seq_len: int):
    from moeprof.evaluate.runners import perplexity_evaluator

    if name == "qwen3-30b-a3b-shape":
        from moeprof.models import build_random, config_from_recipe
        from moeprof.recipes import read_toml

        model = build_random(config_from_recipe(read_toml("recipes/qwen3-30b-a3b.toml")), layers=2, vocab_size=8192)
        g = torch.Generator().manual_seed(0)
        sequences = torch.randint(0, 8192, (max(1, tokens // seq_len), seq_len), generator=g)
    else:
        from moeprof.critical.pipeline import resolve_task
        from moeprof.evaluate.perplexity import sequences_from_file
        from moeprof.models import load_model

        model, tokenizer = load_model(name)
        text = resolve_task("ppl:wikipedia").text_file()
        sequences = sequences_from_file(tokenizer, text, seq_len=seq_len, max_tokens=tokens)
    inner = perplexity_evaluator(model, sequences, type="i", batch_size=4)
    memo = {}

    def evaluate(p):
        key = None if p is None else round(float(p), 10)
        if key not in memo:
            memo[key] = inner(p)
        pt = memo[key]
        return type(pt)(**{**pt.__dict__})  # a fresh point each time (the search sets its p)

    return evaluate, memo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-moe", "qwen3-30b-a3b-shape"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        t0 = time.perf_counter()
        evaluate, memo = evaluator(name, args.tokens, args.seq_len)
        rows = {}
        for label, aimed, check in (("before", 0, True), ("after", search.MAX_AIMED_STEPS, False)):
            saved = search.MAX_AIMED_STEPS
            search.MAX_AIMED_STEPS = aimed  # 0: every step falls back to the fixed scan points
            try:
                res = search.find_critical(evaluate, check=check, extend=True)
            finally:
                search.MAX_AIMED_STEPS = saved
            rows[label] = {"evaluations": res.num_evaluations, "critical_p": round(res.critical_p, 4),
                           "failing_p": res.failing_p and round(res.failing_p, 4),
                           "p_evaluated": [None if pt.p is None else round(pt.p, 4) for pt in res.points]}
        print(json.dumps({"model": name, "tokens": args.tokens, "distinct_forwards": len(memo),
                          "wall_s": round(time.perf_counter() - t0, 1), **rows}), flush=True)


if __name__ == "__main__":
    main()

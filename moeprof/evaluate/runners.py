"""Evaluation callables `evaluate(p) -> EvalPoint` for the critical search, and the search end to end.

`perplexity_evaluator` (score 1/ppl on packed sequences; proxies optional) and `lm_eval_evaluator` (an lm-eval
task's metric through `MoeprofLM`, with per-document scores from lm-eval's logged samples) each run the dense
model once (p=None, cached) and every other p inside `moeprof.capture.sparsify`, recording realized sparsity.
`critical_sparsity(model, tokenizer, type=..., task=...)` picks one from a task string ("ppl:FILE", "ppl:wikipedia"
for moeprof's held-out corpus, or an lm-eval task name) and runs `moeprof.critical.find_critical`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from moeprof.critical import CriticalResult, EvalPoint, Evaluate, find_critical, point_from_realized
from moeprof.evaluate.perplexity import DenseReference, perplexity, sequences_from_file


def perplexity_evaluator(model: torch.nn.Module, sequences: torch.Tensor, *, type: str, rule: str = "topp",
                         batch_size: int = 8, proxies: bool = False, layers: Sequence[int] | None = None,
                         experts: Sequence[int] | None = None) -> Evaluate:
    """Return evaluate(p): score 1/ppl on `sequences` [N, T] with `type` sparsified by `rule` at p (None: dense).

    The dense pass runs once (on the first call, whatever p) and is cached; proxies=True also keeps the dense
    log-probs (memory: see `moeprof.evaluate.perplexity`) and adds `kl` and `top1_agreement` to `extra`.
    """
    from moeprof.capture import sparsify

    state: dict = {}

    def reference() -> DenseReference:
        if "ref" not in state:
            state["ref"] = DenseReference(model, sequences, batch_size=batch_size, keep_logprobs=proxies)
        return state["ref"]

    def evaluate(p: float | None) -> EvalPoint:
        t0 = time.perf_counter()
        ref = reference()
        if p is None:
            res, realized = ref.result, None
        else:
            with sparsify(model, type=type, rule=rule, p=p, layers=layers, experts=experts) as realized:
                res = perplexity(model, reference=ref)
        return point_from_realized(
            p, res.score, realized, score_kind="inv_ppl", example_values=res.seq_nll, example_weights=res.seq_tokens,
            extra={"ppl": res.ppl, "kl": res.kl if proxies else None,
                   "top1_agreement": res.top1_agreement, "wall_s": time.perf_counter() - t0})

    return evaluate


def _per_doc_scores(samples: list[dict], metric: str) -> np.ndarray:
    """Return per-document values [N] of `metric` ("acc", "acc_norm", "exact_match,strict-match") by doc_id."""
    name, _, filt = metric.partition(",")
    rows = [s for s in samples if not filt or s.get("filter", "none") == filt]
    if not rows or name not in rows[0]:
        keys = sorted(k for k in (samples[0] if samples else {}) if not k.startswith(("doc", "arguments", "resps")))
        raise KeyError(f"lm-eval's samples carry no metric {metric!r}; available: {', '.join(keys)}")
    rows.sort(key=lambda s: s["doc_id"])
    return np.array([float(s[name]) for s in rows], dtype=np.float64)


def lm_eval_evaluator(model: torch.nn.Module, tokenizer, task: str, *, type: str, rule: str = "topp",
                      limit: int | float | None = None, batch_size: int = 8, metric: str | None = None,
                      num_fewshot: int | None = None, include_path: str | Path | None = None,
                      layers: Sequence[int] | None = None, experts: Sequence[int] | None = None) -> Evaluate:
    """Return evaluate(p): the task's metric (mean over documents) with `type` sparsified at p (None: dense).

    `task` is one of moeprof's offline tasks (plain or moeprof_ name; its data must be prepared) — or, with
    `include_path`, any task name lm-eval finds there. `metric` defaults to the task's (TaskSpec.metric).
    Per-document scores come from lm-eval's logged samples, for the bootstrap.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from moeprof.evaluate.lm_eval_model import MoeprofLM

    if include_path is None:
        from moeprof.evaluate import tasks as offline

        spec = offline.resolve_task(task)
        offline.task_data(spec.name)  # TaskDataMissing says how to prepare it
        task_name, metric = spec.lm_eval_name, metric or spec.metric
        include_path = offline.lm_eval_task_dir()
    else:
        task_name, metric = task, metric or "acc"
    manager = TaskManager(include_path=str(include_path))
    lm = MoeprofLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

    def evaluate(p: float | None) -> EvalPoint:
        t0 = time.perf_counter()
        lm.set_sparsity(None if p is None else type, p, rule=rule, layers=layers, experts=experts)
        out = simple_evaluate(model=lm, tasks=[task_name], task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0)
        values = _per_doc_scores(out["samples"][task_name], metric)
        return point_from_realized(p, float(values.mean()), lm.realized, score_kind="mean", example_values=values,
                                   extra={"metric": metric, "task": task_name, "wall_s": time.perf_counter() - t0})

    return evaluate


def critical_sparsity(model: torch.nn.Module, tokenizer, *, type: str, task: str, rule: str = "topp",
                      target: float = 0.99, limit: int | None = None, batch_size: int = 8, seq_len: int = 512,
                      max_tokens: int = 32768, proxies: bool = False, metric: str | None = None,
                      **search) -> CriticalResult:
    """Return the CriticalResult of `model` for activation `type` on `task`.

    task: "ppl:FILE" (perplexity of a text/JSONL file), "ppl:wikipedia" / "ppl:owt" / "ppl:mixed" (moeprof's
    held-out corpora), or an offline lm-eval task name ("hellaswag", "arc_easy", …). `limit`: documents per
    lm-eval evaluation, or packed sequences for perplexity. `search` goes to `find_critical` (tol, p_min, check, …).
    """
    if task.startswith("ppl:"):
        source = task[4:]
        from moeprof import corpora

        path = corpora.text_file(source, "heldout") if source in corpora.NAMES else Path(source)
        sequences = sequences_from_file(tokenizer, path, seq_len=seq_len, max_tokens=max_tokens)
        if limit is not None:
            sequences = sequences[:limit]  # for perplexity, `limit` counts packed sequences
        evaluate = perplexity_evaluator(model, sequences, type=type, rule=rule, batch_size=batch_size,
                                        proxies=proxies)
        chance = None
    else:
        from moeprof.evaluate import tasks as offline

        spec = offline.resolve_task(task)
        evaluate = lm_eval_evaluator(model, tokenizer, spec.name, type=type, rule=rule, limit=limit,
                                     batch_size=batch_size, metric=metric)
        chance, task = spec.chance, spec.name
    return find_critical(evaluate, target=target, rule=rule, chance=chance, type=type, task=task, **search)


def tolerance_split_damage(model, tokenizer, *, tokens: int, ps: Sequence[float], type: str = "i",
                           text: str = "mixed") -> list[dict]:
    """Return, per p, the NLL increase and realized sparsity of sparsifying the tolerant vs the sensitive half.

    Validates the per-expert tolerance estimate: in every layer, experts are split by their estimated relative
    output error at p (`expert_tolerance_of_model`) into the lower half ("tolerant") and the upper half
    ("sensitive"); each half alone is sparsified at p on held-out text of corpus `text`.
    """
    from moeprof import corpora
    from moeprof.capture import sparsify
    from moeprof.critical import expert_tolerance_of_model

    seq = sequences_from_file(tokenizer, corpora.text_file(text, "heldout"), seq_len=256, max_tokens=tokens)
    tol = expert_tolerance_of_model(model, seq, type=type)
    ref = DenseReference(model, seq, batch_size=8, keep_logprobs=False)
    dense_nll = float(np.log(ref.result.ppl))
    L, E = tol.tokens.shape
    rows = []
    for p in ps:
        j = int(np.argmin(np.abs(tol.p_grid - p)))
        order = np.argsort(tol.rel_error[:, :, j], axis=1)  # [L, E] most tolerant first
        row = {"p": float(tol.p_grid[j])}
        for name, chosen in (("tolerant", order[:, : E // 2]), ("sensitive", order[:, E // 2:])):
            table = torch.full((L, E), float("nan"))
            for layer in range(L):
                table[layer, chosen[layer]] = float(tol.p_grid[j])
            with sparsify(model, type=type, p=table) as realized:
                res = perplexity(model, reference=ref)
            row[name] = {"delta_nll": float(np.log(res.ppl)) - dense_nll,
                         "sparsity": realized.token_weighted, "vectors": int(realized.tokens.sum())}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m moeprof.evaluate.runners MODEL TYPE TASK [options]`: one critical search, printed as JSON lines.

    The figures quoted in the notes come from this (the `moeprof critical` command is the user-facing one).
    """
    import argparse
    import json

    from moeprof.models import load_model

    ap = argparse.ArgumentParser(prog="python -m moeprof.evaluate.runners")
    ap.add_argument("model")
    ap.add_argument("type", choices=("x", "u", "g", "i"))
    ap.add_argument("task", help="ppl:FILE | ppl:wikipedia | an offline task name")
    ap.add_argument("--rule", default="topp")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)

    def show(pt: EvalPoint) -> None:
        print(json.dumps({"p": pt.p, "score": pt.score, "sparsity_token": pt.sparsity_token,
                          "sparsity_flop": pt.sparsity_flop, "wall_s": round(pt.extra.get("wall_s", 0.0), 2)}),
              flush=True)

    res = critical_sparsity(model, tok, type=args.type, task=args.task, rule=args.rule, target=args.target,
                            limit=args.limit, batch_size=args.batch_size, seq_len=args.seq_len,
                            max_tokens=args.max_tokens, check=not args.no_check, on_point=show)
    out = {k: v for k, v in res.to_dict().items() if k not in ("points", "per_expert_sparsity")}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

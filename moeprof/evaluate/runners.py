"""Evaluation callables `evaluate(p) -> EvalPoint` for the critical search (`moeprof.critical.find_critical`).

`perplexity_evaluator` (score 1/ppl on packed sequences; proxies optional) and `lm_eval_evaluator` (an lm-eval
task's metric through `MoeprofLM`, with per-document scores from lm-eval's logged samples) each run the dense
model once (p=None, cached) and every other p inside `moeprof.capture.sparsify`, recording realized sparsity.
`moeprof.critical.critical_sparsity` picks one from a task string and runs the search.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from moeprof.evaluate.point import EvalPoint, Evaluate, point_from_realized
from moeprof.evaluate.perplexity import DenseReference, perplexity


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


# lm-eval's `simple_evaluate` runs `git describe --always` in the working directory for its results' git_hash;
# outside a repository git prints this on the inherited stderr, once per evaluation (a search makes ~10).
GIT_NOISE = ("fatal: not a git repository",)


@contextmanager
def child_stderr_without(prefixes: tuple[str, ...]):
    """Within: lines that child processes write to this process's stderr (file descriptor 2) and that start with
    one of `prefixes` are dropped; every other line is passed on. Python's own `sys.stderr` (lm-eval's logs and
    progress bars) stays live and untouched.

    How: fd 2 points at a pipe drained by a thread that forwards lines to the real stderr, while `sys.stderr`
    writes to a duplicate of the real fd 2; both are restored on exit. (Where `sys.stderr` is not fd 2, e.g.
    under pytest's capture, it is left alone.)"""
    sys.stderr.flush()
    try:
        real = os.dup(2)
    except OSError:  # no stderr at all: nothing to filter
        yield
        return
    read_end, write_end = os.pipe()

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not line.decode("utf-8", "replace").startswith(prefixes):
                    os.write(real, line)

    drain = threading.Thread(target=forward, daemon=True)
    drain.start()
    py_stderr = None
    try:
        if sys.stderr.fileno() == 2:  # keep Python's own writes live on the real stderr
            py_stderr = open(os.dup(real), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    except (AttributeError, OSError, ValueError):  # (a captured or replaced sys.stderr has no usable fileno)
        pass
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        if py_stderr is not None:
            with redirect_stderr(py_stderr):
                yield
        else:
            yield
    finally:
        os.dup2(real, 2)  # closes the pipe's last write end: the drain thread sees EOF
        drain.join(timeout=5)
        os.close(real)
        if py_stderr is not None:
            py_stderr.close()


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

        spec = offline.task_spec(task)
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
        with child_stderr_without(GIT_NOISE):
            out = simple_evaluate(model=lm, tasks=[task_name], task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0)
        values = _per_doc_scores(out["samples"][task_name], metric)
        return point_from_realized(p, float(values.mean()), lm.realized, score_kind="mean", example_values=values,
                                   extra={"metric": metric, "task": task_name, "wall_s": time.perf_counter() - t0})

    return evaluate

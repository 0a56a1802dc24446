"""How a task's score reads in a table: perplexity for a perplexity task, accuracy for an lm-eval task.

Inside moeprof every score is "higher is better" (DESIGN §1): 1/ppl for perplexity (`EvalPoint.score_kind ==
"inv_ppl"`), the mean accuracy for an lm-eval task ("mean"), and the target is checked on the ratio of those
scores. Researchers read perplexity, so tables print perplexity and how many times the dense perplexity it is,
and keep the internal ratio (the criterion) beside it, labelled. Worked example, dense ppl 150, sparse ppl 160:

    score_cells(1/160, (1/160) / (1/150), "inv_ppl")  ->  ["160", "1.0667", "0.9375"]
    score_columns("inv_ppl")                          ->  ["perplexity", "ppl ÷ dense", "score ratio (dense ppl ÷ ppl)"]
    score_cells(0.41, 0.41 / 0.43, "mean")             ->  ["0.4100", "0.9535"]

Pure Python: no torch, no h5py.
"""

from __future__ import annotations

import math

PERPLEXITY = "inv_ppl"
ACCURACY = "mean"


def score_kind(task: str | None = None, kind: str | None = None) -> str:
    """Return the score kind ("inv_ppl" or "mean"): `kind` when a record or point kept it, else from the task name
    ("ppl:…" is perplexity; an older record without `score_kind` is read this way)."""
    if kind in (PERPLEXITY, ACCURACY):
        return kind
    return PERPLEXITY if str(task or "").startswith("ppl:") else ACCURACY


def score_name(kind: str) -> str:
    """Return what the score is called in a table: "perplexity" or "accuracy"."""
    return "perplexity" if kind == PERPLEXITY else "accuracy"


def score_value(score: float, kind: str) -> float:
    """Return the number researchers read: the perplexity 1/score (inf for a score of 0), or the accuracy."""
    if kind != PERPLEXITY:
        return float(score)
    score = float(score)
    return math.inf if score == 0 else 1.0 / score


def format_score(score: float, kind: str) -> str:
    """Return a score as it reads: "149.7" (perplexity, 4 significant digits) or "0.4100" (accuracy)."""
    v = score_value(score, kind)
    return f"{v:.4g}" if kind == PERPLEXITY else f"{v:.4f}"


def score_columns(kind: str) -> list[str]:
    """Return the column headers of `score_cells` for this kind."""
    if kind == PERPLEXITY:
        return ["perplexity", "ppl ÷ dense", "score ratio (dense ppl ÷ ppl)"]
    return ["accuracy", "ratio"]


def score_cells(score: float, ratio: float, kind: str) -> list[str]:
    """Return the cells of one evaluated point: its perplexity, ppl ÷ dense ppl (= 1/ratio) and the internal ratio
    the target is checked on; or its accuracy and the accuracy ratio. `ratio` is score / dense score."""
    if kind == PERPLEXITY:
        inv = math.inf if float(ratio) == 0 else 1.0 / float(ratio)
        return [format_score(score, kind), f"{inv:.4f}", f"{float(ratio):.4f}"]
    return [format_score(score, kind), f"{float(ratio):.4f}"]


def score_phrase(score: float, kind: str) -> str:
    """Return a score in words for a log line: "ppl 149.7 (score 1/ppl 0.006679)" or "accuracy 0.4100"."""
    if kind == PERPLEXITY:
        return f"ppl {format_score(score, kind)} (score 1/ppl {float(score):.5g})"
    return f"accuracy {format_score(score, kind)}"

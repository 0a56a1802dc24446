"""One full evaluation of a (sparsified) model: `EvalPoint`, what an `Evaluate` callable returns.

Plain data (numpy only): the evaluators (`moeprof.evaluate.runners`) build these and the critical-sparsity
search (`moeprof.critical.search`) consumes them, so both import it from here and neither imports the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

SCORE_KINDS = ("mean", "inv_ppl")


@dataclass
class EvalPoint:
    """One full evaluation: the score at parameter p (None = dense) and the sparsity actually realized.

    `example_values` / `example_weights` hold per-example results for the bootstrap: for kind "mean" the score
    is sum(values) / sum(weights) (weights default to 1: accuracy per document); for kind "inv_ppl" values are
    per-sequence NLL sums (nats) and weights their token counts, score = exp(-sum(values) / sum(weights)).
    """

    p: float | None
    score: float
    sparsity_token: float = float("nan")  # realized, token-weighted over sparsified vectors
    sparsity_flop: float = float("nan")  # realized, weighted by each expert's FLOPs per token
    score_kind: str = "mean"
    example_values: np.ndarray | None = None  # [N]
    example_weights: np.ndarray | None = None  # [N]
    per_expert_sparsity: np.ndarray | None = None  # [L, E] realized, NaN where never sparsified
    extra: dict = field(default_factory=dict)  # e.g. other metrics, wall time
    # realized FLOP-weighted over ALL the FFN work, experts left dense (NaN p) counting 0: what a schedule is judged by
    sparsity_flop_overall: float = float("nan")

    def __post_init__(self):
        if self.score_kind not in SCORE_KINDS:
            raise ValueError(f"unknown score kind {self.score_kind!r}; choose one of {', '.join(SCORE_KINDS)}")
        if self.example_values is not None:
            self.example_values = np.asarray(self.example_values, dtype=np.float64)
            if self.example_weights is None:
                self.example_weights = np.ones_like(self.example_values)
            self.example_weights = np.asarray(self.example_weights, dtype=np.float64)
            if self.example_weights.shape != self.example_values.shape:
                raise ValueError("example_values and example_weights must have the same shape")

    def score_of(self, idx: np.ndarray) -> np.ndarray:
        """Return the score recomputed on resampled example indices idx [B, N] -> [B]."""
        v = self.example_values[idx].sum(axis=-1)
        w = self.example_weights[idx].sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return v / w if self.score_kind == "mean" else np.exp(-v / w)

    def to_dict(self) -> dict:
        """Return the point as plain Python data (per-example arrays left out; per-expert as nested lists)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("example_values", "example_weights")}
        d["num_examples"] = None if self.example_values is None else int(self.example_values.size)
        if self.per_expert_sparsity is not None:
            d["per_expert_sparsity"] = np.asarray(self.per_expert_sparsity).tolist()
        return d


Evaluate = Callable[[float | None], EvalPoint]


def point_from_realized(p: float | None, score: float, realized=None, **kw) -> EvalPoint:
    """Return an EvalPoint filling the realized sparsity from a `moeprof.capture.Realized` recorder (or None)."""
    if realized is None:
        return EvalPoint(p=p, score=score, **kw)
    per = realized.per_expert()
    return EvalPoint(p=p, score=score, sparsity_token=float(realized.token_weighted),
                     sparsity_flop=float(realized.flop_weighted),
                     sparsity_flop_overall=float(realized.overall_flop_weighted),
                     per_expert_sparsity=per.cpu().numpy() if hasattr(per, "cpu") else np.asarray(per), **kw)

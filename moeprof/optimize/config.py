"""The schedule optimizer's settings: one dataclass, validated where it is built, and the defaults it starts from.

    config = OptimizeConfig(type="i", task="ppl:wikipedia", target=0.99, method="marginal")
    run = optimize_schedule(model, tokenizer, config)

A bad value raises OptimizeConfigError (a ValueError) naming the command-line flag and the field, before any
model work starts. Pure Python: the CLI builds and checks a config without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeprof.activation_types import ACTIVATION_TYPES
from moeprof.errors import MoeprofError
from moeprof.rules import SEARCHABLE_RULES, rule as rule_of

# 0.2 … 0.9 every 0.025, 0.9 … 0.975 every 0.0125, then 0.98 … 0.995 every 0.005: a sensitive model (SmolLM2's
# uniform critical p is ~0.93-0.95) operates near 1, where one grid step is a large change of sparsity
DEFAULT_GRID = tuple(sorted({round(0.2 + 0.025 * k, 4) for k in range(32)}
                            | {0.9125, 0.9375, 0.9625, 0.98, 0.985, 0.99, 0.995}))
DEFAULT_MIN_TOKENS = 16
DEFAULT_MAX_EVALS = 20
DEFAULT_VERDICT_EVALS = 6  # held-out evaluations of uniform p that find its p at the schedule's held-out score
DEFAULT_CONFIDENCE = 0.9  # the acceptance margin (`moeprof.optimize.margin`): docs/schedules.md argues the value
LAMBDA_RUNGS = 256
DEFAULT_MARGINAL_GROUPS = 10  # at most this many layer groups (consecutive layers): 2 probes each per round
DEFAULT_MARGINAL_DELTA = 0.02  # the probe move in p, both ways
DEFAULT_MARGINAL_TRUST = 2.0  # a round moves a group at most trust · delta in p
DEFAULT_MARGINAL_ROUNDS = 3
METHODS = ("lagrangian", "marginal")
ANCHOR_SEARCHES = ("critical", "grid")


class OptimizeConfigError(MoeprofError, ValueError):
    """A schedule-optimizer setting that cannot work (the message names the flag, the field and the fix)."""


@dataclass(frozen=True)
class OptimizeConfig:
    """What `optimize_schedule` fits: activation `type` by `rule` on `task`, keeping score ≥ target × dense.

    Data: `seq_len` / `max_tokens` / `limit` / `batch_size` build the task's calibration and held-out splits
    (`moeprof.evaluate.task.task_splits`). Budget: `max_evals` full evaluations, dense included; experts with fewer
    than `min_tokens` calibration tokens stay dense. `model_id`: what the schedule records (default: the loaded
    model's id). See `optimize_schedule` for the method settings (anchor, probes, method "marginal").
    """

    type: str
    task: str
    target: float = 0.99
    rule: str = "topp"
    # the margin: a table is accepted when the one-sided lower bound of its calibration ratio at this confidence
    # (paired bootstrap, on each part of the task) clears the target (`moeprof.optimize.margin`); 0.5: no margin
    confidence: float = DEFAULT_CONFIDENCE
    # the verdict (`moeprof.optimize.verdict`): held-out evaluations bisecting the uniform p at the schedule's score
    verdict_evals: int = DEFAULT_VERDICT_EVALS
    model_id: str | None = None
    max_evals: int = DEFAULT_MAX_EVALS
    min_tokens: int = DEFAULT_MIN_TOKENS
    seq_len: int = 256
    max_tokens: int = 8192
    limit: int | None = None
    batch_size: int = 8
    p_grid: tuple = DEFAULT_GRID
    # the multiplier method's layer probes
    layer_probe_sequences: int = 8
    probe_floor: bool = False
    two_point_probes: bool = False
    joint_probes: bool = False
    # the uniform anchor (None: on when the optimizer measures the curves and probes the layers, or for "marginal")
    anchor: bool | None = None
    anchor_search: str = "critical"
    anchor_start: float | None = None  # a uniform critical p known before (`critical.pipeline.stored_anchor`)
    anchor_source: dict | None = None  # what anchor_start came from (the provenance's `anchor_store`)
    # the method after the anchor
    method: str = "lagrangian"
    marginal_groups: int = DEFAULT_MARGINAL_GROUPS
    marginal_rounds: int = DEFAULT_MARGINAL_ROUNDS
    marginal_sequences: int | None = None  # calibration sequences of the KL probes (None: all)

    def __post_init__(self):
        def bad(flag: str, field: str, what: str) -> OptimizeConfigError:
            return OptimizeConfigError(f"{flag} {what} (OptimizeConfig.{field})")

        if self.type not in ACTIVATION_TYPES:
            raise bad("--type", "type", f"{self.type!r} is not an activation type; choose one of "
                                        f"{', '.join(ACTIVATION_TYPES)}")
        if self.rule not in SEARCHABLE_RULES:
            raise bad("--rule", "rule", f"{self.rule!r} cannot be optimized; choose one of "
                                        f"{', '.join(SEARCHABLE_RULES)}")
        if not 0.0 < self.target <= 1.0:  # (NaN fails this too)
            raise bad("--target", "target", f"must lie in (0, 1] (a fraction of the dense score, e.g. 0.99), got "
                                            f"{self.target}")
        if not 0.5 <= self.confidence < 1.0:  # (NaN fails this too)
            raise bad("--confidence", "confidence", f"must lie in [0.5, 1) (0.5: no margin, the point estimate; "
                                                    f"default 0.9), got {self.confidence}")
        if self.max_evals < 2:
            raise bad("--max-evals", "max_evals", f"must be at least 2 (dense and one schedule), got {self.max_evals}")
        for flag, field, value, least in (("--min-tokens", "min_tokens", self.min_tokens, 0),
                                          ("--seq-len", "seq_len", self.seq_len, 1),
                                          ("--max-tokens", "max_tokens", self.max_tokens, 1),
                                          ("--batch-size", "batch_size", self.batch_size, 1),
                                          ("--limit", "limit", 1 if self.limit is None else self.limit, 1),
                                          ("--verdict-evals", "verdict_evals", self.verdict_evals, 0),
                                          ("--marginal-groups", "marginal_groups", self.marginal_groups, 1),
                                          ("--marginal-rounds", "marginal_rounds", self.marginal_rounds, 1),
                                          ("--marginal-sequences", "marginal_sequences",
                                           1 if self.marginal_sequences is None else self.marginal_sequences, 1),
                                          ("layer_probe_sequences", "layer_probe_sequences",
                                           self.layer_probe_sequences, 0)):
            if value < least:
                raise bad(flag, field, f"must be at least {least}, got {value}")
        if self.method not in METHODS:
            raise bad("--method", "method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.anchor_search not in ANCHOR_SEARCHES:
            raise bad("anchor_search", "anchor_search", f"must be one of {', '.join(ANCHOR_SEARCHES)}, got "
                                                        f"{self.anchor_search!r}")
        if self.anchor_start is not None and not 0.0 <= self.anchor_start < 1.0:
            raise bad("--from", "anchor_start", f"must give a sparse uniform p in [0, 1), got {self.anchor_start}")
        if self.marginal and (self.anchor is False or rule_of(self.rule).dense != 1.0):
            raise bad("--method marginal", "method", "moves p toward dense at p = 1 from the uniform anchor: it needs "
                                                     f"anchor on and rule topp or topk (got anchor={self.anchor}, "
                                                     f"rule={self.rule!r})")

    @property
    def marginal(self) -> bool:
        """True for method "marginal" (layer groups reallocated from KL probes), False for "lagrangian"."""
        return self.method == "marginal"

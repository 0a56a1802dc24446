"""The sparsification rules: one table of what each rule's parameter means, where it is dense, and who runs it.

Every reader asks this table: the CLI (`--rule` choices), `Schedule` validation, the critical-sparsity search
(which rules it can search and in which direction), the optimizer, `capture`'s kernel dispatch, and
`moeprof.topp.rule_mask` (the mask function is named here and looked up in `moeprof.topp`). A new rule is one
`Rule(...)` entry below plus its mask function in `moeprof.topp`. Pure Python: the CLI reads it without torch.

    rule("maxp").dense      # 0.0: max-p keeps every entry at p = 0, and gets sparser as p grows
    SEARCHABLE_RULES        # ("topp", "topk", "maxp"): the rules a critical-sparsity search runs over
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeprof.errors import MoeprofError


@dataclass(frozen=True)
class Rule:
    """One sparsification rule: its parameter's meaning and range, its dense end, and who can run it."""

    name: str
    param: str  # what its parameter means (one phrase; help texts and docs read it)
    dense: float  # the parameter value that keeps every entry
    fraction: bool  # True: the parameter is a fraction in [0, 1]; False: a magnitude τ, any finite number >= 0
    kernel: bool  # True: `moeprof.kernels.grouped_topp_glu` computes it (MoE x / i); else the torch path runs
    searchable: bool  # True: the critical-sparsity search and the schedule optimizer can search its parameter
    mask: str  # the name of its mask function in `moeprof.topp`

    @property
    def mirrored(self) -> bool:
        """True when a larger parameter means sparser (the dense end is 0, not 1)."""
        return self.dense == 0.0

    def check(self, value: float) -> str | None:
        """Return why `value` is no parameter of this rule (one phrase naming the valid range), else None."""
        v = float(value)
        if self.fraction:
            return None if 0.0 <= v <= 1.0 else "p must lie in [0, 1]"
        return None if 0.0 <= v < math.inf else "a threshold τ must be a finite number >= 0"


RULE_TABLE = (
    Rule("topp", "keep the fewest largest |v| holding a fraction p of the L1 mass, the paper's", dense=1.0,
         fraction=True, kernel=True, searchable=True, mask="topp_mask"),
    Rule("topk", "keep a fraction p of the entries", dense=1.0, fraction=True, kernel=False, searchable=True,
         mask="topk_mask"),
    Rule("maxp", "keep |v| >= p·max|v|", dense=0.0, fraction=True, kernel=False, searchable=True,
         mask="maxp_mask"),
    Rule("threshold", "keep |v| >= τ, a static magnitude per expert (`moeprof schedule-thresholds`)", dense=0.0,
         fraction=False, kernel=False, searchable=False, mask="threshold_mask"),
)
RULES_BY_NAME = {r.name: r for r in RULE_TABLE}
RULES = tuple(RULES_BY_NAME)  # every rule name
SEARCHABLE_RULES = tuple(r.name for r in RULE_TABLE if r.searchable)
DEFAULT_RULE = "topp"


class UnknownRuleError(MoeprofError, ValueError):
    """A rule name not in the table (the message lists the ones there are)."""


def rule(name: str, choices: tuple[str, ...] = RULES) -> Rule:
    """Return the Rule called `name`; UnknownRuleError naming the `choices` otherwise."""
    if name not in choices:
        raise UnknownRuleError(f"unknown sparsification rule {name!r}; choose one of {', '.join(choices)}")
    return RULES_BY_NAME[name]


def rules_help(choices: tuple[str, ...] = SEARCHABLE_RULES) -> str:
    """Return the `--rule` help text: each rule of `choices` with what its parameter means."""
    return ("sparsification rule: " + ", ".join(f"{n} ({RULES_BY_NAME[n].param})" for n in choices)
            + f" (default {DEFAULT_RULE})")

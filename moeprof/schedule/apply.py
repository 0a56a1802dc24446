"""Applying sparsity to a model: `sparsify_` (in place, undone by its handle), `uniform`, and `setting`, the one
function that turns "a schedule, or type / rule / p / layers / experts" into what `moeprof.capture.sparsify` takes.

    s = moeprof.schedule.uniform(model, type="i", p=0.9)   # or Schedule.load("s.json"), or `moeprof schedule`
    handle = moeprof.schedule.sparsify_(model, s)           # in place, like torchao's quantize_
    model.generate(...)                                     # every forward runs the schedule
    handle.remove()                                         # the model is exactly what it was (also `with`)

    st = setting(schedule="s.json")                         # or setting(type="i", p=0.9, layers=[0, 3])
    table = st.table(model)                                 # [L, E] float64: the p of every (layer, expert)

The CLI (`eval`, `generate`), lm-eval's `MoeprofLM` and `sparsify_` all go through `setting`. It checks what can
be checked without a model (no torch import); `Setting.table` checks the rest against the loaded model. There is
one sparsification path: `moeprof.capture.sparsify` with the table.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from moeprof import __version__
from moeprof.activation_types import ACTIVATION_TYPES
from moeprof.rules import RULES, UnknownRuleError, rule as rule_of
from moeprof.schedule.data import Schedule, ScheduleError, as_schedule


def loaded_model_id(model) -> str:
    """Return the id a schedule records for a loaded model: `moeprof.models.model_id` of what `load_model` was
    given (the CLI's id), else its config's name_or_path, else its model_type."""
    if getattr(model, "moeprof_model_id", None):
        return str(model.moeprof_model_id)
    config = getattr(model, "config", None)
    return str(getattr(config, "name_or_path", "") or getattr(config, "model_type", ""))


def model_shape(model) -> dict:
    """Return the fingerprint {layers, experts, hidden, intermediate} of a model's FFN sites."""
    from moeprof.arch import adapter_for

    sites = adapter_for(model).sites(model)
    return {"layers": len(sites), "experts": max(s.num_experts for s in sites),
            "hidden": int(sites[0].hidden_size), "intermediate": int(max(s.intermediate_size for s in sites))}


def uniform(model, *, type: str, p: float, rule: str = "topp", model_id: str | None = None) -> Schedule:
    """Return the schedule giving every expert of every FFN site of `model` the same p (NaN where a layer has
    fewer experts than the widest: those entries do not exist)."""
    from moeprof.arch import adapter_for

    shape = model_shape(model)
    table = np.full((shape["layers"], shape["experts"]), float(p))
    for s in adapter_for(model).sites(model):
        table[s.row, s.num_experts:] = np.nan
    return Schedule(table, type, rule, model_id or loaded_model_id(model), shape,
                    provenance={"method": "uniform", "moeprof_version": __version__})


# ----------------------------------------------------------------------------------------------------------
# A schedule, or type / rule / p / layers / experts: the one decision


@dataclass(frozen=True)
class Setting:
    """What to sparsify: activation `type` by `rule`, with a schedule's per-expert table or a p (a number, or an
    [L, E] tensor) on the chosen `layers` / `experts` (None: all). Made by `setting`."""

    type: str
    rule: str
    p: Any = None  # None with a schedule
    layers: Sequence[int] | None = None
    experts: Sequence[int] | None = None
    schedule: Schedule | None = None

    def table(self, model, model_id: str | None = None):
        """Return the float64 torch tensor [L, E] of the rule's parameter per (layer, expert) of `model` (NaN =
        dense). ScheduleError when the schedule was made for a model of another shape (ScheduleModelWarning when
        only the id differs; `model_id` names this model); ValueError when layers / experts / p do not fit."""
        import torch

        from moeprof.arch import adapter_for
        from moeprof.capture import p_table

        sites = adapter_for(model).sites(model)
        if self.schedule is not None:
            self.schedule.check_shape(model_shape(model), model_id or loaded_model_id(model))
            return p_table(sites, torch.as_tensor(self.schedule.p, dtype=torch.float64))
        return p_table(sites, self.p, self.layers, self.experts)


def setting(*, schedule: Schedule | str | os.PathLike | None = None, type: str | None = None,
            rule: str = "topp", p: Any = None, layers: Sequence[int] | None = None,
            experts: Sequence[int] | None = None) -> Setting | None:
    """Return the Setting of a schedule (a Schedule or the path of its file), or of type + rule + p (+ layers /
    experts); None when neither is given (dense). ScheduleError (a ValueError) names the fix when both are given,
    when only one of type and p is, or when type, rule or a numeric p is not one (see `moeprof.rules`)."""
    if schedule is not None:
        if type is not None or p is not None or layers is not None or experts is not None:
            raise ScheduleError("give either a schedule or type= / p= / layers= / experts=, not both")
        schedule = as_schedule(schedule)
        return Setting(schedule.type, schedule.rule, schedule=schedule)
    if type is None and p is None:
        return None
    if type is None or p is None:
        raise ScheduleError("give both type= and p= to sparsify (or neither for the dense model)")
    if type not in ACTIVATION_TYPES:
        raise ScheduleError(f"type={type!r}: unknown activation type; choose one of {', '.join(ACTIVATION_TYPES)}")
    try:
        r = rule_of(rule)
    except UnknownRuleError:
        raise ScheduleError(f"rule={rule!r}: unknown sparsification rule; choose one of {', '.join(RULES)}") from None
    if isinstance(p, numbers.Real) and not isinstance(p, bool):
        why = r.check(p)
        if why is not None:
            raise ScheduleError(f"p={p!r}: {why}" + (", e.g. p=0.9" if r.fraction else ""))
    return Setting(type, rule, p, layers, experts)


# ----------------------------------------------------------------------------------------------------------
# In place, with a handle


class SparsifyHandle:
    """What `sparsify_` returns: `.realized` (the Realized recorder) and `.remove()` (restore the model)."""

    def __init__(self, stack: contextlib.ExitStack, realized, schedule: Schedule):
        self._stack = stack
        self.realized = realized
        self.schedule = schedule

    @property
    def active(self) -> bool:
        return self._stack is not None

    def remove(self) -> None:
        """Undo the schedule: the model's experts implementation and hooks are what they were (idempotent)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def __enter__(self) -> "SparsifyHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def sparsify_(model, schedule: Schedule | str | os.PathLike, *, model_id: str | None = None,
              use_kernel: bool = True) -> SparsifyHandle:
    """Apply `schedule` (a Schedule or a schedule file) to `model` in place; return the handle that undoes it.

    Until `handle.remove()` (or the end of `with sparsify_(...) as handle:`), every forward (also
    `model.generate`, with or without KV cache) runs with the schedule's rule at its per-expert p, through
    `moeprof.capture.sparsify` (MoE top-p of x / i through the grouped kernel). ScheduleError when the model's
    shape differs; ScheduleModelWarning when only its id does.
    """
    from moeprof.capture import sparsify

    st = setting(schedule=schedule)
    table = st.table(model, model_id)
    stack = contextlib.ExitStack()
    realized = stack.enter_context(sparsify(model, type=st.type, rule=st.rule, p=table, use_kernel=use_kernel))
    return SparsifyHandle(stack, realized, st.schedule)

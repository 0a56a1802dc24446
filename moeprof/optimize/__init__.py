"""The schedule optimizer: per-(layer, expert) p that maximize FLOP-weighted sparsity at score ≥ target × dense.

- `moeprof.optimize.config`: `OptimizeConfig` (every setting, validated where it is built) and the defaults.
- `moeprof.optimize.curves`: each expert's damage and sparsity curves, and the layer probes that weight them.
- `moeprof.optimize.anchor`: the uniform anchor (the uniform critical p of the calibration split).
- `moeprof.optimize.multiplier`: the Lagrangian method (allocation at a multiplier λ, bisection over λ).
- `moeprof.optimize.marginal`: the joint-marginal method (layer groups reallocated from KL probes).
- `moeprof.optimize.optimizer`: `optimize_schedule(model, tokenizer, config) -> ScheduleResult`.

    result = optimize_schedule(model, tokenizer, OptimizeConfig(type="i", task="ppl:wikipedia"))
    result.schedule.save("s.json"); result.heldout_ratio, result.sparsity_flop, result.chosen

Tasks and their calibration / held-out splits are `moeprof.evaluate.task`'s. Importing this package loads the
config only (pure Python); the other names load torch (no transformers) on first use.
"""

from moeprof.optimize.config import (  # noqa: F401
    DEFAULT_GRID,
    DEFAULT_MAX_EVALS,
    DEFAULT_MIN_TOKENS,
    OptimizeConfig,
    OptimizeConfigError,
)

_NAMES = {  # the rest needs torch: loaded on first use, so the CLI checks an OptimizeConfig without it
    "anchor": ("UniformAnchor", "uniform_anchor"),
    "curves": ("ExpertCurves", "expert_curves", "routing_counts", "weight_layers_by_loss"),
    "marginal": ("MarginalRound", "fit_to_target", "layer_groups", "marginal_reallocation", "scaled", "water_fill"),
    "multiplier": ("ScheduleSearch", "allocate", "lambda_ladder", "search_schedule"),
    "optimizer": ("ScheduleResult", "optimize_schedule"),
}


def __getattr__(name):
    if name in _NAMES["optimizer"]:
        from moeprof.optimize import optimizer as module
    elif name in _NAMES["multiplier"]:
        from moeprof.optimize import multiplier as module
    elif name in _NAMES["marginal"]:
        from moeprof.optimize import marginal as module
    elif name in _NAMES["curves"]:
        from moeprof.optimize import curves as module
    elif name in _NAMES["anchor"]:
        from moeprof.optimize import anchor as module
    else:
        raise AttributeError(f"module 'moeprof.optimize' has no attribute {name!r}")
    return getattr(module, name)

"""The schedule optimizer: per-(layer, expert) p that maximize FLOP-weighted sparsity at score ≥ target × dense.

- `moeprof.optimize.config`: `OptimizeConfig` (every setting, validated where it is built) and the defaults.
- `moeprof.optimize.curves`: each expert's damage and sparsity curves, and the layer probes that weight them.
- `moeprof.optimize.anchor`: the uniform anchor (the uniform critical p of the calibration split).
- `moeprof.optimize.multiplier`: the Lagrangian method (allocation at a multiplier λ, bisection over λ).
- `moeprof.optimize.marginal`: the joint-marginal method (layer groups reallocated from KL probes).
- `moeprof.optimize.optimizer`: `optimize_schedule(model, tokenizer, config) -> ScheduleResult`.

    result = optimize_schedule(model, tokenizer, OptimizeConfig(type="i", task="ppl:wikipedia"))
    result.schedule.save("s.json"); result.heldout_ratio, result.sparsity_flop, result.chosen

Tasks and their calibration / held-out splits are `moeprof.evaluate.task`'s. Importing this package imports
torch (no transformers); `moeprof.optimize.config` alone is pure Python.
"""

from moeprof.optimize.anchor import UniformAnchor, uniform_anchor  # noqa: F401
from moeprof.optimize.config import (  # noqa: F401
    DEFAULT_GRID,
    DEFAULT_MAX_EVALS,
    DEFAULT_MIN_TOKENS,
    OptimizeConfig,
    OptimizeConfigError,
)
from moeprof.optimize.curves import ExpertCurves, expert_curves, routing_counts, weight_layers_by_loss  # noqa: F401
from moeprof.optimize.marginal import (  # noqa: F401
    MarginalRound,
    fit_to_target,
    layer_groups,
    marginal_reallocation,
    scaled,
    water_fill,
)
from moeprof.optimize.multiplier import ScheduleSearch, allocate, lambda_ladder, search_schedule  # noqa: F401
from moeprof.optimize.optimizer import ScheduleResult, optimize_schedule  # noqa: F401

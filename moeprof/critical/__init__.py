"""Critical sparsity: the largest realized sparsity whose score stays ≥ target × dense (arXiv 2509.00454).

- `moeprof.critical.search`: the search over any `evaluate(p) -> EvalPoint` (coarse scan, check, ITP),
  its `CriticalResult`, the paired bootstrap CI, the warnings. No model, no store.
- `moeprof.critical.tolerance`: each expert's own tolerance within a relative output-error budget,
  captured through `moeprof.capture.attach`.
- `moeprof.critical.pipeline`: the API the CLI and the demo call — `run_critical`, `critical_sparsity`,
  `ensure_store`, `critical_record` / `write` (through `moeprof.store.write_critical`). Tasks and their
  evaluators are `moeprof.evaluate.task`'s.

`python -m moeprof.critical` prints the evaluations per search on synthetic curves. Importing this package
needs numpy only; the tolerance names import torch on first use (no transformers, no h5py).
"""

from moeprof.critical.pipeline import (  # noqa: F401
    TOLERANCE_BUDGET,
    CriticalRun,
    check_request,
    critical_record,
    critical_sparsity,
    ensure_store,
    run_critical,
    write,
)
from moeprof.critical.search import (  # noqa: F401
    DEFAULT_P_MIN,
    DEFAULT_TARGET,
    DEFAULT_TOL,
    CoarseScoreWarning,
    CriticalResult,
    CriticalSearchError,
    MeaninglessCriticalWarning,
    NonMonotoneScoreWarning,
    bootstrap_ratio_ci,
    check_dense,
    find_critical,
)
# moeprof.critical.tolerance needs torch: its names load on first use, so `check_request` (the CLI's argument
# check) answers without importing torch
_TOLERANCE = ("MAXP_TOLERANCE_GRID", "ExpertTolerance", "RoutedTokens", "expert_output_error", "expert_tolerance",
              "expert_tolerance_of_model", "glu_expert_error", "layout_expert_error", "tolerance_split_damage")


def __getattr__(name):
    if name in _TOLERANCE:
        from moeprof.critical import tolerance

        return getattr(tolerance, name)
    raise AttributeError(f"module 'moeprof.critical' has no attribute {name!r}")


from moeprof.evaluate.point import EvalPoint, Evaluate, point_from_realized  # noqa: F401

"""Per-expert sparsity schedules: which p applies to which (layer, expert), saved, loaded and applied.

- `moeprof.schedule.data`: the `Schedule` (plain data) and its versioned JSON file. numpy only.
- `moeprof.schedule.apply`: `sparsify_` and its handle, `uniform`, and `setting` (a schedule, or type / rule / p /
  layers / experts → the [L, E] table `moeprof.capture.sparsify` takes). torch when a function runs.
- `moeprof.schedule.tau`: static magnitude thresholds τ from a schedule and a profile store.

    s = moeprof.schedule.uniform(model, type="i", p=0.9)   # or Schedule.load("s.json"), or `moeprof schedule`
    s.save("s.json")                                        # atomic; versioned JSON (docs/schedules.md)
    with moeprof.schedule.sparsify_(model, s) as handle:    # in place, like torchao's quantize_
        model.generate(...)                                 # every forward runs the schedule

Importing this package loads the data module only (no torch, no h5py); the other names load on first use.
"""

from moeprof.schedule.data import (  # noqa: F401
    SCHEDULE_FORMAT,
    SCHEDULE_SCHEMA_VERSION,
    SHAPE_KEYS,
    Schedule,
    ScheduleError,
    ScheduleModelWarning,
    as_schedule,
    is_schedule_file,
    stored_verdict_lines,
)

_APPLY = ("Setting", "SparsifyHandle", "loaded_model_id", "model_shape", "setting", "sparsify_", "uniform")
_TAU = ("tau_from_histogram", "target_sparsity", "threshold_schedule", "thresholds")


def __getattr__(name):
    if name in _APPLY:
        from moeprof.schedule import apply

        return getattr(apply, name)
    if name in _TAU:
        from moeprof.schedule import tau

        return getattr(tau, name)
    raise AttributeError(f"module 'moeprof.schedule' has no attribute {name!r}")

"""Reports of a profile store: rich leaderboards and summaries, matplotlib figures, store info.

Every function takes an open `moeprof.store.Store` (plots also accept paths) and reads nothing else: no model
is loaded. The CLI (`moeprof leaderboard | plot | info`) prints or saves what these return.
"""

from moeprof.outliers import robust_z
from moeprof.report.critical_tables import critical_headline
from moeprof.report.info import info_renderables
from moeprof.report.leaderboard import (
    OUTLIER_Z,
    SORT_KEYS,
    dead_experts,
    hist_quantiles,
    layer_summary,
    layer_summary_rows,
    leaderboard,
    leaderboard_rows,
)

_PLOTS = ("plot_all", "plot_curves", "plot_heatmap", "sparsity_curve")


def __getattr__(name):
    # matplotlib loads only when a plot is asked for, so `moeprof leaderboard` / `info` start fast
    if name in _PLOTS:
        from moeprof.report import plots
        return getattr(plots, name)
    raise AttributeError(f"module 'moeprof.report' has no attribute {name!r}")


__all__ = [
    "OUTLIER_Z", "SORT_KEYS", "critical_headline", "dead_experts", "hist_quantiles",
    "info_renderables", "layer_summary", "layer_summary_rows", "leaderboard", "leaderboard_rows", "plot_all",
    "plot_curves", "plot_heatmap", "robust_z", "sparsity_curve",
]

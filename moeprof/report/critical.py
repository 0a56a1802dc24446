"""What `moeprof critical` prints: the evaluated points and the headline of a store's `/critical` record.

Both read a `moeprof.store.Critical` record (from `Store.critical()`, or `moeprof.critical.critical_record`
before writing) and nothing else.
"""

from __future__ import annotations

import math

from rich.table import Table


def search_points_table(record) -> Table:
    """Return a rich Table of the search: the dense point, then every sparse point in evaluation order."""
    a, pts = record.attrs, record.points
    table = Table(title=f"critical search: {a['task']}, type {a['type']}, rule {a['rule']}, "
                        f"target {a['target']:.0%} of dense")
    for col in ("#", "p", "score", "ratio", "sparsity (tok)", "sparsity (FLOP)", "pass"):
        table.add_column(col, justify="right")
    table.add_row("1", "dense", f"{a['dense_score']:.5g}", f"{1.0:.4f}", "nan", "nan", "dense")
    for n in range(len(pts.get("p", ()))):
        ok = "[green]yes[/green]" if pts["passed"][n] else "[red]no[/red]"
        table.add_row(str(n + 2), f"{pts['p'][n]:.4f}", f"{pts['score'][n]:.5g}", f"{pts['ratio'][n]:.4f}",
                      f"{pts['sparsity_token'][n]:.3f}", f"{pts['sparsity_flop'][n]:.3f}", ok)
    return table


def search_headline(record) -> str:
    """Return one line (rich markup): the critical p, its realized sparsity, the scores, CI and flags."""
    a = record.attrs
    low, high = float(a["ratio_ci_low"]), float(a["ratio_ci_high"])
    ci = "" if math.isnan(low) else f", {a['ci_level']:.0%} CI of the ratio [{low:.4f}, {high:.4f}]"
    flags = []
    if not a["monotone"]:
        flags.append("score curve not monotone")
    if a["at_bound"]:
        flags.append("even the lowest p searched passed: the true critical sparsity may be higher")
    return (f"critical p = {a['critical_p']:.4f} → sparsity {a['critical_sparsity_token']:.3f} (token-weighted), "
            f"{a['critical_sparsity_flop']:.3f} (FLOP-weighted); score {a['critical_score']:.5g} vs dense "
            f"{a['dense_score']:.5g} (ratio {a['critical_ratio']:.4f}{ci}); {a['num_evaluations']} evaluations"
            + (f" [yellow]({'; '.join(flags)})[/yellow]" if flags else ""))

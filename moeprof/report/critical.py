"""What `moeprof critical` prints: the evaluated points and the headline of a store's `/critical` record (the
one formatter of that record: leaderboards and `info` use `critical_headline` too).

All read a `moeprof.store.Critical` record (from `Store.critical()`, or `moeprof.critical.critical_record`
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


def critical_headline(record, *, detail: bool = False) -> str | None:
    """Return the one-line summary of a /critical record (`moeprof.store.Critical`; None without one).

    Default: plain text with the task, rule, type and target (the caption of leaderboards and `info`); a
    hand-made or older record may lack any attr ("?" then). detail=True: rich markup with the scores, the
    ratio's CI, the evaluation count and the search's flags (what `moeprof critical` prints).
    """
    if record is None:
        return None
    a = record.attrs

    def num(key, spec=".3f"):
        try:
            return format(float(a[key]), spec)
        except (KeyError, TypeError, ValueError):
            return "?"

    sparsity = (f"sparsity {num('critical_sparsity_token')} token-weighted / {num('critical_sparsity_flop')} "
                "FLOP-weighted")
    if not detail:
        what = f"{a['rule']}" if "rule" in a else ""
        on = f" on {a['type']}" if "type" in a else ""
        task = f" for {a['task']}" if "task" in a else ""
        target = ""
        if "target" in a:
            target = (f", score ≥ {num('target', '.0%')} of dense" if num("target") != "?"
                      else f", target {a['target']}")
        dense = f" (dense score {num('dense_score', '.4g')})" if "dense_score" in a else ""
        return f"critical{task} ({what}{on}{target}): p* = {num('critical_p', 'g')}, {sparsity}{dense}"

    low, high = float(a.get("ratio_ci_low", math.nan)), float(a.get("ratio_ci_high", math.nan))
    ci = "" if math.isnan(low) else f", {num('ci_level', '.0%')} CI of the ratio [{low:.4f}, {high:.4f}]"
    flags = []
    if not a.get("monotone", True):
        flags.append("score curve not monotone")
    if a.get("at_bound", False):
        flags.append("even the lowest p searched passed: the true critical sparsity may be higher")
    return (f"critical p = {num('critical_p', '.4f')} → {sparsity}; score {num('critical_score', '.5g')} vs dense "
            f"{num('dense_score', '.5g')} (ratio {num('critical_ratio', '.4f')}{ci}); "
            f"{a.get('num_evaluations', '?')} evaluations" + (f" [yellow]({'; '.join(flags)})[/yellow]" if flags else ""))


def search_headline(record) -> str:
    """Return `critical_headline(record, detail=True)`: the line `moeprof critical` prints after a search."""
    return critical_headline(record, detail=True)

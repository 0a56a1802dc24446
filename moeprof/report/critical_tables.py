"""What `moeprof critical` prints: the evaluated points and the headline of a store's `/critical` record (the
one formatter of that record: leaderboards and `info` use `critical_headline` too).

All read a `moeprof.store.Critical` record (from `Store.critical()`, or `moeprof.critical.critical_record`
before writing) and nothing else.
"""

from __future__ import annotations

import math

from rich.markup import escape
from rich.table import Table

from moeprof.report.scores import PERPLEXITY, format_score, score_cells, score_columns, score_kind, score_name, \
    score_phrase


def search_points_table(record) -> Table:
    """Return a rich Table of the search: the dense point, then every sparse point in evaluation order.

    A perplexity task shows each point's perplexity, ppl ÷ dense and the score ratio the target is checked on
    (score = 1/ppl); an lm-eval task its accuracy and the ratio (`moeprof.report.scores`)."""
    a, pts = record.attrs, record.points
    kind = score_kind(a.get("task"), a.get("score_kind"))
    target = (f"target {a['target']:.0%} of dense" if kind != PERPLEXITY
              else f"target ppl ≤ dense ÷ {a['target']:g}")
    table = Table(title=f"critical search: {a['task']}, type {a['type']}, rule {a['rule']}, {target}")
    for col in ("#", "p", *score_columns(kind), "sparsity (tok)", "sparsity (FLOP)", "pass"):
        table.add_column(col, justify="right")
    table.add_row("1", "dense", *score_cells(a["dense_score"], 1.0, kind), "nan", "nan", "dense")
    for n in range(len(pts.get("p", ()))):
        ok = "[green]yes[/green]" if pts["passed"][n] else "[red]no[/red]"
        table.add_row(str(n + 2), f"{pts['p'][n]:.4f}", *score_cells(pts["score"][n], pts["ratio"][n], kind),
                      f"{pts['sparsity_token'][n]:.3f}", f"{pts['sparsity_flop'][n]:.3f}", ok)
    return table


def evaluation_line(k: int, n: int, setting: str, *, score: float, ratio: float, passed: bool | None,
                    sparsity_token: float | None, sparsity_flop: float | None, elapsed_s: float,
                    kind: str | None = None) -> str:
    """Return one plain line for one evaluation of a search, e.g.
    "evaluation 3/≤12  p 0.7000  ppl 81.3 (score 1/ppl 0.0123)  ratio 0.9876 fail  sparsity 0.512 tok / 0.498 FLOP
    elapsed 12.3 s" (kind "inv_ppl"; "accuracy 0.4100" for kind "mean"; "score …" when the kind is not known).

    `n` is the most evaluations the search can make (it usually stops earlier); `setting` says what was
    evaluated ("dense", "p 0.7000", "λ 0.012"); passed None for the dense point (no verdict)."""
    verdict = "" if passed is None else (" pass" if passed else " fail")
    spars = ("" if sparsity_token is None or sparsity_flop is None
             else f"  sparsity {sparsity_token:.3f} tok / {sparsity_flop:.3f} FLOP")
    said = f"score {score:.5g}" if kind is None else score_phrase(score, kind)
    return (f"evaluation {k}/≤{n}  {setting}  {said}  ratio {ratio:.4f}{verdict}{spars}  "
            f"elapsed {elapsed_s:.1f} s")


# A ratio CI wider than this (e.g. [0.75, 1.25]) cannot tell a 1% loss from none: it is reported as not resolvable.
CI_RESOLVABLE_WIDTH = 0.5


def ci_text(low: float, high: float, level: float | None = None, *, decimals: int = 4,
            examples: int | None = None) -> str:
    """Return how a ratio CI reads: "95% CI [0.9812, 0.9934]", or, when it has collapsed to one value, what that
    means ("all examples equal") instead of a bracket that looks like certainty, or, when it is wider than
    CI_RESOLVABLE_WIDTH (a few documents of an lm-eval task: [0.0000, 4.0000]), that it is not resolvable with that
    many examples ("" for a missing CI)."""
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return ""
    lvl = "" if level is None or math.isnan(level) else f"{level:.0%} "
    if high - low > CI_RESOLVABLE_WIDTH:
        many = f" with {int(examples):,} examples" if examples else ""
        return (f"{lvl}CI not resolvable{many} (the bootstrap range [{low:.2f}, {high:.2f}] is wider than "
                f"{CI_RESOLVABLE_WIDTH:g}; give more data: --limit / --max-tokens)")
    if abs(high - low) < 0.5 * 10.0 ** -decimals:
        return (f"{lvl}CI degenerate: the ratio is {low:.{decimals}f} in every bootstrap resample (all examples "
                "equal: no example's score moved relative to dense, so the CI says nothing about the spread)")
    return f"{lvl}CI [{low:.{decimals}f}, {high:.{decimals}f}]"


def _first_clause(message: str) -> str:
    """The part of a warning message before its explanation (": ..."), e.g. "the dense score 0.25 is at chance
    level (0.25)"."""
    prefix = ""
    if message.startswith("tolerance: "):  # (a warning of the tolerance stage, after the search)
        prefix, message = "tolerance: ", message[len("tolerance: "):]
    head = message.split(": ", 1)[0] if not message.startswith("--") else message.split("; ", 1)[0]
    return prefix + head.strip()


def run_settings(a) -> str:
    """Return what a record's evaluations ran on, e.g. "28 sequences, 14,336 tokens (--max-tokens 32,768,
    --seq-len 512)" or "100 examples (--limit 100)" ("" for an older record that did not keep it)."""
    flags = [f"--{k.replace('_', '-')} {int(a[k]):,}" for k in ("limit", "max_tokens", "seq_len") if k in a]
    what = []
    if "examples" in a:
        what.append(f"{int(a['examples']):,} " + ("sequences" if "max_tokens" in a else "examples"))
    if "tokens" in a:
        what.append(f"{int(a['tokens']):,} tokens")
    if not what and not flags:
        return ""
    return ", ".join(what) + (f" ({', '.join(flags)})" if flags else "")


def record_warnings(record) -> list[str]:
    """Return the warnings a /critical record kept (chance-level dense score, one example moving the ratio by more
    than 1 − target, a non-monotone curve, less data than --max-tokens), in the order they came; [] if none."""
    text = record.attrs.get("warnings", "") if record is not None else ""
    return [w for w in str(text or "").split("\n") if w.strip()]


def critical_headline(record, *, detail: bool = False) -> str | None:
    """Return the one-line summary of a /critical record (`moeprof.store.Critical`; None without one).

    Default: plain text with the task, rule, type and target, then p* with what the evaluations ran on (--limit,
    --max-tokens) and the search's warnings in short (the caption of leaderboards and `info`); a hand-made or
    older record may lack any attr ("?" then, or nothing). detail=True: rich markup with the scores, the ratio's
    CI (a degenerate one explained), the evaluation count and the search's flags (what `moeprof critical`
    prints).
    """
    if record is None:
        return None
    a = record.attrs

    def num(key, spec=".3f"):
        try:
            return format(float(a[key]), spec)
        except (KeyError, TypeError, ValueError):
            return "?"

    kind = score_kind(a.get("task"), a.get("score_kind"))

    def reads(key):  # a score as researchers read it: perplexity or accuracy
        try:
            return format_score(float(a[key]), kind)
        except (KeyError, TypeError, ValueError):
            return "?"

    sparsity = (f"sparsity {num('critical_sparsity_token')} token-weighted / {num('critical_sparsity_flop')} "
                "FLOP-weighted")
    ran = run_settings(a)
    warned = record_warnings(record)
    if not detail:
        what = f"{a['rule']}" if "rule" in a else ""
        on = f" on {a['type']}" if "type" in a else ""
        task = f" for {a['task']}" if "task" in a else ""
        target = ""
        if "target" in a:
            target = (f", score ≥ {num('target', '.0%')} of dense" if num("target") != "?"
                      else f", target {a['target']}")
        dense = f" (dense {score_name(kind)} {reads('dense_score')})" if "dense_score" in a else ""
        extra = f"; on {ran}" if ran else ""
        if warned:
            extra += f"; ⚠ {len(warned)} warning{'s' * (len(warned) > 1)}: " + "; ".join(map(_first_clause, warned))
        return f"critical{task} ({what}{on}{target}): p* = {num('critical_p', 'g')}{extra}, {sparsity}{dense}"

    low, high = float(a.get("ratio_ci_low", math.nan)), float(a.get("ratio_ci_high", math.nan))
    level = float(a.get("ci_level", math.nan))
    ci = ci_text(low, high, level, examples=a.get("examples"))
    ci = f", {ci}" if ci else ""
    flags = []
    if not a.get("monotone", True):
        flags.append("score curve not monotone")
    if a.get("at_bound", False):
        flags.append("even the lowest p searched passed: the true critical sparsity may be higher")
    if warned:
        flags.append(f"{len(warned)} warning{'s' * (len(warned) > 1)} kept in the store: "
                     + "; ".join(map(_first_clause, warned)))
    on = f"; on {ran}" if ran else ""
    if kind == PERPLEXITY:
        try:
            times = f"{1 / float(a['critical_ratio']):.4f}× dense; "
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            times = ""
        scores = (f"perplexity {reads('critical_score')} vs dense {reads('dense_score')} ({times}score ratio "
                  f"dense ppl ÷ ppl {num('critical_ratio', '.4f')}{ci})")
    else:
        scores = (f"{score_name(kind)} {reads('critical_score')} vs dense {reads('dense_score')} "
                  f"(ratio {num('critical_ratio', '.4f')}{ci})")
    return (f"critical p = {num('critical_p', '.4f')} → {sparsity}; {scores}; "
            f"{a.get('num_evaluations', '?')} evaluations{on}"
            + (f" [yellow]({escape('; '.join(flags))})[/yellow]" if flags else ""))


def search_headline(record) -> str:
    """Return `critical_headline(record, detail=True)`: the line `moeprof critical` prints after a search."""
    return critical_headline(record, detail=True)

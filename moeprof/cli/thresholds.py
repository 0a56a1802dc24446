"""`moeprof schedule-thresholds`: a top-p schedule + its model's profile store → static magnitude thresholds τ.

Thin: checks the arguments, calls `moeprof.schedule.threshold_schedule` (numpy + the store: no model loads) and
writes the τ schedule (rule "threshold") atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from moeprof.atomic import check_writable
from moeprof.cli.common import console
from moeprof.errors import UsageError


def cmd_schedule_thresholds(args: argparse.Namespace) -> int:
    import numpy as np

    from moeprof.schedule import Schedule, is_schedule_file, threshold_schedule
    from moeprof.store import open_store

    check_writable(args.out, "--out", example="schedule.json")
    if Path(args.out).exists() and not args.force and not is_schedule_file(args.out):
        raise UsageError(f"--out {args.out} exists and is not a moeprof schedule (is it your data?); choose another "
                         "file name, or pass --force to replace it")
    if Path(args.out).resolve() == Path(args.schedule).resolve():
        raise UsageError(f"--out {args.out} is the input schedule; write the thresholds to another file")
    if Path(args.out).resolve() == Path(args.from_store).resolve():
        raise UsageError(f"--out {args.out} is the profile store given to --from; write the thresholds to a .json file")
    schedule = Schedule.load(args.schedule)
    with open_store(args.from_store) as st:
        tau = threshold_schedule(schedule, st)
    tau.save(args.out)
    t, target = tau.p, np.asarray(tau.provenance["target_sparsity"], dtype=np.float64)
    set_ = np.isfinite(t)
    src = ", ".join(f"{n} from {k.replace('_', ' ')}" for k, n in tau.provenance["target_from"].items() if n)
    console.print(f"{int(set_.sum())} of {t.size} experts get a threshold τ of {schedule.type} (min "
                  f"{np.nanmin(t) if set_.any() else float('nan'):.4g}, median "
                  f"{np.nanmedian(t) if set_.any() else float('nan'):.4g}, max "
                  f"{np.nanmax(t) if set_.any() else float('nan'):.4g}); target sparsity mean "
                  f"{np.nanmean(target) if np.isfinite(target).any() else float('nan'):.3f} ({escape(src or 'none')})")
    unseen = tau.provenance["unseen_experts"]
    if unseen:
        console.print(f"[yellow]warning:[/yellow] {len(unseen)} scheduled expert(s) saw no entry in the profile: "
                      "left dense (NaN τ); profile more tokens to give them one")
    console.print(f"[green]wrote[/green] {escape(str(args.out))} (rule threshold: keep |{schedule.type}| ≥ τ; apply "
                  "it like any schedule: `moeprof eval MODEL --schedule FILE`)")
    return 0


def add_parsers(sub) -> None:
    """Add `schedule-thresholds` to the CLI's subparsers."""
    p = sub.add_parser("schedule-thresholds", help="static per-expert magnitude thresholds τ (keep |a| >= τ) that "
                       "reproduce a schedule's per-expert sparsity, from a profile store's |entry| histograms")
    p.add_argument("schedule", help="a top-p schedule file (from `moeprof schedule`, or Schedule.save)")
    p.add_argument("--from", dest="from_store", required=True,
                   help="the model's profile store (`moeprof profile`): its |entry| histograms give τ")
    p.add_argument("--out", required=True, help="threshold schedule file to write (JSON, rule \"threshold\"); an "
                   "existing file that is not a schedule is refused without --force")
    p.add_argument("--force", action="store_true", help="replace an existing --out that is not a schedule file")
    p.set_defaults(fn=cmd_schedule_thresholds)

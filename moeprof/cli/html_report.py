"""`moeprof report`: one self-contained, interactive HTML page of stores (and schedules), for a browser.

Thin: checks the arguments, calls `moeprof.report.html.write_report` (the store's typed readers and the schedule
file reader; no model loads) and says what it wrote.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from moeprof.atomic import check_writable
from moeprof.errors import UsageError


def cmd_report(args: argparse.Namespace) -> int:
    from moeprof.report.html import is_report, write_report

    out = Path(args.out)
    check_writable(out, "-o")
    if out.is_dir():
        raise UsageError(f"-o {out} is a folder; give the report's file name, e.g. -o {out / 'report.html'}")
    if out.exists() and not args.force and not is_report(out):
        raise UsageError(f"-o {out} exists and is not a moeprof report (is it your file?); choose another name, or "
                         "pass --force to replace it")
    path = write_report(args.stores, out, schedules=args.schedule or ())
    size_mb = path.stat().st_size / 1e6
    Console(soft_wrap=True).print(f"[green]wrote[/green] {escape(str(path))} ({size_mb:.1f} MB, works offline: open it in a browser)")
    return 0


def add_parsers(sub) -> None:
    """Add `report` to the CLI's subparsers."""
    p = sub.add_parser("report", help="one self-contained, interactive HTML page of stores and schedules (works "
                       "offline): summary, leaderboard, heatmaps, p-curves, load, critical search, schedules")
    p.add_argument("stores", nargs="+", metavar="STORE", help="profile stores (.h5); several stores of one MoE on "
                   "different texts add the load by text, stores of several models the comparison")
    p.add_argument("--schedule", action="append", metavar="S.json",
                   help="a schedule file (`moeprof schedule`) to show with the store of its shape (repeatable)")
    p.add_argument("-o", "--out", default="outputs/report.html", help="the page to write (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace -o even when it is not a moeprof report")
    p.set_defaults(fn=cmd_report)

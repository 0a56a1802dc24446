"""The `moeprof` terminal entry point: a thin layer over the Python API.

A user's mistake becomes one red line naming the problem and the fix, and exit status 2; Ctrl-C exits 130
and leaves no half-written file under the output name.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape

from moeprof import __version__

console = Console()
err_console = Console(stderr=True)

from moeprof.usage import DEFAULT_OUTPUTS, UsageError, default_out


_USER_ERRORS = {  # module -> exception classes whose message is meant for the user
    "moeprof.arch": ("UnsupportedArchitecture",), "moeprof.data": ("DataError",),
    "moeprof.models": ("ModelLoadError",), "moeprof.resources": ("ResourceError",),
    "moeprof.store": ("StoreError",), "moeprof.evaluate.tasks": ("UnknownTaskError", "TaskDataMissing"),
    "moeprof.critical": ("CriticalSearchError",), "moeprof.distributed": ("DistributedError",),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user, from modules already imported (an error can only
    come from a module that ran, and `moeprof info` should not pay for importing torch and transformers)."""
    errors = [UsageError, FileNotFoundError, PermissionError, ValueError]
    for module, names in _USER_ERRORS.items():
        if module in sys.modules:
            errors += [getattr(sys.modules[module], n) for n in names if hasattr(sys.modules[module], n)]
    return tuple(errors)


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
    from moeprof.topp import DEFAULT_P_GRID, check_p_grid

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
    from moeprof.profile import check_types

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


def cmd_profile(args: argparse.Namespace) -> int:
    import contextlib

    from moeprof.data import parse_shard, resolve
    from moeprof.distributed import Ranks
    from moeprof.models import load_model, model_id
    from moeprof.profile import profile
    from moeprof.store import check_writable

    s = _profile_settings(args)
    p_grid = parse_p_grid(s["p_grid"])
    types = parse_types(s["types"])
    shard = parse_shard(args.shard)
    max_memory = parse_max_memory(args.max_memory)
    out = Path(s["out"]) if s["out"] else default_out(s["model"])
    if out == default_out(s["model"]):
        out.parent.mkdir(parents=True, exist_ok=True)
    check_writable(out)
    for spec in s["data"]:  # a missing file should not cost a model load first
        resolve(spec)
    ranks = Ranks.from_env(s["device"], timeout_s=args.dist_timeout)  # torchrun: join the run (else one process)
    try:
        with console.status(f"loading {s['model']} ...") if ranks.is_main else contextlib.nullcontext():
            model, tokenizer = load_model(s["model"], dtype=s["dtype"], device=s["device"], max_memory=max_memory,
                                          offload_folder=args.offload_folder)
        result = profile(model, tokenizer, s["data"], out, model_id=model_id(s["model"]), p_grid=p_grid,
                         types=types, max_tokens=s["max_tokens"], seq_len=s["seq_len"], batch_size=s["batch_size"],
                         trace_tokens=s["trace_tokens"], dtype=s["dtype"], device=s["device"], shard=shard,
                         checkpoint_every=args.checkpoint_every, resume=args.resume, ranks=ranks)
    finally:
        ranks.close()
    if ranks.is_main:
        _print_summary(result.path)
        ranks_note = f", {ranks.world} ranks" if ranks.world > 1 else ""
        console.print(f"[green]wrote[/green] {result.path}  ({result.tokens:,} tokens{ranks_note}, "
                      f"{result.wall_s:.1f} s, {result.tokens_per_s:,.0f} tok/s)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from moeprof.merge import merge_stores
    from moeprof.store import open_store

    path = merge_stores(args.stores, Path(args.out))
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


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from moeprof.report.leaderboard import layer_summary, leaderboard
    from moeprof.store import open_store

    with open_store(args.store) as st:
        if args.layer is None and st.num_layers > 1:
            console.print(layer_summary(st, type=args.type, p=args.p))
        schedule = None
        if args.schedule:
            from moeprof.schedule import Schedule

            schedule = Schedule.load(args.schedule)
        console.print(leaderboard(st, type=args.type, p=args.p, by=args.by, layer=args.layer, top=args.top,
                                  schedule=schedule))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from moeprof.report.plots import plot_all

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.stores and not args.schedule:
        raise UsageError("give one or more stores to plot, or --schedule FILE")
    for path in plot_all(args.stores, out) if args.stores else ():
        console.print(f"[green]wrote[/green] {path}")
    if args.schedule:
        from moeprof.report.plots import plot_schedule
        from moeprof.schedule import Schedule

        path = plot_schedule(Schedule.load(args.schedule), out, name=Path(args.schedule).stem)
        console.print(f"[green]wrote[/green] {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moeprof.demo import run_demo

    return run_demo(Path(args.out), max_tokens=args.max_tokens, console=console)


def cmd_tasks(args: argparse.Namespace) -> int:
    from moeprof.evaluate.tasks import main as tasks_main

    tasks_main([args.action, *args.names])
    return 0


def cmd_critical(args: argparse.Namespace) -> int:
    from moeprof.critical import check_request, ensure_store, run_critical, write
    from moeprof.models import load_model
    from moeprof.report.critical import search_headline, search_points_table
    from moeprof.store import check_writable, open_store

    check_request(type=args.type, target=args.target, task=args.task)  # before any model is loaded
    out = Path(args.out) if args.out else default_out(args.model, "-critical")
    if not args.out:
        DEFAULT_OUTPUTS.mkdir(parents=True, exist_ok=True)
    check_writable(out)
    with console.status(f"loading {args.model} ..."):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    ensure_store(model, tokenizer, out, model_name=args.model, type=args.type, announce=console.print)
    with console.status(f"searching the critical sparsity of {args.type} on {args.task}, then each expert's "
                        "own tolerance ..."):
        run = run_critical(model, tokenizer, type=args.type, task=args.task, target=args.target, rule=args.rule,
                           limit=args.limit, batch_size=args.batch_size, seq_len=args.seq_len,
                           max_tokens=args.max_tokens, check=not args.no_check,
                           on_warning=lambda msg: console.print(f"[yellow]warning:[/yellow] {escape(msg)}"))
    write(out, run)
    with open_store(out) as st:
        record = st.critical()
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("profile", help="capture per-expert top-p sparsity of x/u/g/i into an HDF5 store")
    p.add_argument("model", nargs="?", help="folder, .gguf file, hub id, or tiny-moe / tiny-dense / smollm2")
    p.add_argument("--recipe", help="TOML recipe (model, data, grid, ...); flags override it")
    p.add_argument("--data", action="append", default=[], help="text or JSONL file, or corpus:split (repeatable)")
    p.add_argument("--out", help="output store (default outputs/<model>.h5)")
    p.add_argument("--p-grid", dest="p_grid", help="comma-separated p values in [0, 1] (default: 16 in 0.5..0.99)")
    p.add_argument("--types", help="activation types among x,u,g,i (default all)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, help="stop after this many tokens (default 8192)")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="packed sequence length (default 256)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="sequences per forward (default 4)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--trace-tokens", dest="trace_tokens", type=int, help="per-token detail for the first N tokens")
    p.add_argument("--shard", help="profile shard I of N of the data (I/N, from 0; e.g. a SLURM array task), then "
                   "`moeprof merge` the shards")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, metavar="TOKENS",
                   help="write the running statistics to OUT.ckpt every TOKENS tokens")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt, or extend the finished OUT to a "
                   "larger --max-tokens (same model and arguments)")
    p.add_argument("--max-memory", dest="max_memory", help="with --device auto: memory budget per device, e.g. "
                   "0=70GiB,cpu=100GiB (layers beyond it are offloaded)")
    p.add_argument("--offload-folder", dest="offload_folder", help="with --device auto: folder for offloaded layers")
    p.add_argument("--dist-timeout", dest="dist_timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others before giving up (default 1800)")
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("merge", help="combine stores of the same model (e.g. the shards of --shard I/N) exactly")
    p.add_argument("stores", nargs="+", help="stores to merge, in data order (the trace concatenates)")
    p.add_argument("-o", "--out", required=True, help="merged store to write")
    p.set_defaults(fn=cmd_merge)

    p = sub.add_parser("info", help="print a store's attributes and dataset layout")
    p.add_argument("store")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("leaderboard", help="rank experts by sparsity, load or spread")
    p.add_argument("store")
    p.add_argument("--type", default="i", help="activation type (default i)")
    p.add_argument("--p", type=float, default=0.9, help="p of the grid to rank at (default 0.9)")
    p.add_argument("--by", choices=["sparsity", "tokens", "spread"], default="sparsity")
    p.add_argument("--layer", type=int, help="only this layer")
    p.add_argument("--top", type=int, default=20, help="rows to show (default 20)")
    p.add_argument("--schedule", help="a schedule file (moeprof schedule): scheduled p and sparsity per expert")
    p.set_defaults(fn=cmd_leaderboard)

    p = sub.add_parser("plot", help="sparsity-vs-p curves (several files overlaid) and layer x expert heatmaps")
    p.add_argument("stores", nargs="*")
    p.add_argument("-o", "--out", default=str(DEFAULT_OUTPUTS / "plots"), help="output folder")
    p.add_argument("--schedule", help="also draw this schedule file as a layer x expert heatmap of p")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("demo", help="profile the embedded tiny MoE and its dense peer; plots and leaderboard")
    p.add_argument("--out", default=str(DEFAULT_OUTPUTS / "demo"))
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=16384)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("tasks", help="offline lm-eval tasks shipped with moeprof: list, prepare data, task folder")
    p.add_argument("action", choices=["list", "prepare", "path"])
    p.add_argument("names", nargs="*", help="tasks to prepare (default: all)")
    p.set_defaults(fn=cmd_tasks)

    p = sub.add_parser("critical", help="search the critical sparsity of a model for one activation type")
    p.add_argument("model")
    p.add_argument("--type", default="i", help="activation type to sparsify (x, u, g, i)")
    p.add_argument("--task", required=True, help="an lm-eval task (e.g. hellaswag, arc_easy) or ppl:FILE")
    p.add_argument("--target", type=float, default=0.99, help="score ratio to keep (default 0.99)")
    p.add_argument("--rule", default="topp", choices=["topp", "topk", "maxp"])
    p.add_argument("--limit", type=int, help="documents per lm-eval task (lm-eval --limit) / sequences for ppl:")
    p.add_argument("--out", help="store to add /critical to (default outputs/<model>-critical.h5)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--seq-len", dest="seq_len", type=int, default=256,
                   help="tokens per packed sequence for ppl: (default 256; the README's SmolLM2 figures use 512)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=8192,
                   help="held-out tokens evaluated for ppl: (default 8192; the README's figures use 32768)")
    p.add_argument("--no-check", dest="no_check", action="store_true",
                   help="skip the one monotonicity check below the first failing coarse point (one evaluation less)")
    p.set_defaults(fn=cmd_critical)

    from moeprof.cli_schedule import add_parsers as add_schedule_parsers

    add_schedule_parsers(sub)  # schedule, eval, generate
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not console.is_terminal:  # piped or captured: rich would assume 80 columns and elide leaderboard columns
        console.width = max(console.width, 160)
    quiet_hf = args.command in ("profile", "demo", "critical", "schedule", "eval", "generate")
    if quiet_hf:
        # transformers' own tqdm bars ("Loading weights") would interleave with ours; rich shows progress here.
        from transformers.utils import logging as hf_logging

        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]: the file being written was discarded (files already "
                          "completed are kept)")
        return 130
    except _user_errors() as exc:
        if os.environ.get("MOEPROF_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        err_console.print(f"[bold red]error:[/bold red] {escape(msg)}", highlight=False, soft_wrap=True)
        return 2
    finally:
        if quiet_hf and bars_were_on:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())

"""The commands that run a model to write a store: `profile`, `merge` (shards into one store), `stability`, and
`demo` (the embedded tiny MoE and its dense peer, end to end)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from moeprof.cli.common import (DEFAULT_OUTPUTS, DEVICE_HELP, DTYPE_HELP, FORCE_HELP, MODEL_HELP, add_model_args,
                                console, count, default_out, warning_line)
from moeprof.errors import UsageError


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
    from moeprof.activation_types import DEFAULT_P_GRID, check_p_grid

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
    from moeprof.activation_types import check_types

    try:
        return check_types([t.strip() for t in text.split(",") if t.strip()])
    except ValueError as exc:
        raise UsageError(f"--types: {exc}") from None


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
    from moeprof.profile import check_checkpoint, checkpoint_path, checkpoint_tokens, profile

    check_checkpoint(out, resume=args.resume, replace=args.force)  # before the model is loaded
    ranks = Ranks.from_env(s["device"], timeout_s=args.dist_timeout)  # torchrun: join the run (else one process)
    ckpt = checkpoint_path(out)
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
                         rank_layers=parse_layers(args.rank_layers, "--rank-layers"), rank_memory_gib=args.rank_memory,
                         replace_checkpoint=args.force)
    except KeyboardInterrupt:
        if ranks.is_main and ckpt.exists():
            warning_line(f"{ckpt} keeps the statistics of the first {checkpoint_tokens(ckpt)}: rerun the same "
                         "command with --resume to continue from there")
        raise
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


def cmd_merge(args: argparse.Namespace) -> int:
    from moeprof.merge import merge_stores
    from moeprof.store import check_output, open_store

    path = merge_stores(args.stores, check_output(args.out, force=args.force, flag="-o"))
    with open_store(path) as st:
        tokens = st.attrs["tokens"]
    console.print(f"[green]wrote[/green] {path}  ({tokens:,} tokens from {len(args.stores)} stores)")
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from moeprof.data import read_prompts
    from moeprof.store import check_output

    prompts = read_prompts(args.prompts)  # an empty or missing file is refused before torch or the model loads
    if args.max_new_tokens < 2:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves no pair of decode steps to compare; give "
                         "at least 2")
    if args.max_gap < 1:
        raise UsageError(f"--max-gap {args.max_gap} compares no pair of decode steps; give at least 1")
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
    import numpy as np

    from moeprof.report.chance import chance_levels, stability_summary
    from moeprof.store import open_store

    with open_store(out) as st:
        chance = float(np.nanmean(chance_levels(st, args.type, args.p)))
    console.print(f"mask stability of {args.type} at p = {args.p:g}: "
                  + stability_summary(float(cons.nanmean()), float(drift.nanmean()), chance,
                                      int(a["consecutive_pairs"].sum())))
    console.print(f"[green]wrote[/green] {out} (/stability) and {png}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moeprof.demo import run_demo

    return run_demo(Path(args.out), max_tokens=args.max_tokens, console=console)


def add_parsers(sub) -> None:
    """Add `profile`, `merge`, `stability` and `demo` to the CLI's subparsers."""
    p = sub.add_parser("profile", help="capture per-expert top-p sparsity of x/u/g/i into an HDF5 store")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--recipe", help="TOML recipe (model, data, grid, ...); flags override it")
    p.add_argument("--data", action="append", default=[], help="text or JSONL file, or corpus:split (repeatable)")
    p.add_argument("--out", help="output store (default outputs/<model>.h5). An existing store is replaced, "
                   "keeping its /critical and /schedules (refused when they belong to a model of another shape); "
                   "any other existing file is refused without --force")
    p.add_argument("--force", action="store_true", help=FORCE_HELP + "; also: start over when OUT.ckpt holds an "
                   "interrupted run (without --force or --resume such a run is refused, the checkpoint kept)")
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
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
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
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    add_model_args(p)
    p.set_defaults(fn=cmd_stability)

    p = sub.add_parser("demo", help="profile the embedded tiny MoE and its dense peer; plots and leaderboard")
    p.add_argument("--out", default=str(DEFAULT_OUTPUTS / "demo"), help="output folder (default outputs/demo)")
    p.add_argument("--max-tokens", dest="max_tokens", type=count(1), default=16384,
                   help="tokens profiled per model (default 16384; the critical search uses at most 8192)")
    p.set_defaults(fn=cmd_demo)

"""The commands that read stores and print or draw them (no model loads): `compare`, `info`, `export`,
`leaderboard`, `plot`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rich.markup import escape

from moeprof.atomic import staging_folder
from moeprof.cli.common import DEFAULT_OUTPUTS, FORCE_HELP, console, top_rows
from moeprof.errors import UsageError


def cmd_compare(args: argparse.Namespace) -> int:
    from moeprof.report.compare import compare

    table, pngs = compare(args.stores, args.out, p=args.p)
    console.print(table)
    for png in pngs:
        console.print(f"[green]wrote[/green] {png}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from moeprof.report.info import info_renderables
    from moeprof.store import open_store

    with open_store(args.store) as st:
        for r in info_renderables(st, verbose=args.verbose):
            console.print(r)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moeprof.store import check_output, export_table, is_store, open_store
    from moeprof.store.results import is_export

    if bool(args.csv) == bool(args.parquet):
        raise UsageError("give exactly one of --csv FILE or --parquet FILE")
    target = args.csv or args.parquet
    with open_store(args.store) as st:
        types = st.types if args.type == "all" else [args.type]
        for t in types:
            st.require_type(t)
        p = None if args.p == "all" else _grid_p(st, _p_value(args.p))
        flag = "--csv" if args.csv else "--parquet"
        if is_store(target):  # check_output would let a store be replaced: here it is never the target
            raise UsageError(f"{flag} {target} is a moeprof store; give a .csv / .parquet file name")
        # a table this command wrote before is replaced like a store is; any other file needs --force
        ours = is_export(target)
        if Path(target).is_file() and not (ours or args.force or Path(target).is_symlink()):
            raise UsageError(f"{flag} {target} exists and is not a table `moeprof export` wrote (is it your data?); "
                             "choose another file name, or pass --force to replace it")
        out = check_output(target, force=args.force or ours, flag=flag,
                           example="experts.csv" if args.csv else "experts.parquet")
        path = export_table(st, out, type=types, p=p, format="csv" if args.csv else "parquet")
    per = "expert" + ("" if p is not None else " and p") + (" and type" if len(types) > 1 else "")
    console.print(f"[green]wrote[/green] {path} (one row per {per}; types {', '.join(types)})")
    return 0


def _grid_p(st, p: float) -> float:
    """The grid p of `st` nearest `p`, with the note printed when it is not `p` itself."""
    from moeprof.report.grid_p import nearest_grid_p

    q, note = nearest_grid_p(st.p_grid, p)
    if note:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    return q


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
        args.p = _grid_p(st, args.p)
        if args.by == "token":
            console.print(token_leaderboard(st, type=args.type, p=args.p, layer=args.layer,
                                            top=5 if args.top is None else args.top))
            return 0
        # both tables built before either is printed: a schedule of another model is refused with nothing shown
        board = leaderboard(st, type=args.type, p=args.p, by=args.by, layer=args.layer,
                            top=20 if args.top is None else args.top, schedule=schedule, ascending=args.ascending)
        if args.layer is None and st.num_layers > 1 and st.num_experts > 1:  # dense: the leaderboard is per layer
            console.print(layer_summary(st, type=args.type, p=args.p, top=args.top))
        console.print(board)
    if schedule is not None:
        from moeprof.cli.schedule import print_verdict

        print_verdict(schedule.provenance)
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
                if store == args.stores[0]:  # the grid p nearest --p, of the first store (the others must hold it)
                    args.p = _grid_p(st, args.p)
                st.p_index(args.p)
    schedule = None
    if args.schedule:
        from moeprof.schedule import Schedule

        schedule = Schedule.load(args.schedule)
    from moeprof.report.plots import plot_all  # matplotlib: once the inputs are known good

    # All or nothing: the figures are drawn into a hidden folder beside the output and moved into it only when
    # every one was written, so a store that fails half-way (or a full disk) leaves no folder and no PNG behind.
    staging = staging_folder(out)
    try:
        drawn = list(plot_all(args.stores, staging, type=args.type, p=args.p, x_axis=args.x_axis,
                              scale=args.scale)) if args.stores else []
        if schedule is not None:
            from moeprof.report.plots import plot_schedule

            drawn.append(plot_schedule(schedule, staging, name=Path(args.schedule).stem))
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for path in drawn:
            shutil.move(path, out / path.name)  # (a rename on the same file system)
            written.append(out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for path in written:
        console.print(f"[green]wrote[/green] {path}")
    return 0


def add_parsers(sub) -> None:
    """Add `compare`, `info`, `export`, `leaderboard` and `plot` to the CLI's subparsers."""
    p = sub.add_parser("compare", help="compare models' stores: parameters, sparsity at p, critical sparsity, plots")
    p.add_argument("stores", nargs="+", help="profile stores (.h5) of the models to compare, one per model")
    p.add_argument("-o", "--out", default=str(DEFAULT_OUTPUTS / "compare"), help="output folder for the figures")
    p.add_argument("--p", type=float, default=0.9, help="p of the grid for the sparsity columns (default 0.9)")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("info", help="summarize a store: model, tokens, data, types, sparsity at p 0.9, critical p, "
                       "schedules, size (--verbose: every attribute and dataset's documentation)")
    p.add_argument("store", help="a moeprof store (.h5)")
    p.add_argument("--verbose", "--schema", dest="verbose", action="store_true",
                   help="print every root attribute, /critical and each dataset's shape, units and documentation")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("export", help="write a store's per-expert table (tokens, load, sparsity at p, ...) as CSV "
                       "or Parquet, for pandas / spreadsheets")
    p.add_argument("store", help="a profile store (.h5) from `moeprof profile`")
    p.add_argument("--csv", help="CSV file to write")
    p.add_argument("--parquet", help="Parquet file to write (needs pandas and pyarrow)")
    p.add_argument("--type", default="i", help="activation type of the sparsity columns (default i); all: every "
                   "profiled type, one block of rows each (the type column says which)")
    p.add_argument("--p", default="0.9", help="p (default 0.9; off the grid: the nearest grid p, with a note); all: "
                   "one row per expert and p")
    p.add_argument("--force", action="store_true", help=FORCE_HELP + " (a table `export` wrote before is "
                   "replaced without it)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("leaderboard", help="rank experts by sparsity, load or spread")
    p.add_argument("store", help="a profile store (.h5) from `moeprof profile`")
    p.add_argument("--type", default="i", help="activation type (default i)")
    p.add_argument("--p", type=float, default=0.9, help="p to rank at (default 0.9; off the grid: the nearest grid p, "
                   "with a note)")
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
    p.add_argument("--p", type=float, help="p of the heatmaps (default: the grid value nearest 0.9; off the grid: "
                   "the nearest grid p, with a note)")
    p.add_argument("--x-axis", dest="x_axis", choices=["p", "log1mp"], default="p",
                   help="x axis of the curves: p, or log1mp = 1 - p on a log scale (spreads the p >= 0.9 tail)")
    p.add_argument("--scale", choices=["range", "fixed", "centred"], default="range",
                   help="heatmap colours: range of the live experts (default), fixed 0-1, or centred on the median")
    p.set_defaults(fn=cmd_plot)

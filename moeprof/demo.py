"""`moeprof demo`: the first thing a new user runs — offline, on moeprof's embedded tiny MoE and its dense peer.

Profiles both models on held-out text they never trained on, writes the two HDF5 stores, the overlaid
sparsity-vs-p curves (MoE vs dense) and a layer × expert heatmap into the output folder, prints the expert
then searches both models' critical sparsity of the intermediate activation on held-out perplexity (and each
expert's own tolerance) into the stores, and prints the expert leaderboard with those columns.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.rule import Rule

DEMO_MODELS = ("tiny-moe", "tiny-dense")
DEMO_DATA = "mixed:heldout"  # the held-out split of the text the embedded models were trained on


def run_demo(out: Path, *, max_tokens: int = 16384, console: Console | None = None, critical: bool = True) -> int:
    """Run the demo into folder `out`; return the exit status (0)."""
    from moeprof.models import load_model, model_id
    from moeprof.profile import profile
    from moeprof.report.leaderboard import layer_summary, leaderboard
    from moeprof.report.plots import plot_curves, plot_heatmap
    from moeprof.store import open_store

    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stores = []
    for name in DEMO_MODELS:
        console.print(Rule(f"profile {name} on {DEMO_DATA}"))
        model, tok = load_model(name)
        result = profile(model, tok, [DEMO_DATA], out / f"{name}.h5", model_id=model_id(name),
                         max_tokens=max_tokens, seq_len=256, batch_size=8)
        console.print(f"[green]wrote[/green] {result.path}  ({result.tokens:,} tokens, {result.tokens_per_s:,.0f} tok/s)")
        stores.append(result.path)

    console.print(Rule("plots"))
    written = plot_curves(stores, out, labels=list(DEMO_MODELS))
    written.append(plot_heatmap(stores[0], out, type="i", p=0.9))
    for path in written:
        console.print(f"[green]wrote[/green] {path}")

    if critical:
        from moeprof.critical import critical_record, run_critical, write
        from moeprof.report.critical import search_headline

        console.print(Rule("critical sparsity of i on held-out perplexity (score 1/ppl ≥ 99% of dense)"))
        for name, path in zip(DEMO_MODELS, stores):
            model, tok = load_model(name)
            with console.status(f"searching the critical sparsity of {name}, then each expert's own tolerance ..."):
                run = run_critical(model, tok, type="i", task="ppl:mixed", seq_len=256,
                                   max_tokens=min(max_tokens, 8192), tolerance_text="mixed",
                                   on_warning=lambda msg: console.print(f"[yellow]warning:[/yellow] {msg}"),
                                   log=lambda line: console.print(line, markup=False, highlight=False))
            write(path, run)
            console.print(f"[bold]{name}[/bold]: {search_headline(critical_record(run.result))}")

    console.print(Rule("expert leaderboard: tiny-moe, intermediate i at p = 0.9"))
    with open_store(stores[0]) as st:
        console.print(layer_summary(st, type="i", p=0.9))
        console.print(leaderboard(st, type="i", p=0.9, by="sparsity", top=12))
    console.print(f"\nDone. Files are in [bold]{out}[/bold]; try `moeprof leaderboard {stores[0]} --by spread` "
                  f"or `moeprof info {stores[0]}`.")
    return 0

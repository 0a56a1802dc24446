"""`moeprof demo`: the first thing a new user runs — offline, on moeprof's embedded tiny MoE and its dense peer.

Profiles both models on held-out text of the three domains they were trained on (Wikipedia, OpenWebText, Python
source), an equal share of tokens per domain, one store per domain merged (exactly, `moeprof merge`) into each
model's whole-data store; writes the
overlaid sparsity-vs-p curves (MoE vs dense), a layer × expert heatmap and the MoE's expert load by domain (with
the mutual information between domain and expert choice) into the output folder;
then searches both models' critical sparsity of the intermediate activation on held-out perplexity (and each
expert's own tolerance) into the stores, and prints the expert leaderboard with those columns.
"""

from __future__ import annotations

import contextlib

from pathlib import Path

from rich.console import Console
from rich.rule import Rule

DEMO_MODELS = ("tiny-moe", "tiny-dense")
DEMO_CORPUS = "domains"  # the embedded models' training corpus (moeprof.corpora): its held-out split is profiled
DEMO_DOMAINS = ("wikipedia", "owt", "code")  # its sources: each model is profiled on each alone, then merged


def domain_line(domain_stores) -> str:
    """Return the demo's line on routing specialization: per layer, the mutual information between domain and expert
    choice over the per-domain stores' routing counts (`moeprof.report.plots.text_routing`, what the figure titles)."""
    import numpy as np

    from moeprof.report.plots import text_routing
    from moeprof.store import open_store

    with contextlib.ExitStack() as stack:
        _, info = text_routing([stack.enter_context(open_store(path)) for path in domain_stores])
    bits = ", ".join(f"{v:.3f}" for v in info["mi_bits"])
    fracs = ", ".join(f"{v:.0%}" for v in info["mi_frac"])
    return (f"routing specialization: MI(domain; expert) per layer [{bits}] bits = [{fracs}] of H(domain) "
            f"{float(np.nanmean(info['domain_entropy_bits'])):.3f} bits")


def run_demo(out: Path, *, max_tokens: int = 16384, console: Console | None = None, critical: bool = True) -> int:
    """Run the demo into folder `out`; return the exit status (0)."""
    from moeprof.models import load_model, model_id
    from moeprof.profile import profile
    from moeprof.report.leaderboard import layer_summary, leaderboard
    from moeprof.merge import merge_stores
    from moeprof.report.plots import plot_curves, plot_heatmap, plot_load_by_text
    from moeprof.store import open_store

    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    stores, domain_stores = [], []
    for name in DEMO_MODELS:  # each model on the same data: one store per domain, merged exactly
        model, tok = load_model(name)
        parts = []
        for domain in DEMO_DOMAINS:
            console.print(Rule(f"profile {name} on {domain}:heldout"))
            result = profile(model, tok, [f"{domain}:heldout"], out / f"{name}-{domain}.h5",
                             model_id=model_id(name), max_tokens=max(256, max_tokens // len(DEMO_DOMAINS)),
                             seq_len=256, batch_size=8)
            console.print(f"[green]wrote[/green] {result.path}  ({result.tokens:,} tokens, "
                          f"{result.tokens_per_s:,.0f} tok/s)")
            parts.append(result.path)
        path = merge_stores(parts, out / f"{name}.h5")
        console.print(f"[green]merged[/green] {path}  (the three domains)")
        stores.append(path)
        if name == "tiny-moe":
            domain_stores = parts

    console.print(Rule("plots"))
    written = plot_curves(stores, out, labels=list(DEMO_MODELS))
    written.append(plot_heatmap(stores[0], out, type="i", p=0.9))
    written.append(plot_load_by_text(domain_stores, out, labels=list(DEMO_DOMAINS)))
    for path in written:
        console.print(f"[green]wrote[/green] {path}")
    console.print(domain_line(domain_stores))

    if critical:
        from moeprof.critical import critical_record, run_critical, write
        from moeprof.report.critical_tables import search_headline

        console.print(Rule("critical sparsity of i on held-out perplexity (score 1/ppl ≥ 99% of dense)"))
        for name, path in zip(DEMO_MODELS, stores):
            model, tok = load_model(name)
            with console.status(f"searching the critical sparsity of {name}, then each expert's own tolerance ..."):
                run = run_critical(model, tok, type="i", task=f"ppl:{DEMO_CORPUS}", seq_len=256,
                                   max_tokens=min(max_tokens, 8192), tolerance_text=DEMO_CORPUS,
                                   on_warning=lambda msg: console.print(f"[yellow]warning:[/yellow] {msg}"),
                                   log=lambda line: console.print(line, markup=False, highlight=False))
            write(path, run)
            console.print(f"[bold]{name}[/bold]: {search_headline(critical_record(run.result))}")

    console.print(Rule("expert leaderboard: tiny-moe, intermediate i at p = 0.9"))
    with open_store(stores[0]) as st:
        console.print(layer_summary(st, type="i", p=0.9))
        console.print(leaderboard(st, type="i", p=0.9, by="sparsity", top=12))
    from moeprof.report.html import write_report

    page = write_report([*stores, *domain_stores], out / "report.html")  # = `moeprof report ... -o report.html`
    console.print(f"[green]wrote[/green] {page}  (one interactive page of the study: open it in a browser)")
    console.print(f"\nDone. Files are in [bold]{out}[/bold]; open {page}, or try `moeprof leaderboard {stores[0]} "
                  f"--by spread` or `moeprof info {stores[0]}`.")
    return 0

"""Mask stability and sparsity: block diffusion (DiffusionGemma) against autoregressive decoding, tiny random models.

Usage: PYTHONPATH=$PWD:$PWD/tests python benchmarks/analyses/diffusion_vs_ar.py [--out outputs/analyses/diffusion]

Builds (with the test suite's tiny random configs: hidden 48, 2 layers, 4 experts, top-2, canvas 8) a
DiffusionGemma and a Gemma-4 MoE (the autoregressive family DiffusionGemma's layers come from), runs `moeprof
stability` on each over the same five prompts (type i, p = 0.9; 16 new tokens; DiffusionGemma at most 8 denoising
steps per block, seed 0) and prints, per stack, the token-weighted sparsity of i at p = 0.9 of the routed experts
and their pair-weighted consecutive and drift Jaccards. DiffusionGemma's two stacks share their weights: the
causal encoder (prompt and finished blocks: consecutive positions) and the denoiser (the same position across
denoising steps). Random weights: these numbers describe the code path, not any trained model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from conftest import TINY_TEXTS, tiny_tokenizer  # the tests' offline tokenizer (needs $PWD/tests on PYTHONPATH)
from moe_families import build

from moeprof.stability import stability_run
from moeprof.store import open_store


def summary(path: Path, rows: list[int], p: float) -> dict:
    """Return routed-expert sparsity of i at p (token-weighted) and Jaccards (pair-weighted) over `rows`."""
    with open_store(path) as st:
        k = int(np.argmin(np.abs(np.asarray(st.p_grid) - p)))
        sp = st.sparsity("i")
        kinds = st.sites().kind
        rows = [r for r in rows if kinds[r] == "routed"]
        n = sp.vectors[rows].astype(float)
        sparsity = float(np.nansum(sp.mean[rows, :, k] * n) / n.sum())
        _, a = st.stability()
    out = {"rows": rows, "S_i": sparsity}
    for name in ("consecutive", "drift"):
        pairs = a[f"{name}_pairs"][rows].astype(float)
        out[name] = float(np.nansum(a[f"{name}_jaccard"][rows] * pairs) / pairs.sum())
        out[f"{name}_pairs"] = int(pairs.sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/analyses/diffusion")
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    prompts = list(TINY_TEXTS)
    results = {}
    dg = build("diffusion_gemma", vocab_size=len(tok))
    stability_run(dg, tok, prompts, out / "diffusion_gemma.h5", model_id="tiny-random-diffusion-gemma", p=args.p,
                  max_new_tokens=16, denoising_steps=args.steps, seed=0, show_progress=False)
    with open_store(out / "diffusion_gemma.h5") as st:
        attrs, _ = st.stability()
    results["DiffusionGemma denoiser (across denoising steps)"] = summary(
        out / "diffusion_gemma.h5", [int(r) for r in attrs["denoiser_rows"]], args.p)
    results["DiffusionGemma encoder (consecutive positions)"] = summary(
        out / "diffusion_gemma.h5", [int(r) for r in attrs["encoder_rows"]], args.p)
    ar = build("gemma4", vocab_size=len(tok), vocab_size_per_layer_input=len(tok))
    stability_run(ar, tok, prompts, out / "gemma4.h5", model_id="tiny-random-gemma4", p=args.p, max_new_tokens=16,
                  show_progress=False)
    with open_store(out / "gemma4.h5") as st:
        rows = list(range(st.num_layers))
    results["Gemma-4 MoE, greedy decoding (consecutive tokens)"] = summary(out / "gemma4.h5", rows, args.p)
    print(f"| model, stack (tiny random weights) | S_i @{args.p:g} (routed) | consecutive Jaccard (pairs) | "
          "drift Jaccard (pairs) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['S_i']:.3f} | {r['consecutive']:.3f} ({r['consecutive_pairs']}) | "
              f"{r['drift']:.3f} ({r['drift_pairs']}) |")


if __name__ == "__main__":
    main()

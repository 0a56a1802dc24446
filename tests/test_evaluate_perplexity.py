"""Perplexity, its proxies, and a critical search end to end on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import TINY_TEXTS, tiny_qwen3_model, tiny_tokenizer
from moeprof.evaluate.perplexity import (
    DenseReference,
    pack_sequences,
    perplexity,
    perplexity_of_file,
    read_texts,
)


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_qwen3_model(tok, seed=1), tok


@pytest.fixture(scope="module")
def sequences(tiny):
    _, tok = tiny
    return pack_sequences(tok, list(TINY_TEXTS) * 8, seq_len=32, max_tokens=32 * 12)


def test_pack_sequences_fills_full_rows_within_budget(tiny):
    _, tok = tiny
    seqs = pack_sequences(tok, list(TINY_TEXTS) * 8, seq_len=32, max_tokens=32 * 5 + 7)
    assert seqs.shape == (5, 32)
    first = tok(TINY_TEXTS[0], add_special_tokens=False)["input_ids"]
    assert seqs.view(-1)[: len(first)].tolist() == first
    assert seqs.view(-1)[len(first)] == tok.eos_token_id  # texts are joined by EOS


def test_pack_sequences_rejects_too_little_text(tiny):
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack_sequences(tiny[1], ["short"], seq_len=512)


def test_read_texts_detects_jsonl_by_content_not_name(tmp_path):
    a = tmp_path / "data.txt"
    a.write_text('{"text": "first doc"}\n{"id": 3, "text": "second doc"}\n')
    b = tmp_path / "data.jsonl"
    b.write_text("para one\nstill one\n\npara two\n")
    assert read_texts(a) == ["first doc", "second doc"]
    assert read_texts(b) == ["para one\nstill one", "para two"]


def test_perplexity_matches_transformers_loss(tiny, sequences):
    model, _ = tiny
    res = perplexity(model, sequences, batch_size=5)
    with torch.no_grad():
        losses = [model(input_ids=s[None], labels=s[None]).loss.item() for s in sequences]
    assert res.tokens == sequences.shape[0] * 31
    assert res.seq_nll.shape == (sequences.shape[0],)
    assert res.seq_nll == pytest.approx(np.array(losses) * 31, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)
    assert res.score == pytest.approx(1 / res.ppl)


def test_batch_size_does_not_change_perplexity(tiny, sequences):
    model, _ = tiny
    assert perplexity(model, sequences, batch_size=1).ppl == pytest.approx(
        perplexity(model, sequences, batch_size=12).ppl, rel=1e-6)


def test_dense_against_its_reference_has_zero_kl_and_full_agreement(tiny, sequences):
    model, _ = tiny
    ref = DenseReference(model, sequences, batch_size=4)
    res = perplexity(model, reference=ref)
    assert res.kl == pytest.approx(0.0, abs=1e-6)
    assert res.top1_agreement == 1.0
    assert res.ppl == pytest.approx(ref.result.ppl, rel=1e-7)


def test_sparsified_model_has_positive_kl_lower_agreement_and_higher_ppl(tiny, sequences):
    import moeprof.capture as capture
    model, _ = tiny
    ref = DenseReference(model, sequences, batch_size=4)
    kls = []
    for p in (0.9, 0.5):
        with capture.sparsify(model, type="i", p=p):
            res = perplexity(model, reference=ref)
        kls.append(res.kl)
        assert res.kl > 0 and res.top1_agreement <= 1.0
    assert kls[1] > kls[0]  # more sparsity, further from dense
    with capture.sparsify(model, type="i", p=0.3):
        assert perplexity(model, reference=ref).top1_agreement < 1.0
    assert perplexity(model, reference=ref).kl == pytest.approx(0.0, abs=1e-6)  # restored on exit


def test_reference_without_logprobs_gives_agreement_only(tiny, sequences):
    model, _ = tiny
    ref = DenseReference(model, sequences, keep_logprobs=False)
    res = perplexity(model, reference=ref)
    assert res.kl is None and res.top1_agreement == 1.0


def test_perplexity_of_file(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_TEXTS * 6))
    res = perplexity_of_file(model, tok, path, seq_len=16, max_tokens=64)
    assert res.tokens == 4 * 15 and res.ppl > 1


def test_critical_search_on_perplexity_end_to_end(tiny):
    from moeprof.critical import find_critical
    from moeprof.evaluate.runners import perplexity_evaluator

    # A random tiny model is nearly uniform, so no sparsity hurts it; larger weights make its predictions peaked
    # and the FFN matter, so the search meets a failing point and refines (seeded: the same points every run).
    tok = tiny[1]
    model = tiny_qwen3_model(tok, seed=1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "mlp" in name or "lm_head" in name or "embed" in name:
                prm.mul_(10.0)
    sequences = pack_sequences(tok, list(TINY_TEXTS) * 8, seq_len=32, max_tokens=32 * 12)
    evaluate = perplexity_evaluator(model, sequences, type="x", proxies=True, batch_size=6)
    res = find_critical(evaluate, target=0.99, type="x", task="ppl")
    assert res.dense.extra["ppl"] == pytest.approx(perplexity(model, sequences).ppl, rel=1e-6)
    assert res.critical_ratio >= 0.99 and res.failing_p is not None
    assert res.critical_p - res.failing_p <= 0.005 + 1e-9
    failing = next(pt for pt in res.points if pt.p == res.failing_p)
    assert failing.score / res.dense_score < 0.99
    for pt in res.points[1:]:
        assert pt.score == pytest.approx(1 / pt.extra["ppl"])  # score = 1/ppl
        assert 0 < pt.sparsity_token < 1 and pt.per_expert_sparsity.shape == (2, 1)
        assert pt.extra["kl"] > 0
    # realized, not p: the critical sparsity is what the model did at the critical p
    assert res.critical_sparsity_token == res.critical.sparsity_token != 1 - res.critical_p
    assert res.ratio_ci is not None and res.ratio_ci[0] <= res.critical_ratio <= res.ratio_ci[1]
    assert res.num_evaluations == len(res.points) <= 11

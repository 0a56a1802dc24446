"""The corpora module: real text from the evals wheel, a fixed hash split, an atomic cached JSONL file."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moeprof import corpora

pytestmark = pytest.mark.real

_real_wheel = corpora.fetch_wheel("evals", corpora.EVALS_VERSION)  # downloaded once, then cached


@pytest.mark.parametrize("name", ["wikipedia", "owt"])
def test_source_has_1000_real_english_texts_split_about_ten_percent(name):
    train, held = corpora.texts(name, "train"), corpora.texts(name, "heldout")
    assert len(train) + len(held) == 1000
    assert 60 <= len(held) <= 140
    assert not set(train) & set(held)
    words = " ".join(train[:50]).split()
    assert sum(w.lower() in {"the", "of", "and", "in", "to", "a"} for w in words) / len(words) > 0.1


def test_split_is_decided_by_the_text_alone():
    held = corpora.texts("wikipedia", "heldout")
    assert all(corpora.is_heldout(t) for t in held)
    assert not any(corpora.is_heldout(t) for t in corpora.texts("wikipedia", "train"))
    # the same text lands in the same split whatever corpus or order it comes from
    assert corpora.texts("mixed", "heldout", order="concatenated") == held + corpora.texts("owt", "heldout")
    assert sorted(corpora.texts("mixed", "heldout")) == sorted(held + corpora.texts("owt", "heldout"))
    assert corpora.texts("wikipedia", "heldout") == held


def test_text_file_holds_one_json_text_per_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPROF_CACHE", str(tmp_path))
    # reuse the real wheel cache so the test does not download again
    monkeypatch.setattr(corpora, "fetch_wheel", lambda name, version: _real_wheel)
    path = corpora.text_file("owt", "heldout")
    assert path.is_relative_to(tmp_path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == corpora.texts("owt", "heldout")
    assert not list(path.parent.glob(".*tmp"))
    assert corpora.text_file("owt", "heldout") == path


def test_unknown_names_raise_with_the_choices():
    with pytest.raises(ValueError, match="wikipedia"):
        corpora.texts("books", "train")
    with pytest.raises(ValueError, match="heldout"):
        corpora.text_file("owt", "test")



def test_mixed_alternates_its_sources_text_by_text():
    wiki, owt = corpora.texts("wikipedia", "heldout"), corpora.texts("owt", "heldout")
    mixed = corpora.texts("mixed", "heldout")
    n = min(len(wiki), len(owt))
    assert mixed[: 2 * n : 2] == wiki[:n] and mixed[1 : 2 * n : 2] == owt[:n]
    assert mixed[2 * n:] == (wiki[n:] or owt[n:])  # the longer source's rest, in its order
    with pytest.raises(ValueError, match="interleaved"):
        corpora.texts("mixed", "heldout", order="shuffled")


def test_first_tokens_of_mixed_heldout_hold_both_sources_and_its_perplexity_is_not_wikipedias():
    """Before the interleave, mixed:heldout began with ~20 k tokens of Wikipedia, so its first 2,048 tokens (and
    ppl:mixed) were exactly Wikipedia's."""
    from moeprof.data import iter_batches
    from moeprof.evaluate.perplexity import perplexity, sequences_from_file
    from moeprof.models import load_model

    model, tok = load_model("tiny-moe")
    batch = next(iter_batches(tok, ["mixed:heldout"], seq_len=256, batch_size=8, max_tokens=2048))  # [8, 256]
    text = tok.decode(batch.flatten().tolist())
    wiki, owt = corpora.texts("wikipedia", "heldout"), corpora.texts("owt", "heldout")
    assert wiki[0][:60] in text and owt[0][:60] in text
    seqs = {name: sequences_from_file(tok, corpora.text_file(name, "heldout"), seq_len=256, max_tokens=2048)
            for name in ("mixed", "wikipedia")}
    assert not torch.equal(seqs["mixed"], seqs["wikipedia"])
    ppl = {name: perplexity(model, s).ppl for name, s in seqs.items()}
    assert abs(ppl["mixed"] / ppl["wikipedia"] - 1) > 0.01, ppl

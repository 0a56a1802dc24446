"""Real English text that moeprof can obtain offline: Wikipedia paragraphs and OpenWebText documents.

The text ships inside the ``evals`` wheel on PyPI (MIT licence, OpenAI's eval suite), in its "Schelling
point" task data: ``evals/registry/data/schelling_point/wikipedia_5.jsonl`` (1,000 Wikipedia paragraphs)
and ``owt_5.jsonl`` (1,000 OpenWebText documents). Each line is a JSON object whose key ``"0"`` holds the
original text; keys ``"1"``…``"10"`` are sentence-shuffled variants made for that task, which we ignore.

The wheel is fetched once with ``moeprof.resources.fetch_wheel`` (≈46 MB download, cached unpacked under
``~/.cache/moeprof``). Sizes: wikipedia ≈601 k characters, owt ≈665 k characters.

Split: a text is held out iff the first 8 bytes of SHA-256(text), read as a big-endian integer, are
``< HELDOUT_FRAC`` of the range — a property of the text alone, so the split never depends on RNG state,
on file order or on which corpus the text came from (≈10% held out: 104 wikipedia + 95 owt texts,
≈121 k characters; train: 1,801 texts, ≈1.15 M characters).

``mixed`` interleaves the two sources text by text (wikipedia, owt, wikipedia, owt, …; the longer list's rest
at the end), so any prefix of it (the first ``--max-tokens`` of ``mixed:heldout``) holds both. The texts of each
split are those of ``wikipedia`` plus those of ``owt``; only their order is fixed this way. The embedded models
were trained before that, on the concatenation (all wikipedia texts, then all owt texts):
``texts(..., order="concatenated")`` reproduces it.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from moeprof.atomic import write_jsonl
from moeprof.resources import ResourceError, cache_dir, fetch_wheel

EVALS_VERSION = "3.0.1.post1"
HELDOUT_FRAC = 0.10
SOURCES = {
    "wikipedia": "evals/registry/data/schelling_point/wikipedia_5.jsonl",
    "owt": "evals/registry/data/schelling_point/owt_5.jsonl",
}
NAMES = ("wikipedia", "owt", "mixed")  # "mixed" = wikipedia and owt texts, interleaved one by one
SPLITS = ("train", "heldout")
ORDERS = ("interleaved", "concatenated")  # how "mixed" orders its two sources


def is_heldout(text: str) -> bool:
    """Return True when `text` belongs to the held-out split (decided by a hash of the text only)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h < HELDOUT_FRAC * 2**64


@lru_cache(maxsize=None)
def _all_texts(name: str) -> tuple[str, ...]:
    """Return every original text of one source file, in file order."""
    path = fetch_wheel("evals", EVALS_VERSION) / SOURCES[name]
    if not path.is_file():
        raise ResourceError(f"{path} is missing from the evals {EVALS_VERSION} wheel; delete its cache folder and retry")
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line)["0"])
    return tuple(out)


def _check(name: str, split: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def texts(name: str, split: str, order: str = "interleaved") -> list[str]:
    """Return the texts of corpus `name` ("wikipedia", "owt", "mixed") in `split` ("train", "heldout").

    A single source keeps its file order. "mixed" alternates the sources' texts one by one (`order="interleaved"`,
    the default) or gives all wikipedia texts then all owt texts (`order="concatenated"`, the embedded models'
    training order).
    """
    _check(name, split)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    want_heldout = split == "heldout"
    parts = [[t for t in _all_texts(src) if is_heldout(t) == want_heldout]
             for src in (("wikipedia", "owt") if name == "mixed" else (name,))]
    if order == "concatenated" or len(parts) == 1:
        return [t for part in parts for t in part]
    out: list[str] = []
    for n in range(max(map(len, parts))):
        out.extend(part[n] for part in parts if n < len(part))
    return out


def text_file(name: str, split: str) -> Path:
    """Return the path of a cached JSONL file (one ``{"text": ...}`` per line) holding ``texts(name, split)``.

    Written once to a temporary name in the cache and renamed, so a crash never leaves a partial file.
    """
    _check(name, split)
    stem = f"{name}-interleaved" if name == "mixed" else name  # (a cache of the old concatenated order is not reused)
    target = cache_dir() / "corpora" / f"evals-{EVALS_VERSION}" / f"{stem}-{split}.jsonl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(target, ({"text": t} for t in texts(name, split)))
    return target

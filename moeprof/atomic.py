"""Output files: where one may be written, and writing it so that a crash, Ctrl-C, SIGTERM or a full disk never
leaves a partial one under the real name.

`check_writable` / `check_creatable` are the rules every command applies to an output path before any work
(the folder exists and is writable, the path is not a folder, a file can be created there).

Every file is written to `.NAME.tmp-PID-TID` beside its target and renamed onto it on success. A full disk is one
`DiskFullError` (naming the file and the bytes needed) with the temporary file removed; a temporary file left by a
process that no longer exists (SIGKILL, power loss) is removed by the next write of the same target.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Iterable, Iterator

from moeprof.errors import MoeprofError

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


class DiskFullError(MoeprofError, OSError):
    """No space left for a file being written (the temporary file was removed; nothing else changed)."""


class OutputError(MoeprofError, ValueError):
    """An output path where no file can be written (missing or read-only folder, a folder named as the file)."""


def check_writable(path: str | os.PathLike, flag: str | None = None, example: str = "profile.h5") -> Path:
    """Return `path` if a file can be created there; raise OutputError naming the folder otherwise (and the
    command-line `flag` that named it, when it came from one; a folder given as the file gets `example` as the
    file name to suggest)."""
    path = Path(path)
    other = f"choose another {flag}" if flag else "choose another output path"
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist; create it (mkdir -p {path.parent}) or {other}")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"output folder {path.parent} is not writable; {other}")
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name like {path / example}")
    return path


def check_creatable(path: str | os.PathLike, flag: str = "--out") -> None:
    """Raise OutputError unless a file can really be created beside `path` (creates and removes its temporary
    file: /proc or a read-only mount fails here, before a run, not after it)."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot create files in {Path(path).parent} ({exc.strerror or exc}); choose another "
                          f"{flag}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def tmp_name(path: str | os.PathLike) -> Path:
    """Return the temporary name this process and thread write `path` under."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (or staging folders) of `path` whose writing process is gone; return what was
    removed."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.tmp-(\d+)-\d+$")
    removed = []
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            m = pattern.match(p.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
                    removed.append(p)
    return removed


def staging_folder(out: str | os.PathLike) -> Path:
    """Create and return an empty folder to draw the contents of folder `out` in, to be moved into `out` once
    complete: beside `out`, or in its nearest existing ancestor when `out` does not exist yet (so that a failed run
    creates nothing), named like a temporary file so that a run killed mid-way (SIGKILL) leaves a folder the next
    run removes (`remove_stale`)."""
    out = Path(out)
    ancestor = next(a for a in (out, *out.parents) if a.exists())
    beside = (ancestor if ancestor != out else out.parent) / out.name
    remove_stale(beside)
    staging = tmp_name(beside)
    staging.mkdir()
    return staging


def _mb(n: int) -> str:
    return f"{max(n, 1) / 2**20:.1f}"


def disk_full(path: str | os.PathLike, needed_bytes: int | None = None) -> DiskFullError:
    """Return the one-line error for a full disk while writing `path`."""
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    need = f"; {_mb(needed_bytes)} MB needed" if needed_bytes else ""
    have = f", {_mb(free)} MB free" if free is not None else ""
    return DiskFullError(errno.ENOSPC, f"disk full writing {path}{need}{have}; free space there or choose "
                         "another --out (nothing was changed)")


def check_space(path: str | os.PathLike, needed_bytes: int) -> None:
    """Raise DiskFullError before any writing when the folder of `path` has less than `needed_bytes` free."""
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < needed_bytes:
        raise disk_full(path, needed_bytes)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on any error remove it.

    An ENOSPC / EDQUOT / EFBIG `OSError` inside the block becomes `DiskFullError` naming `path`.
    """
    path = Path(path)
    remove_stale(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except DiskFullError:
        raise
    except OSError as exc:
        if exc.errno in _FULL:
            raise disk_full(path, needed_bytes or _size(tmp)) from None
        raise
    finally:  # also on KeyboardInterrupt / SIGTERM: never leave the temporary file behind
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def _size(p: Path) -> int | None:
    try:
        return p.stat().st_size or None
    except OSError:
        return None


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write `data` to `path` atomically (free space checked first, ENOSPC as DiskFullError); return the path."""
    n = len(data) if not isinstance(data, memoryview) else data.nbytes
    check_space(path, n)
    with atomic_path(path, needed_bytes=n) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8) and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write one JSON object per line to `path` atomically; return the number of rows."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n

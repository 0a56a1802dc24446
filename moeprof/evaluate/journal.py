"""A journal of completed evaluations beside a search's output, so that an interrupted search resumes.

A search (`moeprof critical`, `moeprof schedule`) runs for minutes to hours, one full evaluation at a time.
Each evaluation, as it completes, is appended to `OUT.journal` (the whole file rewritten atomically: a Ctrl-C,
SIGTERM or crash leaves the previous journal or the new one, never half of one). The same command run again
reuses every journaled evaluation whose key (model, weights, data, activation type, rule, …: everything that
decides the result of `evaluate(p)`) and p (a uniform p, or a schedule's per-expert table) match, and evaluates only what is missing; since a search is a
deterministic function of its evaluations, the resumed search ends with the same record as an uninterrupted one.

    journal = EvaluationJournal(journal_path(out), key={"search": "critical", "model": ..., "task": ...})
    evaluate = journal.wrap(evaluate)    # evaluate(p) -> EvalPoint, from the journal when it holds p
    ...                                  # the search; its record written
    journal.discard()                    # this key's entries go (the file, when nothing else is in it)

Entries of other keys (another task, another model) stay in the file untouched. The file is JSON: floats are
written with `repr`, so every score, per-example value and per-expert sparsity reads back bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Callable

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.evaluate.point import EvalPoint

JOURNAL_FORMAT = "moeprof evaluation journal"
JOURNAL_VERSION = 1


class JournalError(MoeprofError, ValueError):
    """A journal file that cannot be read (message names the file and the fix)."""


def journal_path(out: str | Path) -> Path:
    """Return the journal file of output `out`: `OUT.journal` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".journal")


def _encode(value):
    """Return `value` as JSON-able data; arrays keep their dtype and shape."""
    if isinstance(value, np.ndarray):
        return {"__array__": value.dtype.str, "shape": list(value.shape),
                "data": [float(v) for v in value.ravel().tolist()] if value.dtype.kind == "f"
                else value.ravel().tolist()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if hasattr(value, "cpu") and hasattr(value, "numpy"):  # a torch tensor in `extra`
        return _encode(value.detach().cpu().numpy())
    return value


def _decode(value):
    if isinstance(value, dict):
        if "__array__" in value:
            return np.asarray(value["data"], dtype=np.dtype(value["__array__"])).reshape(value["shape"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def point_to_data(pt: EvalPoint) -> dict:
    """Return `pt` as JSON-able data that `point_from_data` turns back into an equal EvalPoint."""
    return {f.name: _encode(getattr(pt, f.name)) for f in fields(pt)}


def point_from_data(data: dict) -> EvalPoint:
    """Return the EvalPoint that `point_to_data` wrote."""
    return EvalPoint(**{k: _decode(v) for k, v in data.items()})


def point_id(p, tag: str = "") -> str:
    """Return the journal's name of the evaluation at `p` of split `tag`: "dense", a uniform p to 10 decimals, or
    a per-expert table [L, E] (a schedule) by the hash of its float64 values (NaN = dense expert)."""
    import hashlib

    prefix = f"{tag}:" if tag else ""
    if p is None:
        return prefix + "dense"
    if hasattr(p, "detach"):
        p = p.detach().cpu().numpy()
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim == 0:
        return prefix + repr(round(float(arr), 10))
    arr = np.where(np.isnan(arr), np.nan, arr)  # one NaN bit pattern
    return prefix + f"table{list(arr.shape)}:" + hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _canonical(key: dict) -> str:
    return json.dumps(_encode(key), sort_keys=True)


class EvaluationJournal:
    """The journaled evaluations of one search (`key`) in the journal file `path` (see the module docstring)."""

    def __init__(self, path: str | Path, key: dict):
        self.path = Path(path)
        self.key = _canonical(key)
        self._others: list[dict] = []  # other searches' entries, kept as they are
        self._mine: dict[str, dict] = {}  # by `point_id`
        self.reused = 0  # evaluations taken from the journal so far
        self._read()

    def _read(self) -> None:
        if not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            if doc.get("format") != JOURNAL_FORMAT:
                raise ValueError("not a journal")
            entries = doc["entries"]
            for e in entries:
                if _canonical(e["key"]) == self.key:
                    self._mine[e["point_id"]] = e
                else:
                    self._others.append(e)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise JournalError(f"{self.path} is not a readable moeprof evaluation journal ({exc}); move it away "
                               "(or delete it: the search then starts from the beginning)") from None

    def __len__(self) -> int:
        """Return how many evaluations of this search the journal holds."""
        return len(self._mine)

    def get(self, p, tag: str = "") -> EvalPoint | None:
        """Return the journaled evaluation at `p` (None = dense; a float; a per-expert table) of split `tag`, or
        None when it has none."""
        e = self._mine.get(point_id(p, tag))
        return None if e is None else point_from_data(e["point"])

    def add(self, p, pt: EvalPoint, tag: str = "") -> None:
        """Journal `pt`, the evaluation at `p` of split `tag`, and rewrite the file atomically."""
        from moeprof.atomic import write_text

        pid = point_id(p, tag)
        self._mine[pid] = {"key": json.loads(self.key), "point_id": pid, "point": point_to_data(pt)}
        write_text(self.path, self._dumps(self._others + list(self._mine.values())))

    def wrap(self, evaluate: Callable, tag: str = "", on_reuse: Callable[[EvalPoint], None] | None = None) -> Callable:
        """Return `evaluate` that answers from the journal when it holds p (of split `tag`: one journal serves a
        search over several evaluators, e.g. a schedule's calibration and held-out splits) and journals every
        new evaluation."""

        def journaled(p) -> EvalPoint:
            pt = self.get(p, tag)
            if pt is not None:
                self.reused += 1
                if on_reuse is not None:
                    on_reuse(pt)
                return pt
            pt = evaluate(p)
            self.add(p, pt, tag)
            return pt

        return journaled

    def discard(self) -> None:
        """Remove this search's entries (the search's record is written); the file goes when nothing is left."""
        from moeprof.atomic import write_text

        self._mine.clear()
        if self._others:
            write_text(self.path, self._dumps(self._others))
        else:
            self.path.unlink(missing_ok=True)

    @staticmethod
    def _dumps(entries: list[dict]) -> str:
        # allow_nan: NaN sparsities (an expert that saw no token) are data; Python's json reads them back
        return json.dumps({"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "entries": entries},
                          allow_nan=True)


def model_key(model, model_id: str) -> dict:
    """Return what identifies a loaded model in a journal key: its id, config, weights, dtype and device."""
    import hashlib

    param = next(model.parameters())
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return {"model": model_id, "config": hashlib.sha256(config.encode()).hexdigest()[:16],
            "weights": weights_fingerprint(model), "dtype": str(param.dtype), "device": param.device.type}


def weights_fingerprint(model, elements: int = 64) -> str:
    """Return a short hash of every parameter's name, shape, dtype and first and last `elements` values: cheap
    (no pass over all the weights) and different for another checkpoint of the same config."""
    import hashlib

    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            h.update(f"{name}:{tuple(param.shape)}:{param.dtype}:{param.device.type}".encode())
            if flat.device.type == "meta":
                continue
            for part in (flat[:elements], flat[-elements:]):
                h.update(part.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

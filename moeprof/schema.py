"""The row type of the store schema and the one way a dataset is written (numpy only: no h5py, no torch).

Both sides of the store boundary use it: `moeprof.stats` declares each accumulator's HDF5 state as `Field` rows
(torch leaf, cannot import h5py), and `moeprof.store` holds the table of everything else it writes (h5py, cannot
import torch). `moeprof.store.schema_table` joins the two into the one table of the store's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moeprof.activation_types import TYPE_NAMES

# how `merge` combines a state field: "sum" / "max" element-wise (an all-reduce across ranks); "concat" = stream
# state (rows in stream order: the accumulator's own merge appends b's rows after a's; no all-reduce, not
# commutative); "" = derived (recomputed from the state, never merged)
REDUCTIONS = ("sum", "max", "concat", "")
COMPRESS_ABOVE = 4096  # entries: smaller datasets stay uncompressed (fast to read, gzip gains little)


@dataclass(frozen=True)
class Field:
    """One dataset of the store: name (relative to its group; may hold `{type}`), dims, dtype, doc, units.

    dims name the axes: L = layers, E = experts, P = p-grid, B = histogram bins, N = tokens, K = slots.
    `reduce` says how two accumulators' values of this field merge: "sum", "max", "concat" for per-token stream
    rows appended in stream order (the trace), or "" for a dataset that is derived from the state (a mean, a
    standard deviation) and recomputed instead of merged.
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    doc: str
    units: str
    reduce: str = ""

    def __post_init__(self):
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"field {self.name!r}: unknown reduction {self.reduce!r}; choose one of "
                             f"{', '.join(repr(r) for r in REDUCTIONS)}")

    def doc_for(self, type: str | None = None) -> str:
        """Return the doc with `{type}` (e.g. "i") and `{name}` (e.g. "i (intermediate)") filled in."""
        return self.doc.format(type=type or "", name=f"{type} ({TYPE_NAMES[type]})" if type else "")


def checksummed(arr: np.ndarray) -> bool:
    """True when a dataset of `arr` is written with an HDF5 fletcher32 checksum: every array of numbers (HDF5
    filters need a chunked layout, which a scalar cannot have, and do not apply to variable-length strings)."""
    return arr.ndim > 0 and arr.dtype.kind in "biuf"


def put(group: Any, name: str, data: Any, doc: str, units: str):
    """Create dataset `name` in an h5py-like group with its `doc` and `units` attributes; return it.

    Arrays of numbers carry a fletcher32 checksum (`checksummed`): HDF5 verifies it on every read, so a damaged
    byte is an error naming the dataset (`moeprof.store.reader`), never a silently wrong number."""
    arr = np.asarray(data)
    ds = group.create_dataset(name, data=arr, compression="gzip" if arr.size > COMPRESS_ABOVE else None,
                              fletcher32=checksummed(arr))
    ds.attrs["doc"] = doc
    ds.attrs["units"] = units
    return ds

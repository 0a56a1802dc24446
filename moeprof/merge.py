"""`merge_stores(inputs, out)`: combine profile stores of the same model into the store of their union.

Exact: each input's statistics are read back with `ProfileStats.from_store` (schema 2 keeps the exact state)
and combined with `merge`, i.e. each accumulator's declared reductions (sum / max; the trace concatenates, so
inputs given in stream order — shards 0, 1, ... of `--shard I/N` — give the trace of one run over the union).
Refused, with one line naming what differs: other models, p-grids, activation types, schema versions or
histogram edges; the same data twice (two inputs sharing a data fingerprint, see `moeprof.data`, or tokens of
one source both read, whatever their source lists: `data_shards[].source_tokens`); an output that is one of
the inputs; and stores holding /stability (`moeprof stability`: per-expert means, not mergeable state).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from moeprof.stats import ProfileStats, TraceRecorder
from moeprof.store import ProfileMeta, Store, StoreError, open_store, write_profile


class MergeError(StoreError):
    """Stores that cannot be merged (another model, grid, types, schema, histogram edges, or the same data)."""


def _identity(st: Store) -> dict:
    """Return what two mergeable stores must share, by the name the refusal uses."""
    a = st.attrs
    return {"model": a["model"], "p-grid": _numbers(st.p_grid), "activation types": tuple(st.types),
            "schema version": st.version, "histogram edges": _numbers(st.hist_edges),
            "model shape (type, layers, experts, top-k, hidden size)": (
                a.get("model_type"), st.num_layers, st.num_experts, a.get("top_k"), a.get("hidden_size"))}


def _numbers(values) -> tuple[float, ...]:
    """Return plain floats (rounded, so that a refusal prints 0.5 rather than np.float64(0.5))."""
    return tuple(round(float(v), 12) for v in values)


def data_shards(st: Store) -> list[dict]:
    """Return the data a store consumed: [{sources, shard, sequences, tokens, fingerprint}] (a store written
    before fingerprints: one entry without a fingerprint)."""
    a = st.attrs
    if "data_shards" in a:
        return json.loads(a["data_shards"])
    return [{"sources": st.data_sources, "tokens": int(a.get("tokens", 0)),
             "fingerprint": None}]


def _overlap(a: dict, b: dict) -> bool:
    """True when two data entries share sequences: the same fingerprint, overlapping tokens of a source both read
    (whatever else their source lists hold), or overlapping sequence ranges of the same sources packed the same
    way (a whole-data run and one of its shards, from stores written before per-source ranges)."""
    if a.get("fingerprint") is not None and a.get("fingerprint") == b.get("fingerprint"):
        return True
    if "source_tokens" in a and "source_tokens" in b:
        return any(a0 < b1 and b0 < a1 for src, (a0, a1) in a["source_tokens"].items()
                   if src in b["source_tokens"] for b0, b1 in [b["source_tokens"][src]])
    if "sequences" not in a or "sequences" not in b or (a.get("sources"), a.get("seq_len")) != (
            b.get("sources"), b.get("seq_len")):
        return False
    (a0, a1), (b0, b1) = a["sequences"], b["sequences"]
    return a0 < b1 and b0 < a1


def _same_file(a: Path, b: Path) -> bool:
    """True when `a` and `b` name one file (through links, `..` or another spelling)."""
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def merge_stores(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write the store of the union of `inputs`' data to `out` (atomically) and return its path."""
    if len(inputs) < 2:
        raise MergeError("merge needs at least two stores: moeprof merge A.h5 B.h5 ... -o C.h5")
    for p in inputs:
        if _same_file(Path(out), Path(p)):
            raise MergeError(f"the output {out} is one of the inputs ({p}); merging into an input would replace it "
                             "and a later merge would count its data twice: give another -o")
    stores = [open_store(p) for p in inputs]
    try:
        first = stores[0]
        ref = _identity(first)
        for st in stores[1:]:
            ident = _identity(st)
            for what, value in ref.items():
                if ident[what] != value:
                    raise MergeError(f"cannot merge {st.path} with {first.path}: different {what} "
                                     f"({ident[what]} vs {value})")
        for st in stores:  # (its means per expert are not the exact state a merge would need)
            if st.stability() is not None:
                raise MergeError(f"{st.path} holds /stability (the mask stability of one generation run), which merge "
                                 "cannot combine; run `moeprof stability` once with every prompt instead")
        shards: list[dict] = []
        for st in stores:
            for entry in data_shards(st):
                entry = {**entry, "store": entry.get("store", str(st.path))}
                for prev in shards:
                    if _overlap(prev, entry):
                        raise MergeError(f"{st.path} and {prev['store']} hold the same data ({entry.get('tokens')} "
                                         f"tokens of {', '.join(entry.get('sources', []))}); merging would count "
                                         "it twice")
                shards.append(entry)

        stats = ProfileStats.from_store(first)
        for st in stores[1:]:
            stats = stats.merge(ProfileStats.from_store(st))
        traces = [(TraceRecorder.from_hdf5(st.member_group(TraceRecorder)), st.token_texts())
                  for st in stores if st.has_member(TraceRecorder)]
        trace, texts = None, None
        if len(traces) == len(stores):  # a trace only when every input has one (else it would not be the union's)
            trace, texts = traces[0]
            for t, tx in traces[1:]:
                trace = trace.merge(t)
                texts = None if texts is None or tx is None else texts + tx
        a = first.attrs
        sources = list(dict.fromkeys(s for st in stores for s in st.data_sources))
        meta = ProfileMeta(
            model=a["model"], model_type=a["model_type"], architecture=a["architecture"], is_moe=bool(a["is_moe"]),
            top_k=int(a["top_k"]), hidden_size=int(a["hidden_size"]), model_config=json.loads(a["model_config"]),
            data_sources=sources, tokens=sum(int(st.attrs["tokens"]) for st in stores), seq_len=int(a["seq_len"]),
            batch_size=int(a["batch_size"]), dtype=str(a["dtype"]), device=str(a["device"]),
            wall_s=sum(float(st.attrs.get("wall_s", 0.0)) for st in stores),
            extra={"data_shards": shards, "merged_from": [str(st.path) for st in stores],
                   # facts of the model, not of the data: the same in every input (compare reads the parameters)
                   **{k: json.loads(a[k]) for k in ("parameters", "router") if k in a}})
        sites = first.sites()
        return write_profile(out, stats, meta, intermediate_sizes=[int(x) for x in sites.intermediate_size],
                             site_kinds=sites.kind, site_layers=[int(x) for x in sites.layer], trace=trace,
                             token_texts=texts)
    finally:
        for st in stores:
            st.close()

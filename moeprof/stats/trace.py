"""The per-token trace: routing and per-p sparsity of the first tokens of a profile, row by row."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from moeprof.activation_types import ACTIVATION_TYPES
from moeprof.errors import InvalidArgument
from moeprof.schema import Field, put
from moeprof.stats.base import SPARSITY_UNITS, Observation, ProfileShape, register

_TRACE_ROWS = ("token_id", "sequence", "position", "expert", "weight")  # per-token arrays besides sparsity_<t>


@register
class TraceRecorder:
    """Per-token detail for the first `max_tokens` tokens: routing and sparsity at each p, per (layer, slot).

    Merging: merge(a, b) is the trace of a's token stream followed by b's (b's sequence indices shifted past
    a's). It is only meaningful for consecutive streams in that order (it is not commutative): b's rows are
    appended only while a recorded every token it saw and room is left, so the result equals the trace of the
    concatenated stream.
    """

    key = "trace"
    group = "trace"
    per_type = False
    collected = False  # a profile records it only when asked (--trace-tokens), beside ProfileStats
    STATE = (
        Field("token_id", ("N",), "int64", "token id [token]", "", "concat"),
        Field("sequence", ("N",), "int64", "packed sequence index [token]", "", "concat"),
        Field("position", ("N",), "int64", "position within its sequence [token]", "", "concat"),
        Field("expert", ("N", "L", "K"), "int64", "expert chosen in each routed slot [token, layer, slot]", "",
              "concat"),
        Field("weight", ("N", "L", "K"), "float32", "routing weight of each slot [token, layer, slot]",
              "routing weight", "concat"),
        Field("sparsity_{type}", ("N", "L", "K", "P"), "float32", "top-p sparsity of {name} at each p "
              "[token, layer, slot, p]", SPARSITY_UNITS, "concat"),
    )

    def __init__(self, max_tokens: int, num_layers: int, top_k: int, p_grid: Sequence[float], types: Sequence[str]):
        N, L, K, P = max_tokens, num_layers, top_k, len(p_grid)
        self.max_tokens = N
        self.token_id = torch.full((N,), -1, dtype=torch.long)
        self.sequence = torch.full((N,), -1, dtype=torch.long)
        self.position = torch.full((N,), -1, dtype=torch.long)
        self.expert = torch.full((N, L, K), -1, dtype=torch.long)
        self.weight = torch.full((N, L, K), float("nan"))
        self.sparsity = {t: torch.full((N, L, K, P), float("nan")) for t in types}
        self.offset = 0  # global index of the current batch's first token (= tokens seen before it)
        self.recorded = 0
        self.sequences = 0  # sequences seen

    @classmethod
    def empty(cls, shape: ProfileShape, type: str | None = None) -> "TraceRecorder":
        return cls(shape.trace_tokens, shape.num_layers, shape.top_k, shape.p_grid, shape.types)

    def begin_batch(self, input_ids: torch.Tensor, first_sequence: int) -> None:
        """Record token ids and positions of a batch [B, S] that starts at the current offset."""
        B, S = input_ids.shape
        self.sequences = max(self.sequences, first_sequence + B)
        n = max(0, min(self.max_tokens - self.offset, B * S))
        if n:
            sl = slice(self.offset, self.offset + n)
            self.token_id[sl] = input_ids.reshape(-1)[:n].cpu()
            self.position[sl] = torch.arange(B * S)[:n] % S
            self.sequence[sl] = first_sequence + torch.arange(B * S)[:n] // S
            self.recorded = max(self.recorded, self.offset + n)

    def end_batch(self, num_tokens: int) -> None:
        self.offset += num_tokens

    def add(self, obs: Observation) -> None:
        """Record the routing (type None) or the per-p sparsity (a traced type) of the rows within max_tokens."""
        if (obs.type is not None and obs.type not in self.sparsity) or self.offset >= self.max_tokens:
            return  # (a full trace costs nothing more: no copy to the host)
        glob = obs.token_idx.cpu() + self.offset
        keep = glob < self.max_tokens
        rows, slot = glob[keep], obs.slot.cpu()[keep]
        if not rows.numel():
            return
        if obs.type is None:
            self.expert[rows, obs.layer, slot] = obs.expert_ids.cpu()[keep]
            self.weight[rows, obs.layer, slot] = obs.weights.cpu()[keep].float()
        else:
            s = obs.vector_summary().sparsity()
            self.sparsity[obs.type][rows, obs.layer, slot] = s[keep.to(s.device)].float().cpu()

    def state(self) -> dict[str, torch.Tensor]:
        """Return the exact state: the per-token arrays, sparsity_<t> per type, and the stream counters."""
        out = {"token_id": self.token_id, "sequence": self.sequence, "position": self.position,
               "expert": self.expert, "weight": self.weight}
        out.update({f"sparsity_{t}": a for t, a in self.sparsity.items()})
        out.update({k: torch.tensor(getattr(self, k)) for k in ("offset", "recorded", "sequences")})
        return out

    def merge(self, other: "TraceRecorder") -> "TraceRecorder":
        """Return the trace of this stream followed by `other`'s (see the class doc)."""
        if (self.max_tokens, self.expert.shape, list(self.sparsity)) != (
                other.max_tokens, other.expert.shape, list(other.sparsity)) or any(
                self.sparsity[t].shape != other.sparsity[t].shape for t in self.sparsity):
            raise InvalidArgument("cannot merge traces of different sizes (max tokens, layers, slots, p-grid or types)")
        out = TraceRecorder(self.max_tokens, 0, 0, (), ())
        for k in _TRACE_ROWS:
            setattr(out, k, getattr(self, k).clone())
        out.sparsity = {t: a.clone() for t, a in self.sparsity.items()}
        n = min(other.recorded, self.max_tokens - self.offset) if self.recorded == self.offset else 0
        if n > 0:
            dst, src = slice(self.offset, self.offset + n), slice(0, n)
            for k in ("token_id", "position", "expert", "weight"):
                getattr(out, k)[dst] = getattr(other, k)[src]
            out.sequence[dst] = other.sequence[src] + self.sequences
            for t in out.sparsity:
                out.sparsity[t][dst] = other.sparsity[t][src]
        out.recorded = self.recorded + max(n, 0)
        out.offset = self.offset + other.offset
        out.sequences = self.sequences + other.sequences
        return out

    def to_hdf5(self, group) -> None:
        """Write the recorded rows (the stream counters as attributes) into an h5py-like group."""
        n = self.recorded
        group.attrs["doc"] = "per-token detail of the first tokens profiled (bounded by --trace-tokens)"
        group.attrs["max_tokens"] = self.max_tokens
        group.attrs["tokens_seen"] = self.offset
        group.attrs["sequences_seen"] = self.sequences
        *rows, sparsity = self.STATE
        for f in rows:
            put(group, f.name, getattr(self, f.name)[:n].numpy(), f.doc_for(), f.units)
        for t, arr in self.sparsity.items():
            put(group, sparsity.name.format(type=t), arr[:n].numpy(), sparsity.doc_for(t), sparsity.units)

    @classmethod
    def from_hdf5(cls, group) -> "TraceRecorder":
        """Return the trace a group holds (a group without the v2 counters: max_tokens = tokens seen = rows)."""
        rows = {k: torch.from_numpy(np.asarray(group[k][()])) for k in _TRACE_ROWS}
        n, L, K = rows["expert"].shape
        types = [t for t in ACTIVATION_TYPES if f"sparsity_{t}" in group]
        sparsity = {t: torch.from_numpy(np.asarray(group[f"sparsity_{t}"][()])) for t in types}
        P = next(iter(sparsity.values())).shape[-1] if sparsity else 0
        attrs = group.attrs
        out = cls(int(attrs.get("max_tokens", n)), L, K, range(P), types)
        for k, v in rows.items():
            getattr(out, k)[:n] = v
        for t, v in sparsity.items():
            out.sparsity[t][:n] = v
        out.recorded = n
        out.offset = int(attrs.get("tokens_seen", n))
        out.sequences = int(attrs.get("sequences_seen", int(rows["sequence"].max()) + 1 if n else 0))
        return out

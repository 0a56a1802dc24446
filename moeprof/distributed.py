"""Data-parallel profiling on torch.distributed: who this rank is, and the one reduction at the end of a run.

`torchrun --nproc-per-node N -m moeprof profile ...` (or `accelerate launch`) starts N ranks; each profiles a
disjoint block of the packed sequences (`moeprof.data.shard_range`) with its statistics on its own device, and
nothing crosses ranks until the end, except a token counter in the rendezvous store for rank 0's progress bar.
Then `reduce_profile` combines every member of the profile by what the member declares:

- a fixed-size accumulator (a `STATE` table whose every field has a reduction) is all-reduced field by field
  with that reduction (sum -> SUM, max -> MAX): O(L·E·P·B) bytes once per run, whatever the token count;
- any other accumulator (the per-token trace) is gathered to every rank and folded with its own `merge` in
  rank order. Rank blocks are the stream in order, and merge(a, b) is "a's stream followed by b's", so the
  trace holds the first --trace-tokens tokens of the global stream, as in a one-process run.

A rank that fails reports it in `agree` (every rank calls it before the reduction); the others raise
`DistributedError` and no store is written. A rank that dies without reporting makes the next collective fail
or time out (`timeout_s`); that also becomes a `DistributedError`.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moeprof.errors import MoeprofError

_REDUCE_OP = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
_TOKENS_KEY = "moeprof/tokens"


class DistributedError(MoeprofError, RuntimeError):
    """Another rank failed or stopped answering: this rank stops and no store is written."""


def world_size_from_env() -> int:
    """Return WORLD_SIZE as set by torchrun / accelerate (1 when not launched by one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Ranks:
    """This process's place in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    group_started: bool = False
    tokens_seen: int = 0  # a single process's own count (count_tokens)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str, timeout_s: float = 1800.0) -> "Ranks":
        """Join the process group torchrun described in the environment (gloo on the CPU, NCCL on CUDA); a
        single process (no WORLD_SIZE, or 1) gets Ranks() and starts nothing."""
        world = world_size_from_env()
        if world <= 1:
            return cls()
        cuda = device in ("cuda", "auto") and torch.cuda.is_available()
        if cuda:  # each rank its own GPU: LOCAL_RANK is the index torchrun gives it on this node
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            try:
                dist.init_process_group("nccl" if cuda else "gloo", timeout=_dt.timedelta(seconds=timeout_s))
            except (RuntimeError, ValueError) as exc:
                raise DistributedError(f"could not join the process group ({_first_line(exc)}); launch with "
                                       "torchrun --nproc-per-node N -m moeprof profile ...") from None
        return cls(dist.get_rank(), dist.get_world_size(), True)

    def count_tokens(self, n: int) -> int:
        """Add this rank's `n` new tokens to the run's counter; return the global count so far (not a collective:
        ranks never wait for each other here; rank 0's progress bar shows it)."""
        if self.world == 1:
            self.tokens_seen += n
            return self.tokens_seen
        store = dist.distributed_c10d._get_default_store()
        return int(store.add(_TOKENS_KEY, n))

    def agree(self, error: BaseException | None) -> None:
        """Collective: raise DistributedError on every healthy rank if any rank passes an error."""
        if self.world == 1:
            return
        mine = None if error is None else f"{type(error).__name__}: {_first_line(error)}"
        reports: list[Any] = [None] * self.world
        _collective(dist.all_gather_object, reports, mine)
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if failed and error is None:
            r, m = failed[0]
            raise DistributedError(f"rank {r} of {self.world} failed ({m}); stopping, no store was written")

    def gather_objects(self, obj: Any) -> list[Any]:
        """Collective: return every rank's `obj`, in rank order ([obj] in a single process)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        _collective(dist.all_gather_object, out, obj)
        return out

    def backend(self) -> str | None:
        """Return the process group's backend ("gloo", "nccl"), or None in a single process."""
        return str(dist.get_backend()) if self.group_started and dist.is_initialized() else None

    def close(self) -> None:
        if self.group_started and dist.is_initialized():
            dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _collective(fn, *args) -> None:
    """Run a collective; a peer that died or timed out becomes one DistributedError."""
    try:
        fn(*args)
    except (RuntimeError, ConnectionError) as exc:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
        raise DistributedError(f"another rank stopped answering ({_first_line(exc)}); stopping, no store was "
                               "written (check the other ranks' output)") from None


def reducible(member: Any) -> bool:
    """True when every field of the member's STATE table declares a collective reduction (sum / max)."""
    state = getattr(type(member), "STATE", ())
    return bool(state) and all(f.reduce in _REDUCE_OP for f in state)


def reduction_bytes(members: Any) -> int:
    """Return the bytes one all-reduce of these members moves per rank (their fixed-size state)."""
    return sum(getattr(m, f.name).numel() * getattr(m, f.name).element_size()
               for m in members if reducible(m) for f in type(m).STATE)


def reduce_members(ranks: Ranks, members: dict) -> dict:
    """Return every rank's `members` combined (see the module doc); reducible ones are reduced in place."""
    if ranks.world == 1:
        return members
    out = {}
    for key, m in members.items():
        if reducible(m):
            for f in type(m).STATE:
                _collective(dist.all_reduce, getattr(m, f.name), _REDUCE_OP[f.reduce])
            out[key] = m
        else:
            parts = ranks.gather_objects(m.to("cpu") if hasattr(m, "to") else m)
            merged = parts[0]
            for p in parts[1:]:
                merged = merged.merge(p)
            out[key] = merged
    return out

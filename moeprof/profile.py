"""`profile(...)`: stream text through a model under capture and write the statistics to an HDF5 store.

Scale-out (see also `moeprof.distributed`, `moeprof.data.shard_range`, `moeprof.merge`):
- `shard=(I, N)` profiles block I of N of the packed sequences (whole batches, in stream order);
- under torchrun each rank takes its block of that, and the statistics are reduced once at the end; rank 0
  writes the store;
- every store records its data position and the arguments that shaped its statistics (root attribute
  `resume`), and the data it consumed (`data_shards`: sources, shard, sequences, tokens, fingerprint);
  `checkpoint_every` writes the running statistics to `<out>.ckpt` (a store, atomically) and `resume=True`
  continues from that checkpoint, or extends a finished store to a larger `max_tokens`. Statistics are
  restored exactly (float64 state), and batches restart on the same boundaries, so a resumed run writes the
  same datasets as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from rich.progress import (BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from moeprof.activation_types import check_types  # noqa: F401  (torch-free, so the CLI checks --types without torch)
from moeprof.arch import adapter_for, text_config
from moeprof.arch.experts import router_facts
from moeprof.capture import profile_capture
from moeprof.data import (FINGERPRINT_MOD, DataError, count_sequences, iter_batches, sequence_hash, shard_range,
                          source_token_ranges)
from moeprof.distributed import Ranks, reduce_members, reduction_bytes
from moeprof.errors import UsageError
from moeprof.stats import ACTIVATION_TYPES, EffectiveRank, ProfileStats, TraceRecorder
from moeprof.stats.rank import gram_bytes, rank_budget_line
from moeprof.store import (ProfileMeta, StoreError, check_replace, check_store_space, check_writable, open_store,
                           write_profile)
from moeprof.topp import DEFAULT_P_GRID, check_p_grid

RANK_MEMORY_GIB = 4.0  # default budget of the effective-rank Gram state (all types together)


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "— tok/s", style="cyan")


LOG_EVERY_FRAC = 0.10  # without a terminal: one progress line per 10% of the total ...
LOG_EVERY_S = 30.0  # ... or per 30 s, whichever comes first


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class LoggedProgress(Progress):
    """moeprof's rich progress bar; when its console is not a terminal (a pipe, a file, a cluster log), periodic
    plain log lines instead: one per `LOG_EVERY_FRAC` of a task's total or per `LOG_EVERY_S` seconds, whichever
    comes first, and one at the end, each with done/total, rate, elapsed and ETA.

    (rich alone draws nothing on a pipe until it stops, then one line cut at the console width.)"""

    def __init__(self, *columns, unit: str = "tok", log_every_frac: float = LOG_EVERY_FRAC,
                 log_every_s: float = LOG_EVERY_S, console=None, **kwargs):
        from rich import get_console

        console = console or get_console()
        self._log = not console.is_terminal
        self._unit, self._every_frac, self._every_s = unit, log_every_frac, log_every_s
        self._logged: dict = {}  # task id -> (completed, time) of its last line
        # on a pipe the bar itself is switched off: the log lines say everything it would, line by line
        super().__init__(*columns, console=console, disable=self._log or kwargs.pop("disable", False), **kwargs)

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._maybe_log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def stop(self) -> None:
        for task in self.tasks:
            if self._log and task.visible and self._logged.get(task.id, (None,))[0] != task.completed:
                self._log_line(task)
        super().stop()

    def _maybe_log(self, task_id) -> None:
        if not self._log:
            return
        task = self._tasks[task_id]
        if not task.visible:
            return
        now = time.monotonic()
        last_done, last_t = self._logged.setdefault(task.id, (0.0, now))
        step = (task.total or 0) * self._every_frac
        if (step and task.completed - last_done >= step) or (now - last_t >= self._every_s
                                                           and task.completed != last_done):
            self._log_line(task)

    def _log_line(self, task) -> None:
        """Print one plain progress line of `task` (no markup, no carriage returns)."""
        total = task.total or 0
        pct = f" ({task.completed / total:.0%})" if total else ""
        speed = task.finished_speed or task.speed
        rate = f", {speed:,.0f} {self._unit}/s" if speed else ""
        eta = "" if task.finished or not total else f", ETA {_clock(task.time_remaining)}"
        self.console.print(f"{task.description}: {task.completed:,.0f}/{total:,.0f} {self._unit}{pct}{rate}, "
                           f"elapsed {_clock(task.elapsed or 0.0)}{eta}", markup=False, highlight=False,
                           soft_wrap=True)
        self._logged[task.id] = (task.completed, time.monotonic())


def progress_bar(transient: bool = False, **kwargs) -> Progress:
    """Return moeprof's progress bar (tokens, tokens/s, elapsed, ETA): a rich bar in a terminal, periodic log
    lines elsewhere (`LoggedProgress`)."""
    return LoggedProgress(TextColumn("[bold]{task.description}"), BarColumn(),
                          TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"), _TokensPerSecond(),
                          TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=transient,
                          **kwargs)


@dataclass
class ProfileResult:
    path: Path
    stats: ProfileStats
    tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else float("nan")


def checkpoint_path(out: str | Path) -> Path:
    """Return where `profile(..., checkpoint_every=N)` keeps the running statistics of `out`."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def checkpoint_tokens(ckpt: str | Path) -> str:
    """Return "N tokens" that the checkpoint `ckpt` holds ("tokens unknown" when it cannot be read)."""
    import h5py

    try:
        with h5py.File(ckpt, "r") as f:
            return f"{int(f.attrs['tokens']):,} tokens"
    except (OSError, KeyError, ValueError, TypeError):
        return "tokens unknown"


def check_checkpoint(out: str | Path, *, resume: bool, replace: bool = False) -> None:
    """Raise StoreError when `out` has a checkpoint of an interrupted run and the run would drop it: neither
    `resume` (continue it) nor `replace` (the CLI's --force: start over)."""
    ckpt = checkpoint_path(out)
    if not resume and not replace and ckpt.exists():
        raise StoreError(f"{ckpt} holds an interrupted profile of {out} ({checkpoint_tokens(ckpt)}); continue it "
                         "with --resume, or pass --force to start over (the checkpoint is then replaced)")


def rank_members(sites, types: Sequence[str], layers: Sequence[int] | None = None,
                 memory_gib: float = RANK_MEMORY_GIB) -> dict:
    """Return the empty effective-rank members {("rank", t): EffectiveRank} of a profile of `sites`, keeping
    the rows of every site of the decoder `layers` (None: all); raise UsageError with the estimate when their
    Gram state exceeds `memory_gib`."""
    L, E = len(sites), max(s.num_experts for s in sites)
    layers = rank_rows(sites, layers)
    R = L if layers is None else len(layers)
    # the Gram's width D: the widest kept site (a wide dense layer left out does not pad every expert's Gram)
    kept = sites if layers is None else [s for s in sites if s.row in layers]
    widths = {t: max(s.hidden_size if t == "x" else s.intermediate_size for s in kept) for t in types}
    need = {t: gram_bytes(R, E, d) for t, d in widths.items()}
    if sum(need.values()) > memory_gib * 2**30:
        one = sum(gram_bytes(1, E, d) for d in widths.values())
        fit = max(0, int(memory_gib * 2**30 // one))
        raise UsageError(f"--rank needs {rank_budget_line(need)} of exact Gram state ({R} layers x {E} experts x "
                         f"width^2 x 8 B per type), above the {memory_gib:g} GiB budget; keep at most {fit} layers "
                         "with --rank-layers, fewer --types, or raise --rank-memory")
    return {("rank", t): EffectiveRank.for_layers(L, E, t, widths[t], layers) for t in types}


def rank_rows(sites, layers: Sequence[int] | None) -> list[int] | None:
    """Return the profile rows of every site of the decoder `layers` (a layer may hold routed, shared and dense
    sites), sorted; None for None; UsageError naming the model's layers when one does not exist."""
    if layers is None:
        return None
    num_layers = max(s.layer for s in sites) + 1
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad or not layers:
        raise UsageError(f"--rank-layers {list(layers)}: the model has layers 0..{num_layers - 1}")
    return sorted(s.row for s in sites if s.layer in set(int(l) for l in layers))


def parameter_counts(model, sites) -> dict[str, int]:
    """Return {"total": every parameter, "active": those one token uses} (counted, not loaded: meta works).

    Active = total − Σ over routed sites of the experts' parameters × (E − top_k) / E: a token runs top_k of the
    E experts of each routed layer and everything else (embeddings, attention, router, shared experts, norms).
    """
    total = sum(p.numel() for p in model.parameters())
    idle = sum(sum(p.numel() for p in s.experts.parameters()) * (s.num_experts - s.top_k) / s.num_experts
               for s in sites if s.is_routed and s.experts is not None)
    return {"total": int(total), "active": int(round(total - idle))}


def run_arguments(model, model_id: str, data: Sequence[str | Path], *, p_grid, types, seq_len: int,
                  batch_size: int, trace_tokens: int, shard: tuple[int, int], max_tokens: int | None,
                  dtype: str | None, rank: list | None = None) -> dict:
    """Return what shapes a profile's statistics (recorded in the store; a resume must match it).

    max_tokens is left out for a whole-data run (raising it extends the store), but kept for a shard (its
    block of sequences depends on it).
    """
    config = json.dumps(text_config(model.config).to_dict(), sort_keys=True, default=str)
    args = {"model": model_id, "model_config": hashlib.sha256(config.encode()).hexdigest()[:16],
            "data": [str(d) for d in data], "p_grid": [float(p) for p in p_grid], "types": list(types),
            "seq_len": seq_len, "batch_size": batch_size, "trace_tokens": trace_tokens,
            "shard": f"{shard[0]}/{shard[1]}",
            "dtype": (dtype or str(next(model.parameters()).dtype)).replace("torch.", "")}
    if shard[1] > 1:
        args["max_tokens"] = max_tokens
    if rank is not None:  # effective rank asked for: its kept layers (absent when not: older stores still resume)
        args["rank"] = rank
    return args


def _restore(src: Path, args: dict, trace_tokens: int, L: int, top_k: int, p_grid, types):
    """Return (stats, trace, sequences done, fingerprint, wall_s) of the store or checkpoint `src`; StoreError
    (one line naming what differs) when it was written for another model or other arguments."""
    with open_store(src) as st:
        rec = st.attrs.get("resume")
        if rec is None:
            raise StoreError(f"{src} records no data position (a merged store, or written by an older moeprof); "
                             "profile again without --resume")
        rec = json.loads(rec)
        diff = [k for k in args if rec["args"].get(k) != args[k]] + [k for k in rec["args"] if k not in args]
        if diff:
            what = "; ".join(f"{k}: {rec['args'].get(k)!r} there, {args.get(k)!r} now" for k in diff)
            raise StoreError(f"{src} belongs to another model or other arguments ({what}); resume with the same "
                             "arguments, or remove it to start afresh")
        stats = ProfileStats.from_store(st)
        trace = None
        if trace_tokens > 0:
            trace = (TraceRecorder.from_hdf5(st.member_group(TraceRecorder)) if st.has_member(TraceRecorder)
                     else TraceRecorder(trace_tokens, L, top_k, p_grid, types))
        return stats, trace, int(rec["sequences"]), int(rec["fingerprint"], 16), float(st.attrs["wall_s"])


def profile(model, tokenizer, data: Sequence[str | Path], out: str | Path, *, model_id: str,
            p_grid: Sequence[float] = DEFAULT_P_GRID, types: Sequence[str] = ACTIVATION_TYPES,
            max_tokens: int | None = 8192, seq_len: int = 256, batch_size: int = 4, trace_tokens: int = 0,
            show_progress: bool = True, dtype: str | None = None, device: str | None = None,
            shard: tuple[int, int] = (0, 1), checkpoint_every: int | None = None, resume: bool = False,
            ranks: Ranks | None = None, on_nonfinite: str = "error", rank: bool = False,
            rank_layers: Sequence[int] | None = None, rank_memory_gib: float = RANK_MEMORY_GIB,
            replace_checkpoint: bool = False) -> ProfileResult:
    """Profile x/u/g/i top-p sparsity of every expert of every layer on `data`; write the store `out` (rank 0
    of a distributed run alone writes; see the module doc for shard, checkpoint_every, resume and ranks).

    on_nonfinite: "error" (default) stops at the first vector holding NaN/Inf, naming layer, expert, type and
    token; "skip" leaves such vectors out of the statistics and records their count per type in the store's
    `nonfinite_skipped` attribute (JSON).

    `rank=True` also accumulates the exact Gram matrix of every (layer, expert, type) for its effective rank
    (`moeprof.stats.rank`), on `rank_layers` only when given; refused before the run past `rank_memory_gib`.

    An `<out>.ckpt` of an interrupted run is never dropped silently: without `resume` the run is refused (StoreError,
    before any compute) unless `replace_checkpoint` (the CLI's --force) says to start over."""
    p_grid = check_p_grid(p_grid)
    types = check_types(types)
    ranks = ranks or Ranks()
    out = Path(out)
    check_writable(out)  # fail on an unwritable folder before spending any compute
    if ranks.world > 1 and (resume or checkpoint_every):
        raise DataError("--resume and --checkpoint-every need a single process (a data-parallel run restarts "
                        "whole); run the shards as separate jobs (--shard I/N) to checkpoint each")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise DataError(f"--checkpoint-every must be at least 1 token, got {checkpoint_every}")
    check_checkpoint(out, resume=resume, replace=replace_checkpoint)
    sites = adapter_for(model).sites(model)
    L, E = len(sites), max(s.num_experts for s in sites)
    top_k = max(s.top_k for s in sites)
    rank_stats = rank_members(sites, types, rank_layers, rank_memory_gib) if rank else {}
    first_param = next(model.parameters())
    input_device = first_param.device if first_param.device.type != "meta" else torch.device("cpu")
    args = run_arguments(model, model_id, data, p_grid=p_grid, types=types, seq_len=seq_len,
                         batch_size=batch_size, trace_tokens=trace_tokens, shard=shard, max_tokens=max_tokens,
                         dtype=dtype, rank=(list(range(L)) if rank_layers is None else rank_rows(sites, rank_layers))
                         if rank else None)

    # The block of sequences this process profiles: all of them, shard I of N, and this rank's part of that.
    start, stop = 0, None
    if shard[1] > 1 or ranks.world > 1:
        total = count_sequences(tokenizer, data, seq_len=seq_len, max_tokens=max_tokens)
        start, stop = shard_range(total, batch_size, *shard)
        if stop <= start and total:  # (no sequence at all: iter_batches says the data is too short)
            raise DataError(f"shard {shard[0]}/{shard[1]} holds no sequence: the data packs into {total} sequences "
                            f"of {seq_len} tokens; use fewer shards, a smaller --batch-size or more data")
        r0, r1 = shard_range(stop - start, batch_size, ranks.rank, ranks.world)
        shard_start, start, stop = start, start + r0, start + r1
    else:
        shard_start = 0

    stats = ProfileStats(L, E, p_grid, types)
    stats.members.update(rank_stats)
    trace = TraceRecorder(trace_tokens, L, top_k, p_grid, types) if trace_tokens > 0 else None
    done, fingerprint, wall_before = 0, 0, 0.0  # sequences of this block already profiled (resume)
    ckpt = checkpoint_path(out)
    if resume:
        src = ckpt if ckpt.exists() else out if out.exists() else None
        if src is None:
            raise StoreError(f"nothing to resume: neither {ckpt} nor {out} exists; run without --resume")
        stats, trace, done, fingerprint, wall_before = _restore(src, args, trace_tokens, L, top_k, p_grid, types)
        if max_tokens is not None and done * seq_len > max_tokens:
            raise DataError(f"--max-tokens {max_tokens} is below the {done * seq_len} tokens {src} already holds; "
                            f"give at least {done * seq_len}")
    if ranks.is_main:  # before any compute: a full disk, or a replaced store whose /critical would not fit
        check_replace(out, L, E, model_id, text_config(model.config).to_dict())
        check_store_space(out, stats, trace)
    stats = stats.to(input_device)
    dist_backend = ranks.backend()

    # before the capture: the renormalization probe runs the stock block (a checkpoint is written mid-capture)
    router = router_facts(model, sites) if any(s.is_routed for s in sites) else None

    def write(path: Path, complete: bool, wall: float, tokens: int, fp: int, sequences: int) -> Path:
        config = text_config(model.config)
        token_texts = None
        if trace is not None:
            token_texts = [tokenizer.decode([int(t)]) for t in trace.token_id[: trace.recorded]]
        fp_hex = f"{fp:032x}"
        meta = ProfileMeta(
            model=model_id, model_type=str(config.model_type),
            architecture=",".join(getattr(model.config, "architectures", None) or [type(model).__name__]),
            is_moe=any(s.is_routed for s in sites), top_k=top_k, hidden_size=int(config.hidden_size),
            model_config=config.to_dict(), data_sources=[str(d) for d in data], tokens=tokens, seq_len=seq_len,
            batch_size=batch_size, dtype=dtype or str(first_param.dtype).replace("torch.", ""),
            device=device or str(first_param.device), wall_s=wall,
            extra={"resume": {"args": args, "sequences": sequences, "fingerprint": fp_hex, "complete": complete},
                   "data_shards": [{"sources": [str(d) for d in data], "shard": args["shard"],
                                    "seq_len": seq_len, "sequences": [shard_start, shard_start + sequences],
                                    "tokens": tokens, "fingerprint": fp_hex,
                                    # what of each source was read (merge compares it across source lists)
                                    **({"source_tokens": source_token_ranges(
                                        tokenizer, data, first_token=shard_start * seq_len,
                                        stop_token=(shard_start + sequences) * seq_len)} if complete else {})}],
                   "parameters": parameter_counts(model, sites)})
        if on_nonfinite == "skip":
            meta.extra["nonfinite_skipped"] = {t: int(skipped.get(t, 0)) for t in types}
        if router is not None:  # scoring, group-limited top-k, renormalization, routed scaling
            meta.extra["router"] = router
        if ranks.world > 1:  # what the one reduction moved (O(L·E·P·B), whatever the token count)
            meta.extra["distributed"] = {"world": ranks.world, "backend": dist_backend,
                                         "allreduce_bytes": reduction_bytes(stats.members.values())}
        return write_profile(path, stats.to("cpu"), meta, intermediate_sizes=[s.intermediate_size for s in sites],
                             site_kinds=[s.kind for s in sites], site_layers=[s.layer for s in sites], trace=trace,
                             token_texts=token_texts)

    tokens = done * seq_len
    sequences = done
    last_checkpoint = tokens
    error: BaseException | None = None
    run_start = time.perf_counter()
    shown = show_progress and ranks.is_main
    skipped: dict[str, int] = {}
    try:
        with progress_bar() as bar, profile_capture(model, stats, trace=trace, sites=sites,
                                                    on_nonfinite=on_nonfinite) as engine, torch.inference_mode():
            skipped = engine.nonfinite  # (the same dict, filled as the run goes)
            # the data is packed into whole sequences: the most it can give is max_tokens rounded down to them
            planned = (max_tokens // seq_len) * seq_len if max_tokens else 0
            task = bar.add_task(f"profiling {model_id}", total=planned, completed=tokens, visible=shown)
            seen = tokens
            for batch in iter_batches(tokenizer, data, seq_len=seq_len, batch_size=batch_size,
                                      max_tokens=max_tokens, start=start + done, stop=stop):
                if trace is not None:
                    trace.begin_batch(batch, sequences)
                engine.batch_shape = tuple(batch.shape)
                model(input_ids=batch.to(input_device), use_cache=False)
                if trace is not None:
                    trace.end_batch(batch.numel())
                fingerprint = (fingerprint + sum(sequence_hash(row) for row in batch)) % FINGERPRINT_MOD
                tokens += batch.numel()
                sequences += batch.shape[0]
                seen = done * seq_len + ranks.count_tokens(batch.numel())  # (no resume when distributed)
                bar.update(task, completed=seen, total=max(seen, planned or seen))
                if checkpoint_every and tokens - last_checkpoint >= checkpoint_every:
                    write(ckpt, False, wall_before + time.perf_counter() - run_start, tokens, fingerprint,
                          sequences)
                    last_checkpoint = tokens
            if seen < planned:  # the data ran out first: the bar ends at 100% of what there was
                bar.update(task, completed=seen, total=seen)
    except Exception as exc:  # tell the other ranks before failing, so that they stop instead of waiting
        error = exc
    ranks.agree(error)
    if error is not None:
        raise error

    members = dict(stats.members)
    if trace is not None:
        members[("trace", None)] = trace
    members = reduce_members(ranks, members)
    trace = members.pop(("trace", None), None)
    stats = ProfileStats(L, E, p_grid, types, members)  # (the rank members, when asked, are among them)
    parts = ranks.gather_objects((fingerprint, tokens, sequences))
    fingerprint = sum(p[0] for p in parts) % FINGERPRINT_MOD
    tokens, sequences = sum(p[1] for p in parts), sum(p[2] for p in parts)
    if ranks.world > 1:
        counts = ranks.gather_objects(dict(skipped))
        skipped = {t: sum(c.get(t, 0) for c in counts) for t in types}
    wall = wall_before + time.perf_counter() - run_start
    path = out
    if ranks.is_main:
        path = write(out, True, wall, tokens, fingerprint, sequences)
        ckpt.unlink(missing_ok=True)
    return ProfileResult(path, stats, tokens, wall)

"""`profile(...)`: stream text through a model under capture and write the statistics to an HDF5 store."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from moeprof.arch import adapter_for, text_config
from moeprof.capture import profile_capture
from moeprof.data import iter_batches
from moeprof.stats import ACTIVATION_TYPES, ProfileStats, TraceRecorder
from moeprof.store import ProfileMeta, check_writable, write_profile
from moeprof.topp import DEFAULT_P_GRID, check_p_grid


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "— tok/s", style="cyan")


def progress_bar(transient: bool = False) -> Progress:
    """Return moeprof's rich progress bar (tokens, tokens/s, elapsed)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"), _TokensPerSecond(),
                    TimeElapsedColumn(), transient=transient)


def check_types(types: Sequence[str]) -> tuple[str, ...]:
    """Return types as a tuple in canonical order; raise ValueError naming an unknown one."""
    unknown = [t for t in types if t not in ACTIVATION_TYPES]
    if unknown or not types:
        raise ValueError(f"unknown activation type(s) {unknown or '(none given)'}; choose from "
                         f"{','.join(ACTIVATION_TYPES)} (x=input, u=up, g=gate, i=intermediate)")
    return tuple(t for t in ACTIVATION_TYPES if t in types)


@dataclass
class ProfileResult:
    path: Path
    stats: ProfileStats
    tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else float("nan")


def profile(model, tokenizer, data: Sequence[str | Path], out: str | Path, *, model_id: str,
            p_grid: Sequence[float] = DEFAULT_P_GRID, types: Sequence[str] = ACTIVATION_TYPES,
            max_tokens: int | None = 8192, seq_len: int = 256, batch_size: int = 4, trace_tokens: int = 0,
            show_progress: bool = True, dtype: str | None = None, device: str | None = None) -> ProfileResult:
    """Profile x/u/g/i top-p sparsity of every expert of every layer on `data`; write the store `out`."""
    p_grid = check_p_grid(p_grid)
    types = check_types(types)
    out = Path(out)
    check_writable(out)  # fail on an unwritable folder before spending any compute
    sites = adapter_for(model).sites(model)
    L, E = len(sites), max(s.num_experts for s in sites)
    top_k = max(s.top_k for s in sites)
    stats = ProfileStats(L, E, p_grid, types)
    trace = TraceRecorder(trace_tokens, L, top_k, p_grid, types) if trace_tokens > 0 else None
    first_param = next(model.parameters())
    input_device = first_param.device if first_param.device.type != "meta" else torch.device("cpu")

    tokens = 0
    sequences = 0
    start = time.perf_counter()
    with progress_bar() as bar, profile_capture(model, stats, trace=trace, sites=sites), torch.inference_mode():
        task = bar.add_task(f"profiling {model_id}", total=max_tokens or 0, visible=show_progress)
        for batch in iter_batches(tokenizer, data, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens):
            if trace is not None:
                trace.begin_batch(batch, sequences)
            model(input_ids=batch.to(input_device), use_cache=False)
            if trace is not None:
                trace.end_batch(batch.numel())
            tokens += batch.numel()
            sequences += batch.shape[0]
            bar.update(task, completed=tokens, total=max(tokens, max_tokens or tokens))
    wall = time.perf_counter() - start

    config = text_config(model.config)
    token_texts = None
    if trace is not None:
        token_texts = [tokenizer.decode([int(t)]) for t in trace.token_id[: trace.recorded]]
    meta = ProfileMeta(
        model=model_id, model_type=str(config.model_type),
        architecture=",".join(getattr(model.config, "architectures", None) or [type(model).__name__]),
        is_moe=any(s.is_routed for s in sites), top_k=top_k, hidden_size=int(config.hidden_size),
        model_config=config.to_dict(), data_sources=[str(d) for d in data], tokens=tokens, seq_len=seq_len,
        batch_size=batch_size, dtype=dtype or str(first_param.dtype).replace("torch.", ""),
        device=device or str(first_param.device), wall_s=wall)
    path = write_profile(out, stats, meta, intermediate_sizes=[s.intermediate_size for s in sites],
                         site_kinds=["routed" if s.is_routed else s.kind for s in sites], trace=trace, token_texts=token_texts)
    return ProfileResult(path, stats, tokens, wall)

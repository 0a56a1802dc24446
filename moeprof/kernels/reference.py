"""Grouped top-p GLU experts in torch: the reference for the Triton kernel and moeprof's CPU fast path.

Legend: T tokens, H hidden size, E experts, K routed experts per token ("slots"), I expert intermediate size,
P = T·K (token, slot) pairs, pair id = t·K + k. Weights use the transformers 5 fused layout:
gate_up_proj [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up), down_proj [E, H, I].

What is computed (σ = SiLU or tanh-GELU, top_p keeps the fewest largest-|v| entries reaching p·‖v‖₁):
  sparsify="i":  y_t = Σ_k w_tk · W_d[e] · top_p_{p[e]}(σ(W_g[e] x_t) ⊙ W_u[e] x_t)
  sparsify="x":  y_t = Σ_k w_tk · W_d[e] · (σ(W_g[e] x̃) ⊙ W_u[e] x̃),   x̃ = top_p_{p[e]}(x_t)
with e = top_k_index[t, k].

Tie rule (shared with the Triton kernel): the kept set is {j : |v_j| ≥ τ, v_j ≠ 0} where τ is the k-th largest
|v_j| and k the top-p count. Every entry tied with τ is kept, so the kept count is k plus the number of extra
ties at the cut (none for continuous activations). p ≥ 1 keeps every non-zero; p = 0 or v = 0 keeps nothing.

Two execution paths, chosen per call from the routing (`path="auto"`):
- gather (decode: few pairs per active expert): the sparsified projection is a weighted row-gather-sum over a
  transposed weight copy (`F.embedding_bag(..., per_sample_weights=..., mode="sum")`), so only the kept rows
  are read: type i reads I·(1-s) rows of down_projᵀ [E, I, H]; type x reads H·(1-s) rows of gate_upᵀ [E, H, 2I].
- dense (prefill: many pairs per expert): per-expert GEMMs on the masked activation; no weight is skipped, but
  nothing is slower than a dense grouped GEMM either.
The transposed copies are cached per weight for the weight's life (see `transposed_expert_weight`): type i costs one extra down_proj
(E·H·I elements, a third of the layer's expert weights), type x one extra gate_up_proj (two thirds).

Numerics: fp32 for thresholds and elementwise math. The torch GEMMs run in the weights' dtype with fp32
accumulation and round their outputs to that dtype (as the stock transformers experts do); the Triton kernel
keeps fp32 between its GEMMs, so bf16 results of the two backends differ by bf16 rounding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from moeprof.activation_functions import ACTIVATION_ALIASES, ACTIVATIONS
from moeprof.topp import ascending_abs_prefix, counts_from_prefix, descending_prefix

SPARSIFY_TYPES = ("i", "x")
# The activations the kernels implement (the Triton kernel has a code for each); every config spelling of them
# in moeprof's one activation table is accepted, mapped to its canonical name.
KERNEL_ACTIVATIONS = ("silu", "gelu_tanh")
ACT_ALIASES = {alias: name for alias, name in ACTIVATION_ALIASES.items() if name in KERNEL_ACTIVATIONS}
# The gather path wins while each active expert sees few (token, slot) pairs: the dense GEMM reads a weight
# once for all its tokens, the gather re-reads kept rows once per pair. Measured cross-over (CPU, bf16, Qwen3-30B-A3B
# layer, s 0.5-0.8, docs/KERNELS.md): between 4 and 8 pairs per active expert.
GATHER_MAX_PAIRS_PER_EXPERT = 4

_SMALLEST_SUBNORMAL_F32 = float(torch.tensor(1, dtype=torch.int32).view(torch.float32))


@dataclass(frozen=True)
class GroupedProblem:
    """Validated sizes and per-pair routing of one grouped_topp_glu call (all tensors on x.device)."""

    T: int
    H: int
    E: int
    K: int
    I: int
    act: str
    sparsify: str
    p_expert: torch.Tensor  # [E] fp32
    pair_expert: torch.Tensor  # [P] int64
    top_k_weights: torch.Tensor  # [T, K] as given

    # Built on first use (the CPU decode path builds its own in numpy: each torch call here costs ~10 µs)
    @functools.cached_property
    def pair_token(self) -> torch.Tensor:  # [P] int64
        return torch.arange(self.T * self.K, device=self.pair_expert.device) // self.K

    @functools.cached_property
    def pair_weight(self) -> torch.Tensor:  # [P] fp32
        return self.top_k_weights.reshape(-1).to(device=self.pair_expert.device, dtype=torch.float32)

    @functools.cached_property
    def pair_p(self) -> torch.Tensor:  # [P] fp32
        return self.p_expert[self.pair_expert]


def check_problem(x, top_k_index, top_k_weights, gate_up_proj, down_proj, p, sparsify, act) -> GroupedProblem:
    """Return the validated problem; raise ValueError/TypeError with a message naming the fix."""
    if sparsify not in SPARSIFY_TYPES:
        raise ValueError(f"sparsify must be one of {SPARSIFY_TYPES} (intermediate or expert input), got {sparsify!r}")
    if act not in ACT_ALIASES:
        raise ValueError(f"act must be one of {sorted(ACT_ALIASES)}, got {act!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)} (flatten batch and sequence first)")
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError("gate_up_proj must be [E, 2I, H] and down_proj [E, H, I] (transformers 5 fused layout)")
    T, H = x.shape
    E, two_i, h_gu = gate_up_proj.shape
    if two_i % 2 or h_gu != H or tuple(down_proj.shape) != (E, H, two_i // 2):
        raise ValueError(f"weight shapes do not fit x [T={T}, H={H}]: gate_up_proj {tuple(gate_up_proj.shape)} "
                         f"should be [E, 2I, {H}] and down_proj {tuple(down_proj.shape)} [E, {H}, I]")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T or tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(f"top_k_index and top_k_weights must both be [T={T}, K], got "
                         f"{tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}")
    for name, t in (("x", x), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if gate_up_proj.dtype != down_proj.dtype:
        raise TypeError(f"gate_up_proj ({gate_up_proj.dtype}) and down_proj ({down_proj.dtype}) must share a dtype")
    K = top_k_index.shape[1]
    if isinstance(p, (int, float)):
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise ValueError(f"p must lie in [0, 1], got {p}")
        p_expert = torch.full((E,), float(p), device=x.device)
    else:
        p_expert = torch.as_tensor(p, dtype=torch.float32, device=x.device).reshape(-1)
        if p_expert.numel() == 1:
            p_expert = p_expert.expand(E)
        if p_expert.numel() != E:
            raise ValueError(f"p must be a float or a tensor [E={E}] (one p per expert), got {p_expert.numel()} values")
        if p_expert.device.type == "cpu":  # numpy: a torch reduction on 128 values costs ~10× more (every decode step)
            lo, hi = _np_range(p_expert.detach().numpy())
        else:
            lo, hi = (float(v) for v in p_expert.aminmax())  # NaN propagates into both
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"p must lie in [0, 1], got {p_expert.tolist()}")
    pair_expert = top_k_index.reshape(-1).to(device=x.device, dtype=torch.long)  # [P]
    if pair_expert.numel():
        lo, hi = _np_range(pair_expert.numpy()) if pair_expert.device.type == "cpu" else pair_expert.aminmax()
        if int(lo) < 0 or int(hi) >= E:
            raise ValueError(f"top_k_index holds expert ids outside [0, {E})")
    return GroupedProblem(
        T=T, H=H, E=E, K=K, I=two_i // 2, act=ACT_ALIASES[act], sparsify=sparsify,
        p_expert=p_expert.contiguous(),
        pair_expert=pair_expert,
        top_k_weights=top_k_weights,
    )


def _np_range(a: np.ndarray) -> tuple[float, float]:
    """(min, max) of a non-empty array; NaN in either when a holds one."""
    return float(a.min()), float(a.max())


def glu_act(gate: torch.Tensor, act: str) -> torch.Tensor:
    """Return σ(gate) for the canonical activation name ("silu" or "gelu_tanh")."""
    return ACTIVATIONS[act](gate)


def topp_threshold(v: torch.Tensor, p: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Return τ [R] (fp32) per row so that {j : |v_j| ≥ τ} is the top-p set of that row, ties at τ kept.

    v [R0, n]; p [R]; rows [R] picks the row of v for each p (default: row r, R = R0) — one sort per row of v
    serves every p applied to it (type x: one token's hidden state, K experts' p).
    τ is the k-th largest |v_j| with k = min{j : c_j ≥ p·c_n} over the descending |v| prefix sums c (fp64).
    p ≥ 1 gives the smallest positive float (keeps every non-zero); k = 0 (p = 0 or v = 0) gives +inf.
    Worked example: v = [0.1, -3, 2, 0.5]: p = 0.5 → τ = 3; p = 0.9 → τ = 0.5; p = 1 → τ = 1e-45.
    """
    n = v.shape[-1]
    p = p.reshape(-1)
    if n == 0:
        return torch.full(p.shape, math.inf, device=v.device)
    if v.device.type == "cpu":
        return _cpu_topp_threshold(v, p, rows)
    # k is defined in one place: moeprof.topp (fp64 prefix sums of |v| sorted descending)
    desc, c = descending_prefix(v.detach().to(torch.float32))  # [R0, n] each
    if rows is not None:
        desc, c = desc[rows], c[rows]  # [R, n]
    k = counts_from_prefix(c, p.to(c.device)[:, None]).squeeze(-1)  # [R]
    tau = desc.gather(-1, (k - 1).clamp(min=0)[:, None]).squeeze(-1).to(torch.float32)
    tau = torch.where(k > 0, tau, torch.full_like(tau, math.inf))
    return torch.where(p >= 1, torch.full_like(tau, _SMALLEST_SUBNORMAL_F32), tau)


def _cpu_topp_threshold(v: torch.Tensor, p: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """`topp_threshold` on the CPU, in numpy (see `_np_topp_threshold`)."""
    mag = v.detach().to(torch.float32).abs().numpy()  # [R0, n]
    return torch.from_numpy(_np_topp_threshold(mag, p.numpy(), None if rows is None else rows.numpy()))


def _np_topp_threshold(mag: np.ndarray, p: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """Return τ [R] (fp32) for |v| rows `mag` [R0, n] (fp32), p [R] and rows [R] (the row of mag each p applies to;
    None: row r) — `topp_threshold`'s arithmetic in numpy: at decode (a few rows) each torch call costs more than
    its work. k = min{j : c_j ≥ p·c_n} over the descending |v| prefix sums c in fp64 (`moeprof.topp.counts_from_prefix`:
    the count of prefix sums below p·c_n, plus one; 0 when p·c_n = 0 or p = 0), read per (row, p) without copying
    a row for each p applied to it (type x: one token, K experts). Raises on NaN/Inf as `ascending_abs_prefix` does."""
    a = np.sort(mag, axis=-1)  # [R0, n] ascending
    c = a[:, ::-1].astype(np.float64)  # widened, then summed in place (twice as fast as a casting cumsum)
    np.cumsum(c, axis=-1, out=c)
    if not np.isfinite(c[:, -1]).all():
        raise ValueError("activation contains NaN or Inf values; top-p is undefined for them "
                         "(check the model's dtype: float16 overflow is the usual cause)")
    n = a.shape[-1]
    r = np.arange(a.shape[0]) if rows is None else rows  # [R] row of each p
    p64 = p.astype(np.float64)
    thresh = p64 * c[r, -1]  # [R]
    if rows is None:
        below = (c < thresh[:, None]).sum(-1)  # [R] prefix sums below the threshold
    elif a.shape[0] == 1:  # one row (type x at batch 1): every p on it in one search
        below = np.searchsorted(c[0], thresh, side="left")
    else:  # rows share their row's prefix: one comparison per (row of v, p on it)
        below = np.array([np.searchsorted(c[i], t, side="left") for i, t in zip(r.tolist(), thresh.tolist())],
                         dtype=np.int64) if len(r) <= 64 else (c[r] < thresh[:, None]).sum(-1)
    k = np.minimum(below + 1, n)
    tau = a[r, n - k]  # the k-th largest |v_j|
    tau = np.where((p64 > 0) & (c[r, -1] > 0), tau, np.float32(np.inf))
    return np.where(p64 >= 1, np.float32(_SMALLEST_SUBNORMAL_F32), tau).astype(np.float32)


# ----- transposed weight cache ------------------------------------------------------------------------------

# Owned per weight tensor: an entry lives exactly as long as its source Parameter (weak key, compared by identity,
# not by tensor `==`), so a sparsified model keeps its copies across `sparsify` contexts (lm-eval re-enters one
# per batch) and frees them with the model. No global clear is needed.
_TRANSPOSED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def transposed_expert_weight(w: torch.Tensor) -> torch.Tensor:
    """Return w.transpose(1, 2).contiguous() for a 3-D expert weight, cached while w lives and is unchanged.

    The cache is keyed weakly by the tensor object (pass the nn.Parameter itself, not a fresh view, to hit it)
    and checked against its data pointer, version counter and shape, so an in-place update (an optimizer
    step, `load_state_dict`, `w.mul_` under no_grad) or a new `w.data` rebuilds the copy. The entry is dropped
    when w is garbage-collected, i.e. with its model. Memory: one copy the size of w per cached weight — for Qwen3-30B-A3B (bf16) 0.40 GB
    per layer for down_proj (type i), 0.81 GB for gate_up_proj (type x).
    """
    hit = _TRANSPOSED.get(w)
    if hit is not None:
        ptr, version, shape, w_t = hit
        if ptr == w.data_ptr() and version == w._version and shape == tuple(w.shape):
            return w_t
    with torch.no_grad():
        w_t = w.detach().transpose(1, 2).contiguous()  # holds no reference to w: the weak key can die
    _TRANSPOSED[w] = (w.data_ptr(), w._version, tuple(w.shape), w_t)
    return w_t


def clear_transposed_cache() -> None:
    """Drop every cached transposed weight copy now (they are otherwise freed with their weights)."""
    _TRANSPOSED.clear()


def _weights_of(module_or_params: torch.nn.Module | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    """Return a module's parameters, or the given tensors."""
    return module_or_params.parameters() if isinstance(module_or_params, torch.nn.Module) else module_or_params


def release_kernel_copies(module_or_params: torch.nn.Module | Iterable[torch.Tensor]) -> int:
    """Drop the cached transposed copies of one model's weights (a module's parameters, or the given tensors)
    and return the bytes released.

    For a model that stays alive after its sparsification ends (an evaluator switching to dense or to another
    type): the copies would otherwise be held until the model is deleted. Other models' copies are kept.
    """
    released = 0
    for w in _weights_of(module_or_params):
        entry = _TRANSPOSED.pop(w, None)
        if entry is not None:
            released += entry[-1].numel() * entry[-1].element_size()
    return released


def transposed_cache_bytes(module_or_params: torch.nn.Module | Iterable[torch.Tensor] | None = None) -> int:
    """Return the bytes held by cached transposed weight copies of weights that are still alive (of one model's
    parameters, or the given tensors, when passed)."""
    if module_or_params is None:
        entries = list(_TRANSPOSED.values())
    else:
        entries = [e for e in (_TRANSPOSED.get(w) for w in _weights_of(module_or_params)) if e is not None]
    return sum(entry[-1].numel() * entry[-1].element_size() for entry in entries)


# ----- the torch path ---------------------------------------------------------------------------------------

def _expert_groups(pair_expert: torch.Tensor, E: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Return (pair ids sorted by expert [P], [(expert, start, stop)] of each non-empty group)."""
    order = torch.argsort(pair_expert, stable=True)  # [P]
    counts = torch.bincount(pair_expert, minlength=E).tolist()
    groups, start = [], 0
    for e, m in enumerate(counts):
        if m:
            groups.append((e, start, start + m))
            start += m
    return order, groups


def _choose_path(path: str, n_pairs: int, n_groups: int) -> str:
    if path not in ("auto", "gather", "dense"):
        raise ValueError(f"path must be 'auto', 'gather' or 'dense', got {path!r}")
    if path != "auto":
        return path
    return "gather" if n_pairs <= GATHER_MAX_PAIRS_PER_EXPERT * max(n_groups, 1) else "dense"


def _bag_sum(mask: torch.Tensor, values: torch.Tensor, value_row: torch.Tensor | None, row_base: torch.Tensor,
             table: torch.Tensor, rows_per_bag: int) -> torch.Tensor:
    """Return Σ_{(r, j) kept} values[value_row[r], j] · table[row_base[r] + j] per bag, [R / rows_per_bag, D].

    mask [R, n]; bag b holds rows b·rows_per_bag … (b+1)·rows_per_bag − 1. One embedding_bag call: it reads
    only the kept table rows.
    """
    r, j = mask.nonzero(as_tuple=True)  # row-major, so each bag's entries are contiguous
    per_bag = mask.sum(-1).view(-1, rows_per_bag).sum(-1)  # [bags]
    offsets = torch.cumsum(per_bag, 0) - per_bag
    weights = values[r if value_row is None else value_row[r], j].to(table.dtype)
    return F.embedding_bag(row_base[r] + j, table, offsets, mode="sum", per_sample_weights=weights)


def torch_grouped_topp_glu(x, top_k_index, top_k_weights, gate_up_proj, down_proj, p, *, sparsify="i", act="silu",
                           return_stats=False, path="auto"):
    """Return y [T, H] (x.dtype), and realized sparsity [T, K] when return_stats: the torch / CPU path.

    Arguments as in `moeprof.kernels.grouped_topp_glu`; `path` forces "gather" or "dense" (tests, benchmarks).
    """
    pb = check_problem(x, top_k_index, top_k_weights, gate_up_proj, down_proj, p, sparsify, act)
    T, H, E, K, I = pb.T, pb.H, pb.E, pb.K, pb.I
    P = T * K
    wdt = gate_up_proj.dtype
    if x.device.type == "cpu" and path != "dense":
        pe = pb.pair_expert.numpy()
        n_groups = len(np.unique(pe))
        if _choose_path(path, P, n_groups) == "gather":
            return _cpu_gather(x, pb, gate_up_proj, down_proj, pe, n_groups == P, return_stats)
    order, groups = _expert_groups(pb.pair_expert, E)
    path = _choose_path(path, P, len(groups))
    with torch.no_grad():
        if sparsify == "i":
            # Groups are slices of the expert-sorted order: one gather in, one scatter out, no per-expert indexing.
            x_sorted = x[pb.pair_token[order]].to(wdt)  # [P, H]
            gu = torch.empty(P, 2 * I, dtype=wdt, device=x.device)  # [P, 2I], expert-sorted
            for e, lo, hi in groups:
                torch.matmul(x_sorted[lo:hi], gate_up_proj[e].T, out=gu[lo:hi])
            h = torch.empty(P, I, dtype=torch.float32, device=x.device)  # [P, I], rows by pair id
            gu = gu.float()
            h[order] = glu_act(gu[:, :I], pb.act) * gu[:, I:]
            tau = topp_threshold(h, pb.pair_p)  # [P]
            keep = h.abs() >= tau[:, None]  # [P, I]
            if path == "gather":
                down_t = transposed_expert_weight(down_proj)  # [E, I, H]
                y = _bag_sum(keep, h * pb.pair_weight[:, None], None, pb.pair_expert * I, down_t.view(E * I, H),
                             rows_per_bag=K)  # one bag per token: its K pairs
            else:
                h_kept = torch.where(keep, h, 0.0)
                y = _dense_down(h_kept, order, groups, pb, down_proj, T, H)
        else:
            xf = x.float()
            tau = topp_threshold(xf, pb.pair_p, rows=pb.pair_token)  # [P]: one sort per token
            keep = xf.abs()[pb.pair_token] >= tau[:, None]  # [P, H]
            if path == "gather":
                gate_up_t = transposed_expert_weight(gate_up_proj)  # [E, H, 2I]
                gu = _bag_sum(keep, xf, pb.pair_token, pb.pair_expert * H, gate_up_t.view(E * H, 2 * I),
                              rows_per_bag=1).float()  # [P, 2I], one bag per pair
            else:
                x_kept = torch.where(keep, xf[pb.pair_token], 0.0).to(wdt)[order]  # [P, H], expert-sorted
                gu_sorted = torch.empty(P, 2 * I, dtype=wdt, device=x.device)
                for e, lo, hi in groups:
                    torch.matmul(x_kept[lo:hi], gate_up_proj[e].T, out=gu_sorted[lo:hi])
                gu = torch.empty(P, 2 * I, dtype=torch.float32, device=x.device)
                gu[order] = gu_sorted.float()
            h = glu_act(gu[:, :I], pb.act) * gu[:, I:]  # [P, I]
            y = _dense_down(h, order, groups, pb, down_proj, T, H)
    y = y.to(x.dtype)
    if not return_stats:
        return y
    n = I if sparsify == "i" else H
    kept = keep.sum(-1).to(torch.float32)  # [P]
    return y, (1.0 - kept / n).reshape(T, K)


def _dense_down(h, order, groups, pb: GroupedProblem, down_proj, T, H) -> torch.Tensor:
    """Return Σ_k w_tk · W_d[e] h_tk as fp32 [T, H] by per-expert GEMMs over pairs grouped by expert."""
    h_sorted = h[order].to(down_proj.dtype)  # [P, I], expert-sorted
    out = torch.empty(h.shape[0], H, dtype=down_proj.dtype, device=h.device)  # [P, H], expert-sorted
    for e, lo, hi in groups:
        torch.matmul(h_sorted[lo:hi], down_proj[e].T, out=out[lo:hi])
    y = torch.zeros(T, H, dtype=torch.float32, device=h.device)
    return y.index_add_(0, pb.pair_token[order], out.float() * pb.pair_weight[order, None])


def _cpu_gather(x, pb: GroupedProblem, gate_up_proj, down_proj, pe: np.ndarray, distinct: bool, return_stats):
    """The gather path on the CPU (batch-1 decode), its index arithmetic in numpy.

    Same computation as the torch gather path: the sparsified projection is one `embedding_bag` over the kept rows
    of the transposed weight copy, the other projection per-expert GEMMs in the weights' dtype. At decode the
    GEMVs stream ~25 MB of weights per token while every torch call on a small tensor costs ~10 µs, so the top-p
    thresholds, kept-entry lists, bag offsets and per-pair weights are computed in numpy on the vectors' storage.
    `distinct`: every pair has its own expert (one token): the GEMMs run in pair order, no sort or un-permute.
    """
    T, H, E, K, I = pb.T, pb.H, pb.E, pb.K, pb.I
    P = T * K
    wdt = gate_up_proj.dtype
    tok = np.arange(P) // K  # [P] token of each pair
    pp = pb.p_expert.detach().numpy()[pe]  # [P] p of each pair's expert
    pw = pb.top_k_weights.detach().reshape(-1).float().numpy()  # [P] routing weight of each pair
    if distinct:
        order, groups = None, [(e, k, k + 1) for k, e in enumerate(pe.tolist())]
    else:
        order_np = np.argsort(pe, kind="stable")
        bounds = np.flatnonzero(np.diff(pe[order_np])) + 1
        starts = np.concatenate(([0], bounds)).tolist()
        stops = np.concatenate((bounds, [P])).tolist()
        order = torch.from_numpy(order_np)
        groups = [(int(pe[order_np[a]]), a, b) for a, b in zip(starts, stops)]
    with torch.no_grad():
        if pb.sparsify == "x":
            xf = x.detach().float().numpy()  # [T, H]
            mag = np.abs(xf)
            tau = _np_topp_threshold(mag, pp, tok)  # [P]: one sort per token
            keep = (mag if T == 1 else mag[tok]) >= tau[:, None]  # [P, H]
            f = np.flatnonzero(keep)  # row-major: each pair's entries contiguous (8× faster than np.nonzero)
            r = f // H  # pair of each kept entry
            j = f - r * H  # its column
            kept = keep.sum(-1)  # [P]
            gate_up_t = transposed_expert_weight(gate_up_proj)  # [E, H, 2I]
            gu = F.embedding_bag(torch.from_numpy(pe[r] * H + j), gate_up_t.view(E * H, 2 * I),
                                 torch.from_numpy(np.cumsum(kept) - kept), mode="sum",
                                 per_sample_weights=torch.from_numpy(xf.ravel()[tok[r] * H + j]).to(wdt))  # [P, 2I]
            gu = gu.float()
            h = glu_act(gu[:, :I], pb.act).mul_(gu[:, I:]).to(wdt)  # [P, I]
            out = torch.empty(P, H, dtype=wdt)  # [P, H]
            if order is None:
                for e, lo, hi in groups:
                    torch.matmul(h[lo:hi], down_proj[e].T, out=out[lo:hi])
            else:
                h_sorted = h[order]
                out_sorted = torch.empty(P, H, dtype=wdt)
                for e, lo, hi in groups:
                    torch.matmul(h_sorted[lo:hi], down_proj[e].T, out=out_sorted[lo:hi])
                out[order] = out_sorted
            # y_t = Σ_k w_tk out_tk in fp32: pairs t·K … t·K + K − 1 are token t's
            y = torch.bmm(torch.from_numpy(pw).view(T, 1, K), out.float().view(T, K, H)).view(T, H)
            n = H
        else:
            xw = x.detach().to(wdt)
            gu = torch.empty(P, 2 * I, dtype=wdt)  # [P, 2I]
            if order is None:
                for e, lo, hi in groups:
                    t = lo // K
                    torch.matmul(xw[t:t + 1], gate_up_proj[e].T, out=gu[lo:hi])
            else:
                x_sorted = xw[pb.pair_token[order]]  # [P, H] expert-sorted
                gu_sorted = torch.empty(P, 2 * I, dtype=wdt)
                for e, lo, hi in groups:
                    torch.matmul(x_sorted[lo:hi], gate_up_proj[e].T, out=gu_sorted[lo:hi])
                gu[order] = gu_sorted
            gu = gu.float()
            h = glu_act(gu[:, :I], pb.act).mul_(gu[:, I:]).numpy()  # [P, I] fp32, pair order
            mag = np.abs(h)
            tau = _np_topp_threshold(mag, pp, None)  # [P]
            keep = mag >= tau[:, None]  # [P, I]
            f = np.flatnonzero(keep)
            r = f // I
            j = f - r * I
            kept = keep.sum(-1)  # [P]
            down_t = transposed_expert_weight(down_proj)  # [E, I, H]
            weights = h.ravel()[f] * pw[r]  # fp32: the routing weight folded in
            # One bag per pair, summed after: one bag over a token's K pairs is ~1.8× slower on the CPU (measured)
            out = F.embedding_bag(torch.from_numpy(pe[r] * I + j), down_t.view(E * I, H),
                                  torch.from_numpy(np.cumsum(kept) - kept), mode="sum",
                                  per_sample_weights=torch.from_numpy(weights).to(wdt))  # [P, H]
            y = out.float().view(T, K, H).sum(1)  # [T, H]
            n = I
    y = y.to(x.dtype)
    if not return_stats:
        return y
    realized = 1.0 - kept.astype(np.float32) / np.float32(n)
    return y, torch.from_numpy(realized.astype(np.float32)).reshape(T, K)

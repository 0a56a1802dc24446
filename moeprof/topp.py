"""The top-p rule, its p-curve, and the paper's top-k / max-p baselines (torch only).

Top-p (arXiv 2509.00454): for v ∈ ℝⁿ keep the fewest largest-|v| entries whose L1 mass reaches p·‖v‖₁.
With |v| sorted descending and prefix sums c_1 ≤ … ≤ c_n (accumulated in fp32 or fp64), the kept count is

    k(p) = min{ j : c_j ≥ p · c_n }   with k = 0 when p · c_n = 0   (p = 0, or v = 0).

Worked example: v = [0.1, -3, 2, 0.5], |v| sorted = [3, 2, 0.5, 0.1], c = [3, 5, 5.5, 5.6].
p = 0.5 → 2.8 ≤ c_1 → k = 1; p = 0.9 → 5.04 → k = 3; p = 1 → k = 4; sparsity S_p = 1 − k / n.

Ties at the cut go to the lowest indices (the count k is what the definition fixes). The paper's code keeps all
entries tied with the threshold and at least one entry; `topp_mask` keeps exactly k.
All functions work over the last dimension of any float tensor; leading dimensions are batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# torch-free, so that the CLI checks a grid without importing torch
from moeprof.activation_types import DEFAULT_P_GRID, check_p_grid  # noqa: F401
from moeprof.errors import InvalidArgument


from moeprof.rules import RULES, rule as _rule  # noqa: F401  (the rule table: what each rule's parameter means)


def _check_float(v: torch.Tensor) -> None:
    if not torch.is_floating_point(v):
        raise TypeError(f"top-p needs a floating-point tensor, got {v.dtype}")


def _check_values(v: torch.Tensor) -> None:
    _check_float(v)
    if v.numel() and not bool(torch.isfinite(v).all()):
        raise InvalidArgument("activation contains NaN or Inf values; top-p is undefined for them "
                         "(check the model's dtype: float16 overflow is the usual cause)")


def _as_p_tensor(p: float | torch.Tensor, batch_shape: torch.Size, device: torch.device) -> torch.Tensor:
    p_t = torch.as_tensor(p, dtype=torch.float64, device=device)
    if p_t.numel() and (bool(torch.isnan(p_t).any()) or bool((p_t < 0).any()) or bool((p_t > 1).any())):
        raise InvalidArgument(f"p must lie in [0, 1], got {p if p_t.numel() == 1 else p_t.tolist()}")
    return p_t.expand(batch_shape) if p_t.dim() <= len(batch_shape) else p_t


def descending_prefix(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (|v| sorted descending, its prefix sums in fp64) along the last dim; raise on NaN/Inf.

    On the CPU numpy's vectorized sort is several times faster than torch.sort (x86-simd-sort), and the p-curve
    is one sort per vector: the largest cost of a profile's statistics (`ascending_abs_prefix` does the work;
    the descending rows are its ascending ones reversed). fp64 prefix sums keep every non-zero entry
    visible (an fp32 running sum stops growing on tiny entries, so p = 1 would miss non-zeros).
    """
    if v.device.type == "cpu":
        ascending, prefix = ascending_abs_prefix(v)
        return ascending.flip(-1), prefix
    desc = torch.sort(v.detach().abs(), dim=-1, descending=True).values
    prefix = torch.cumsum(desc, dim=-1, dtype=torch.float64)
    # NaN or ±Inf anywhere in a row makes its total non-finite: one check per row instead of per entry.
    if prefix.numel() and not bool(torch.isfinite(prefix[..., -1]).all()):
        raise InvalidArgument("activation contains NaN or Inf values; top-p is undefined for them "
                         "(check the model's dtype: float16 overflow is the usual cause)")
    return desc, prefix


def ascending_abs_prefix(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (|v| sorted ascending (fp32, or fp64 for fp64 v), the prefix sums of |v| sorted DEScending in fp64)
    along the last dim; raise on NaN/Inf.

    The same facts as `descending_prefix` for a profile's p-curve, in fewer passes over the rows on the CPU: |v| is
    sorted in place and summed through a reversed view, with no negated copies (the p-curve and the |entry|
    histogram read the ascending rows: `moeprof.stats.base.VectorSummary`).
    Worked example: v = [0.1, -3, 2, 0.5] → ([0.1, 0.5, 2, 3], [3, 5, 5.5, 5.6]).
    """
    x = v.detach()
    mag = x.abs() if x.dtype in (torch.float32, torch.float64) else x.float().abs_()  # [..., n] a fresh tensor
    if mag.device.type == "cpu":
        a = mag.numpy()
        # in place, numpy's SIMD sort of the bit patterns: for non-negative floats (|v|; NaN last, then refused) the
        # integer order is the value order, and the integer sort is ~7 % faster than the float one (measured)
        a.view(np.int32 if a.dtype == np.float32 else np.int64).sort(axis=-1)
        # widen the reversed rows, then sum in place: twice as fast as np.cumsum(..., dtype=float64) casting as it goes
        prefix = torch.from_numpy(a[..., ::-1].astype(np.float64)).cumsum_(-1)
        finite = bool(np.isfinite(prefix.numpy()[..., -1]).all()) if prefix.numel() else True
    else:
        mag = torch.sort(mag, dim=-1).values
        prefix = torch.cumsum(mag.flip(-1), dim=-1, dtype=torch.float64)
        finite = bool(torch.isfinite(prefix[..., -1]).all()) if prefix.numel() else True
    if not finite:
        raise ValueError("activation contains NaN or Inf values; top-p is undefined for them "
                         "(check the model's dtype: float16 overflow is the usual cause)")
    return mag, prefix


def counts_from_prefix(prefix: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Kept count per row for thresholds p (shape [..., Q]) given prefix sums [..., n]."""
    total = prefix[..., -1:]  # [..., 1]
    thresh = p.to(prefix.dtype) * total  # [..., Q]
    # searchsorted(side="left") = number of prefix sums strictly below the threshold; +1 reaches it.
    k = torch.searchsorted(prefix.contiguous(), thresh.contiguous(), side="left") + 1
    # p·‖v‖₁ > 0 exactly when p > 0 and v ≠ 0, even where the fp product underflows (p = 5e-324): then one entry
    k = torch.where((p.to(prefix.dtype) > 0) & (total > 0), k, torch.zeros_like(k))
    return k.clamp_(max=prefix.shape[-1])


def topp_curve(v: torch.Tensor, p_grid: Sequence[float]) -> torch.Tensor:
    """Return kept counts [..., P] of the top-p rule at every p of `p_grid`, from one sort per row."""
    _check_float(v)
    grid = torch.tensor([float(p) for p in p_grid], dtype=torch.float64)
    if grid.numel() == 0 or bool(((grid < 0) | (grid > 1) | torch.isnan(grid)).any()):
        raise InvalidArgument(f"p-grid values must lie in [0, 1], got {list(p_grid)}")
    if v.shape[-1] == 0:
        return torch.zeros(*v.shape[:-1], grid.numel(), dtype=torch.long, device=v.device)
    _, prefix = descending_prefix(v)
    p = grid.to(prefix.device).expand(*v.shape[:-1], grid.numel())
    return counts_from_prefix(prefix, p).to(v.device)


def topp_count(v: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Return the kept count k [...] of the top-p rule per row (p: float or tensor broadcastable to v.shape[:-1])."""
    _check_float(v)
    p_t = _as_p_tensor(p, v.shape[:-1], v.device)
    if v.shape[-1] == 0:
        return torch.zeros(v.shape[:-1], dtype=torch.long, device=v.device)
    _, prefix = descending_prefix(v)
    return counts_from_prefix(prefix, p_t.unsqueeze(-1).to(prefix.device)).squeeze(-1).to(v.device)


def _mask_keeping_k(v: torch.Tensor, desc: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping exactly k[...] largest-|v| entries per row; ties at the cut go to the lowest indices."""
    mag = v.detach().abs().to(desc.dtype).to(desc.device)
    n = mag.shape[-1]
    thr = torch.gather(desc, -1, (k - 1).clamp(min=0).unsqueeze(-1))  # [..., 1] k-th largest |v|
    thr = torch.where(k.unsqueeze(-1) > 0, thr, torch.full_like(thr, float("inf")))
    above = mag > thr
    tied = mag == thr
    room = k.unsqueeze(-1) - above.sum(-1, keepdim=True)  # tied entries still to keep
    keep = above | (tied & (torch.cumsum(tied, -1) <= room))
    return keep.to(v.device) if n else keep


def topp_mask(v: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Return the bool mask of the top-p rule over the last dim: exactly k(p) largest-|v| entries kept (ties at the
    cut go to the lowest indices)."""
    _check_float(v)
    p_t = _as_p_tensor(p, v.shape[:-1], v.device)
    if v.shape[-1] == 0:
        return torch.zeros_like(v, dtype=torch.bool)
    desc, prefix = descending_prefix(v)
    k = counts_from_prefix(prefix, p_t.unsqueeze(-1).to(prefix.device)).squeeze(-1)
    return _mask_keeping_k(v, desc, k)


def topk_mask(v: torch.Tensor, frac: float | torch.Tensor) -> torch.Tensor:
    """Return the bool mask keeping the round(frac · n) largest-|v| entries (the paper's top-k baseline)."""
    _check_values(v)
    frac_t = _as_p_tensor(frac, v.shape[:-1], v.device)
    n = v.shape[-1]
    k = torch.round(frac_t * n).long().clamp_(0, n)
    if n == 0:
        return torch.zeros_like(v, dtype=torch.bool)
    desc, _ = descending_prefix(v)
    return _mask_keeping_k(v, desc, k.to(desc.device))


def maxp_mask(v: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Return the bool mask keeping entries with |v| ≥ p · max|v| (the paper's max-p baseline); v = 0 keeps none."""
    _check_values(v)
    p_t = _as_p_tensor(p, v.shape[:-1], v.device)
    mag = v.abs().to(torch.float64 if v.dtype == torch.float64 else torch.float32)
    peak = mag.amax(dim=-1, keepdim=True) if v.shape[-1] else mag.sum(-1, keepdim=True)
    return (mag >= p_t.unsqueeze(-1).to(mag.dtype) * peak) & (mag > 0)


def threshold_mask(v: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Return the bool mask keeping entries with |v| ≥ τ (a static magnitude threshold, TEAL-style: no sort per
    token). τ: float or tensor broadcastable to v.shape[:-1], each ≥ 0 (τ = 0 keeps every entry)."""
    _check_values(v)
    tau_t = torch.as_tensor(tau, dtype=torch.float64, device=v.device)
    if tau_t.numel() and not bool(((tau_t >= 0) & torch.isfinite(tau_t)).all()):
        bad = tau_t[~((tau_t >= 0) & torch.isfinite(tau_t))].reshape(-1)[0].item()
        raise InvalidArgument(f"a magnitude threshold must be a finite number >= 0, got {bad}")
    mag = v.abs().to(torch.float64 if v.dtype == torch.float64 else torch.float32)
    return mag >= tau_t.to(mag.dtype).unsqueeze(-1)


def rule_mask(v: torch.Tensor, rule: str, p: float | torch.Tensor) -> torch.Tensor:
    """Return the bool mask of `rule` ("topp", "topk", "maxp" or "threshold") with parameter `p` over the last dim
    (for "threshold", p is the magnitude τ ≥ 0: keep |v| ≥ τ)."""
    return globals()[_rule(rule).mask](v, p)  # the table names each rule's mask function (defined above)


def apply_rule(v: torch.Tensor, rule: str, p: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (v with dropped entries zeroed, kept count per row) for `rule` with parameter `p`."""
    mask = rule_mask(v, rule, p)
    return v * mask, mask.sum(-1)

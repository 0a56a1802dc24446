"""Grouped top-p GLU experts in Triton: top-p inside each expert, fused with the grouped expert GEMMs.

Legend as in `moeprof.kernels.reference`: T tokens, H hidden, E experts, K slots, I intermediate, P = T·K
(token, slot) pairs, pair id = t·K + k. The result equals `torch_grouped_topp_glu` (same tie rule: every entry
tied with the threshold is kept); intermediates stay fp32 between the GEMMs.

Pipeline (sparsify="i"; "x" swaps which GEMM is sparse):
  1. align (torch, one host sync): pairs sorted by expert, each expert's run padded to BLOCK_M with the
     sentinel P, one expert per block — the `moe_align_block_size` idea. Example with K=2, E=3, BLOCK_M=2:
     top_k_index = [[2, 0], [2, 1]] → pairs 0..3 have experts [2, 0, 2, 1] → sorted_pairs = [1, P, 3, P, 0, 2],
     block_expert = [0, 1, 2].
  2. _grouped_glu_gemm_kernel, GLU mode: h[pair] = σ(x_t W_gᵀ) ⊙ (x_t W_uᵀ), fp32 [P, I].
  3. _topp_threshold_kernel: exact τ per pair row by bisection on the fp32 bit pattern (31 masked row sums;
     for values ≥ 0 int order = float order), no sort.
  4. _grouped_glu_gemm_kernel, down mode: y_pair[pair] = w_pair · (h ⊙ [|h| ≥ τ]) W_dᵀ, fp32 [P, H].
  5. y = y_pair.view(T, K, H).sum(1) (fixed order, no atomics: the result is deterministic).
Weight skipping (TEAL's insight): the sparsified GEMM reads a transposed weight copy (rows contiguous) and
loads a weight row only when some pair of the block keeps that input channel; masked-off rows cost no memory
traffic on the GPU. With one to a few pairs per block (decode) this skips the dropped rows' loads.

On a machine without CUDA the kernels run only in Triton's interpreter (slow; for tests): the process must
start with TRITON_INTERPRET=1 in its environment, else importing this module raises and says so. In the
interpreter 16-bit arithmetic is wrong, so every load is cast to fp32 at once and only fp32 is stored; on the GPU 16-bit weights feed tl.dot natively
(fp32 accumulation) and fp32 weights use IEEE fp32 dots (no TF32).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # Without a GPU Triton runs only in its interpreter, which must be chosen before Triton is first imported
    # (its own @jit library is built then). Importing a library must not change the process environment, so
    # the program's entry point sets it (tests/conftest.py does), not this module.
    raise RuntimeError(
        "the Triton backend needs a CUDA GPU or Triton's CPU interpreter: start Python with TRITON_INTERPRET=1 "
        "in the environment (before anything imports Triton), or use backend='torch' on the CPU")

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only where Triton is absent
    raise ImportError(
        "the Triton backend of moeprof.kernels needs Triton: pip install 'moeprof[triton]' (or pip install "
        "triton); use backend='torch' to run without it") from exc

from .reference import check_problem, transposed_expert_weight

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ACT_CODE = {"silu": 0, "gelu_tanh": 1}
_F32_INF_BITS = tl.constexpr(0x7F800000)  # +inf as int32 bits: keeps nothing

# ----- launch configs ---------------------------------------------------------------------------------------

# The defaults: used for every (device, shape, regime) that the config file does not name. "decode": few pairs
# per expert; "prefill": many.
DEFAULT_CONFIGS = {
    "decode": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    "prefill": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    "threshold": {"BLOCK_R": 1, "num_warps": 4},
}
# The interpreter runs every program in Python: fewer, bigger blocks are much faster there.
INTERPRETER_CONFIGS = {
    "decode": {"BLOCK_M": 1, "BLOCK_N": 512, "BLOCK_K": 256},
    "prefill": {"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 128},
    "threshold": {"BLOCK_R": 64},
}
# Regime switch: average (token, slot) pairs per active expert at or below this is "decode".
DECODE_MAX_PAIRS_PER_EXPERT = 4
CONFIG_FILE_ENV = "MOEPROF_KERNEL_CONFIGS"
# Package data (shipped in the wheel, like vLLM's fused-MoE configs): moeprof/kernels/configs/<this name>.
CONFIG_RESOURCE = "configs/grouped_topp_glu.json"


@lru_cache(maxsize=None)
def config_table() -> dict:
    """Return the launch-config table {device: {shape: {regime: config}}} from the config file.

    The file is $MOEPROF_KERNEL_CONFIGS when set (a tuned copy), else the package's
    moeprof/kernels/configs/grouped_topp_glu.json. A missing or malformed file raises, naming the file.
    """
    env = os.environ.get(CONFIG_FILE_ENV)
    source = Path(env) if env else resources.files(__package__) / CONFIG_RESOURCE  # a Traversable, not a path
    try:
        table = json.loads(source.read_text(encoding="utf-8"))["configs"]
    except FileNotFoundError as exc:
        fix = f"unset ${CONFIG_FILE_ENV} or point it to an existing file" if env else "reinstall moeprof"
        raise FileNotFoundError(f"kernel launch-config file {source} not found: {fix}") from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"kernel launch-config file {source} is not valid: expected JSON with a 'configs' "
                         f"object ({type(exc).__name__}: {exc})") from exc
    if not isinstance(table, dict):
        raise ValueError(f"kernel launch-config file {source} is not valid: 'configs' must be an object")
    return table


def launch_config(regime: str, *, H: int, I: int, E: int, K: int, device: torch.device) -> dict:
    """Return the launch config for regime ("decode"|"prefill"|"threshold") on this device and shape.

    Lookup in `config_table()`, later entries overriding earlier: DEFAULT_CONFIGS < ["default"]["default"] <
    ["default"][shape] < [device name]["default"] < [device name][shape], with shape f"H{H}_I{I}_E{E}_K{K}"
    and device name `torch.cuda.get_device_name`. A device or shape the file does not name gets the
    DEFAULT_CONFIGS entry (untuned but correct). In Triton's interpreter: INTERPRETER_CONFIGS.
    """
    if INTERPRETED:
        return dict(INTERPRETER_CONFIGS[regime])
    cfg = dict(DEFAULT_CONFIGS[regime])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    table = config_table()
    for dev_key in ("default", name):
        per_dev = table.get(dev_key, {})
        for shape_key in ("default", f"H{H}_I{I}_E{E}_K{K}"):
            cfg.update(per_dev.get(shape_key, {}).get(regime, {}))
    return cfg


# ----- kernels ----------------------------------------------------------------------------------------------

@triton.jit
def _topp_threshold_kernel(
    # Pointers
    v_ptr, row_map_ptr, p_ptr, tau_ptr, kept_ptr,
    # Sizes
    R, N, stride_v_row,
    # Meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ROW_MAP: tl.constexpr,
):
    """τ[r] (fp32) and kept[r] of the top-p rule for rows v[row_map[r]] with p[r]; ties at τ kept."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    row_ok = rows < R
    if HAS_ROW_MAP:
        src = tl.load(row_map_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    a = tl.load(v_ptr + src[:, None] * stride_v_row + cols[None, :],
                mask=row_ok[:, None] & (cols[None, :] < N), other=0.0).to(tl.float32)
    a = tl.abs(a)  # [BLOCK_R, BLOCK_N]
    bits = a.to(tl.int32, bitcast=True)
    p = tl.load(p_ptr + rows, mask=row_ok, other=0.0)
    target = p * tl.sum(a, axis=1)  # [BLOCK_R]
    # Invariant: mass(lo) ≥ target > mass(hi), mass(t) = Σ a[bits ≥ t]. lo = 1 keeps every non-zero.
    lo = tl.full([BLOCK_R], 1, tl.int32)
    hi = tl.full([BLOCK_R], _F32_INF_BITS, tl.int32)
    for _ in range(31):  # hi - lo < 2^31 halves each step
        mid = lo + (hi - lo) // 2
        mass = tl.sum(tl.where(bits >= mid[:, None], a, 0.0), axis=1)
        ok = mass >= target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    tau_bits = tl.where(target > 0.0, lo, _F32_INF_BITS)  # p = 0 or v = 0: keep nothing
    tau_bits = tl.where(p >= 1.0, 1, tau_bits)  # p = 1: keep every non-zero
    kept = tl.sum((bits >= tau_bits[:, None]).to(tl.int32), axis=1)
    tl.store(tau_ptr + rows, tau_bits.to(tl.float32, bitcast=True), mask=row_ok)
    tl.store(kept_ptr + rows, kept, mask=row_ok)


@triton.jit
def _grouped_glu_gemm_kernel(
    # Pointers
    in_ptr, w_ptr, out_ptr, sorted_pair_ptr, block_expert_ptr, tau_ptr, pair_weight_ptr,
    # Sizes
    num_pairs, KDIM, NDIM, in_row_div, stride_in_row, stride_we, stride_wk, stride_wn, stride_out_row,
    # Meta-parameters
    GLU: tl.constexpr, MASK_INPUT: tl.constexpr, SCALE_BY_WEIGHT: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, CAST_W_FP32: tl.constexpr,
):
    """out[pair, n] for the pairs of one expert block: in rows · W[e] viewed as [KDIM, N-columns].

    GLU: out = σ(in W[:, n]) ⊙ (in W[:, NDIM + n]) (the gate_up GEMM, NDIM = I); else out = in W[:, n] (the
    down GEMM), times the pair's routing weight when SCALE_BY_WEIGHT. MASK_INPUT: input entries with
    |v| < τ[pair] are zeroed and weight rows no pair of the block keeps are not loaded.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + offs_m)  # [BLOCK_M]; padding holds num_pairs
    pair_ok = pair < num_pairs
    in_row = (pair // in_row_div).to(tl.int64)
    if MASK_INPUT:
        tau_bits = tl.load(tau_ptr + pair, mask=pair_ok, other=float("inf")).to(tl.int32, bitcast=True)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NDIM
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GLU:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < KDIM
        a = tl.load(in_ptr + in_row[:, None] * stride_in_row + offs_k[None, :],
                    mask=pair_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        if MASK_INPUT:
            keep = tl.abs(a).to(tl.int32, bitcast=True) >= tau_bits[:, None]
            a = tl.where(keep, a, 0.0)
            row_live = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]: some pair of the block keeps it
            w_mask = (row_live & k_ok)[:, None] & n_ok[None, :]
        else:
            w_mask = k_ok[:, None] & n_ok[None, :]
        w_tile = w_base + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn
        # The helpers are inlined by hand: the interpreter re-patches Triton for every jit-function call.
        w = tl.load(w_tile, mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        if CAST_W_FP32:
            w = w.to(tl.float32)
        if not USE_DOT:  # tiny M (decode): broadcast multiply-reduce, no 16-row minimum
            acc += tl.sum(a[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        elif DOT_FP32:
            acc += tl.dot(a, w, input_precision="ieee")
        else:  # 16-bit weights on the GPU: native tensor-core dot, fp32 accumulation
            acc += tl.dot(a.to(w.dtype), w)
        if GLU:
            w_up = tl.load(w_tile + NDIM * stride_wn, mask=w_mask, other=0.0)
            if CAST_W_FP32:
                w_up = w_up.to(tl.float32)
            if not USE_DOT:
                acc_up += tl.sum(a[:, :, None] * w_up.to(tl.float32)[None, :, :], axis=1)
            elif DOT_FP32:
                acc_up += tl.dot(a, w_up, input_precision="ieee")
            else:
                acc_up += tl.dot(a.to(w_up.dtype), w_up)
    if GLU:
        if ACT == 0:  # SiLU
            acc = acc * tl.sigmoid(acc) * acc_up
        else:  # tanh-GELU, with tanh(z) = 2·sigmoid(2z) - 1
            z = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = acc * tl.sigmoid(2.0 * z) * acc_up
    if SCALE_BY_WEIGHT:
        acc = acc * tl.load(pair_weight_ptr + pair, mask=pair_ok, other=0.0)[:, None]
    out = out_ptr + pair[:, None].to(tl.int64) * stride_out_row + offs_n[None, :]
    tl.store(out, acc, mask=pair_ok[:, None] & n_ok[None, :])


# ----- host side --------------------------------------------------------------------------------------------

def align_pairs_to_blocks(pair_expert: torch.Tensor, E: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sorted_pairs int32 [B·block_m], block_expert int32 [B]): pairs grouped by expert, padded.

    Each expert's pairs (in pair-id order) fill ceil(count / block_m) blocks; padding slots hold P (= number
    of pairs), which the kernels treat as absent. See the module docstring for a worked example.
    """
    P = pair_expert.numel()
    dev = pair_expert.device
    order = torch.argsort(pair_expert, stable=True)  # [P]
    counts = torch.bincount(pair_expert, minlength=E)  # [E]
    blocks = (counts + block_m - 1) // block_m  # [E]
    padded_start = (torch.cumsum(blocks, 0) - blocks) * block_m  # [E]
    start = torch.cumsum(counts, 0) - counts  # [E]
    sorted_e = pair_expert[order]
    slot = padded_start[sorted_e] + (torch.arange(P, device=dev) - start[sorted_e])  # [P]
    n_blocks = int(blocks.sum())  # the one host sync
    sorted_pairs = torch.full((n_blocks * block_m,), P, dtype=torch.int32, device=dev)
    sorted_pairs[slot] = order.to(torch.int32)
    block_expert = torch.repeat_interleave(torch.arange(E, device=dev, dtype=torch.int32), blocks)
    return sorted_pairs, block_expert


def _threshold(v: torch.Tensor, p_rows: torch.Tensor, row_map: torch.Tensor | None, cfg: dict):
    """Return (τ fp32 [R], kept int32 [R]) for rows v[row_map] (or v) with p_rows [R]."""
    R = p_rows.numel()
    N = v.shape[1]
    tau = torch.empty(R, dtype=torch.float32, device=v.device)
    kept = torch.empty(R, dtype=torch.int32, device=v.device)
    if R == 0:
        return tau, kept
    block_r = cfg["BLOCK_R"]
    extra = {"num_warps": cfg["num_warps"]} if "num_warps" in cfg else {}
    _topp_threshold_kernel[(triton.cdiv(R, block_r),)](
        v, row_map if row_map is not None else p_rows, p_rows, tau, kept,
        R, N, v.stride(0),
        BLOCK_R=block_r, BLOCK_N=triton.next_power_of_2(N), HAS_ROW_MAP=row_map is not None, **extra)
    return tau, kept


def _gemm(inp, in_row_div, w, w_strides, out, sorted_pairs, block_expert, tau, pair_weight, num_pairs, kdim, ndim,
          *, glu, act_code, cfg):
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    n_blocks = block_expert.numel()
    if n_blocks == 0:
        return
    sixteen_bit = w.dtype in (torch.bfloat16, torch.float16)
    extra = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    _grouped_glu_gemm_kernel[(n_blocks, triton.cdiv(ndim, block_n))](
        inp, w, out, sorted_pairs, block_expert,
        tau if tau is not None else pair_weight, pair_weight,
        num_pairs, kdim, ndim, in_row_div, inp.stride(0), *w_strides, out.stride(0),
        GLU=glu, MASK_INPUT=tau is not None, SCALE_BY_WEIGHT=not glu, ACT=act_code,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        USE_DOT=block_m >= 16, DOT_FP32=INTERPRETED or not sixteen_bit, CAST_W_FP32=INTERPRETED or not sixteen_bit,
        **extra)


def triton_grouped_topp_glu(x, top_k_index, top_k_weights, gate_up_proj, down_proj, p, *, sparsify="i", act="silu",
                            return_stats=False, regime="auto"):
    """Return y [T, H] (x.dtype), and realized sparsity [T, K] when return_stats: the Triton path.

    Arguments as in `moeprof.kernels.grouped_topp_glu`; `regime` forces "decode" or "prefill" launch configs.
    """
    pb = check_problem(x, top_k_index, top_k_weights, gate_up_proj, down_proj, p, sparsify, act)
    T, H, E, K, I = pb.T, pb.H, pb.E, pb.K, pb.I
    P = T * K
    dev = x.device
    x = x.contiguous()
    if regime == "auto":
        n_active = int((torch.bincount(pb.pair_expert, minlength=E) > 0).sum())
        regime = "decode" if P <= DECODE_MAX_PAIRS_PER_EXPERT * max(n_active, 1) else "prefill"
    if regime not in ("decode", "prefill"):
        raise ValueError(f"regime must be 'auto', 'decode' or 'prefill', got {regime!r}")
    shape = dict(H=H, I=I, E=E, K=K, device=dev)
    cfg = launch_config(regime, **shape)
    if regime == "decode" and INTERPRETED:
        # Few pairs per expert: the smallest power of two holding the busiest expert's pairs.
        most = int(torch.bincount(pb.pair_expert, minlength=E).max()) if P else 1
        cfg["BLOCK_M"] = min(16, triton.next_power_of_2(most))
    t_cfg = launch_config("threshold", **shape)
    sorted_pairs, block_expert = align_pairs_to_blocks(pb.pair_expert, E, cfg["BLOCK_M"])
    pair_weight = pb.pair_weight.contiguous()
    p_pair = pb.pair_p.contiguous()
    act_code = _ACT_CODE[pb.act]
    h = torch.empty(P, I, dtype=torch.float32, device=dev)  # [P, I]
    y_pair = torch.empty(P, H, dtype=torch.float32, device=dev)  # [P, H]
    gu_strides = (gate_up_proj.stride(0), gate_up_proj.stride(2), gate_up_proj.stride(1))  # as [E, H, 2I]
    dn_strides = (down_proj.stride(0), down_proj.stride(2), down_proj.stride(1))  # as [E, I, H]
    common = dict(sorted_pairs=sorted_pairs, block_expert=block_expert, pair_weight=pair_weight, num_pairs=P,
                  act_code=act_code, cfg=cfg)
    if sparsify == "i":
        _gemm(x, K, gate_up_proj, gu_strides, h, tau=None, kdim=H, ndim=I, glu=True, **common)
        tau, kept = _threshold(h, p_pair, None, t_cfg)
        down_t = transposed_expert_weight(down_proj)  # [E, I, H], rows contiguous: skipped rows are not read
        _gemm(h, 1, down_t, down_t.stride(), y_pair, tau=tau, kdim=I, ndim=H, glu=False, **common)
        n = I
    else:
        pair_token = pb.pair_token.to(torch.int32)
        tau, kept = _threshold(x, p_pair, pair_token, t_cfg)
        gate_up_t = transposed_expert_weight(gate_up_proj)  # [E, H, 2I]
        _gemm(x, K, gate_up_t, gate_up_t.stride(), h, tau=tau, kdim=H, ndim=I, glu=True, **common)
        _gemm(h, 1, down_proj, dn_strides, y_pair, tau=None, kdim=I, ndim=H, glu=False, **common)
        n = H
    y = y_pair.view(T, K, H).sum(1).to(x.dtype)
    if not return_stats:
        return y
    return y, (1.0 - kept.to(torch.float32) / n).reshape(T, K)

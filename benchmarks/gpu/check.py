"""The one-call GPU check (`benchmarks/gpu/check.sh`): every GPU claim of moeprof measured in one run, one JSON.

Items (each a section of the JSON, with "ok" and its figures; the summary is the same, readable):
  a_exactness  the Triton grouped top-p kernel against the torch path, fp32 and bf16, on awkward shapes (the
               interpreter tests' cases) and the Qwen3-30B-A3B layer shape: output error and kept counts
  b_speed      the kernel against a dense grouped GEMM (F.grouped_mm) at decode (1, 4, 16 tokens) and prefill
               (512, 4096) at the 30B-A3B layer shape, types x and i at sparsity 0.5 and 0.8, with the ideal
               beside each (x: 1/(1 − 2s/3), i: 1/(1 − s/3))
  c_capture    capture overhead (a profile's every default statistic) on a 30B-A3B-shaped model (random weights,
               2 layers, 512 tokens) and the device memory the accumulators hold
  d_torchrun   a 1-GPU `torchrun` profile (nccl) of tiny-moe equals the plain one, dataset by dataset
  e_decode     batch-1 decode tokens/s of tiny-moe and of the 30B-A3B-shaped model, dense and with a schedule

--dry-run: the same plumbing on the CPU with tiny shapes (Triton in its interpreter, gloo instead of nccl): what
CI runs (tests/test_gpu_check.py). Its figures mean nothing; that every section runs and checks does.
Downloads nothing: tiny-moe ships inside moeprof, the other models are built with random weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Setup:
    """Device, dtype, shapes and repetitions of one run (the real check, or the CPU dry run)."""

    def __init__(self, dry_run: bool):
        import torch

        self.dry = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.layer = dict(H=64, I=48, E=8, K=2) if dry_run else dict(H=2048, I=768, E=128, K=8)
        self.decode_tokens = (1,) if dry_run else (1, 4, 16)
        self.prefill_tokens = (8,) if dry_run else (512, 4096)
        self.sparsities = (0.5,) if dry_run else (0.5, 0.8)
        self.bisection_steps = 6 if dry_run else 14
        self.reps = 2 if dry_run else 20
        self.exact_shapes = ([(1, 1, 1, 32, 64), (3, 4, 2, 96, 64), (17, 7, 2, 32, 64)] if dry_run else
                             [(1, 1, 1, 32, 64), (3, 4, 2, 96, 64), (17, 7, 2, 32, 64), (17, 7, 1, 768, 64),
                              (256, 4, 2, 96, 64), (3, 128, 8, 96, 2048), (1, 128, 8, 32, 2048),
                              (3, 7, 2, 768, 2048), (1, 128, 8, 768, 2048), (257, 128, 8, 768, 2048)])
        self.capture_tokens = 32 if dry_run else 512
        self.decode_new_tokens = 3 if dry_run else 32
        self.torch = torch

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def time_ms(self, fn, reps=None) -> float:
        """Median milliseconds of fn() over reps runs after a warm-up (device synchronized around each)."""
        fn()
        self.sync()
        times = []
        for _ in range(reps or self.reps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def shaped_model(self, dtype, layers=2, seed=0):
        """A Qwen3-30B-A3B-shaped model with random weights (dry run: the same family, tiny sizes)."""
        from moeprof.models import build_random, config_from_recipe
        from moeprof.recipes import read_toml

        config = config_from_recipe(read_toml(ROOT / "recipes" / "qwen3-30b-a3b.toml"))
        if self.dry:
            config.hidden_size, config.moe_intermediate_size, config.num_experts = 64, 48, 8
            config.num_experts_per_tok, config.num_attention_heads, config.num_key_value_heads = 2, 4, 2
            config.head_dim = 16
        return build_random(config, layers=layers, vocab_size=8192 if not self.dry else 256, dtype=dtype,
                            seed=seed, device=self.device)


# ----------------------------------------------------------------------------------------------------- problems

def make_problem(setup: Setup, T, E, K, I, H, dtype, seed=0):
    """Random routed GLU experts problem (transformers 5 layout) with per-expert p cycling 0, 0.5, 0.9, 1."""
    torch = setup.torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    gate_up = torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)
    down = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    w, idx = torch.softmax(torch.randn(T, E, generator=g), -1).topk(K, dim=-1)
    p = torch.tensor([(0.0, 0.5, 0.9, 1.0)[e % 4] for e in range(E)])
    dev = setup.device
    return (x.to(dev, dtype), idx.to(dev), (w / w.sum(-1, keepdim=True)).to(dev, dtype), gate_up.to(dev, dtype),
            down.to(dev, dtype), p.to(dev))


def p_for_sparsity(setup: Setup, problem, sparsify, target) -> float:
    """A uniform p whose realized mean sparsity (torch path) is within 0.01 of target (bisection)."""
    from moeprof.kernels import torch_grouped_topp_glu

    x, idx, w, gu, down, _ = problem
    lo, hi = 0.0, 1.0
    for _ in range(setup.bisection_steps):
        mid = (lo + hi) / 2
        _, s = torch_grouped_topp_glu(x, idx, w, gu, down, mid, sparsify=sparsify, return_stats=True)
        if float(s.mean()) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ----------------------------------------------------------------------------------------------------- sections

def a_exactness(setup: Setup) -> dict:
    """Triton vs the torch path (same backend inputs): fp32 tight, bf16 against the torch path on the fp32 upcast."""
    torch = setup.torch
    from moeprof.kernels import torch_grouped_topp_glu, triton_grouped_topp_glu

    rows, ok = [], True
    for shape in setup.exact_shapes:
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for sparsify in ("i", "x"):
                problem = make_problem(setup, *shape, dtype=dtype, seed=sum(shape))
                y, s = triton_grouped_topp_glu(*problem, sparsify=sparsify, return_stats=True)
                ref_problem = tuple(t.float() if t.is_floating_point() else t for t in problem)
                y_ref, s_ref = torch_grouped_topp_glu(*ref_problem, sparsify=sparsify, return_stats=True)
                n = shape[3] if sparsify == "i" else shape[4]
                kept_diff = int(((s.float() - s_ref).abs() * n).round().max())
                err = float((y.float() - y_ref).abs().max())
                scale = float(y_ref.abs().max()) or 1.0
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                # bf16 type i: the kernel's fp32 intermediates vs the reference's may move a cut by an entry
                slack = 0 if (dtype == torch.float32 or sparsify == "x") else 3
                row_ok = err <= tol * scale + 1e-5 and kept_diff <= slack
                ok &= row_ok
                rows.append({"shape_TEKIH": list(shape), "dtype": dtype_name, "type": sparsify,
                             "max_abs_err": err, "max_ref": scale, "kept_count_diff": kept_diff, "ok": row_ok})
    return {"ok": ok, "cases": rows}


def b_speed(setup: Setup) -> dict:
    """Kernel ms vs a dense grouped GEMM (F.grouped_mm over pairs grouped by expert) per regime, type, sparsity."""
    torch = setup.torch
    import torch.nn.functional as F

    from moeprof.kernels import triton_grouped_topp_glu

    L = setup.layer
    H, I, E, K = L["H"], L["I"], L["E"], L["K"]
    dtype = torch.float32 if setup.dry else torch.bfloat16

    def dense(x, idx, w, gu, down):
        order = torch.argsort(idx.reshape(-1))
        offs = torch.cumsum(torch.bincount(idx.reshape(-1), minlength=E), 0).to(torch.int32)
        xs = x[order // K]
        h = F.grouped_mm(xs, gu.transpose(1, 2), offs=offs)  # [P, 2I]
        h = F.silu(h[:, :I]) * h[:, I:]
        out = F.grouped_mm(h, down.transpose(1, 2), offs=offs)  # [P, H]
        y = torch.zeros(x.shape[0] * K, H, dtype=out.dtype, device=x.device)
        y[order] = out * w.reshape(-1)[order, None]
        return y.view(-1, K, H).sum(1)

    rows = []
    for T in setup.decode_tokens + setup.prefill_tokens:
        problem = make_problem(setup, T, E, K, I, H, dtype=dtype, seed=T)
        x, idx, w, gu, down, _ = problem
        dense_ms = setup.time_ms(lambda: dense(x, idx, w, gu, down))
        p1_ms = setup.time_ms(lambda: triton_grouped_topp_glu(x, idx, w, gu, down, 1.0, sparsify="i"))
        for sparsify in ("x", "i"):
            for target in setup.sparsities:
                p = p_for_sparsity(setup, problem, sparsify, target)
                _, s = triton_grouped_topp_glu(x, idx, w, gu, down, p, sparsify=sparsify, return_stats=True)
                real = float(s.float().mean())
                ms = setup.time_ms(lambda: triton_grouped_topp_glu(x, idx, w, gu, down, p, sparsify=sparsify))
                ideal = 1 / (1 - real / 3) if sparsify == "i" else 1 / (1 - 2 * real / 3)
                rows.append({"tokens": T, "regime": "decode" if T in setup.decode_tokens else "prefill",
                             "type": sparsify, "sparsity_target": target, "sparsity_realized": round(real, 4),
                             "dense_ms": round(dense_ms, 4), "kernel_p1_ms": round(p1_ms, 4), "kernel_ms": round(ms, 4),
                             "speedup": round(dense_ms / ms, 3), "ideal": round(ideal, 3),
                             "frac_of_ideal": round(dense_ms / ms / ideal, 3)})
    return {"ok": all(math.isfinite(r["kernel_ms"]) and r["kernel_ms"] > 0 for r in rows), "shape": L,
            "dtype": str(dtype).replace("torch.", ""), "rows": rows}


def c_capture(setup: Setup) -> dict:
    """Stock forward vs the same forward inside profile_capture (every default statistic), and the state's bytes."""
    torch = setup.torch
    from moeprof.arch import adapter_for
    from moeprof.capture import profile_capture
    from moeprof.stats import ProfileStats
    from moeprof.topp import DEFAULT_P_GRID

    model = setup.shaped_model("float32" if setup.dry else "bfloat16")
    sites = adapter_for(model).sites(model)
    ids = torch.randint(0, model.config.vocab_size, (1, setup.capture_tokens),
                        generator=torch.Generator().manual_seed(0)).to(setup.device)

    def new_stats():
        return ProfileStats(len(sites), max(s.num_experts for s in sites), DEFAULT_P_GRID).to(setup.device)

    def stock():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    def captured():
        with torch.inference_mode(), profile_capture(model, new_stats(), sites=sites):
            model(input_ids=ids, use_cache=False)

    stock(), captured()
    times = {"stock": [], "capture": []}
    for _ in range(1 if setup.dry else 5):
        for name, fn in (("stock", stock), ("capture", captured)):
            times[name].append(setup.time_ms(fn, reps=1))
    med = {k: statistics.median(v) for k, v in times.items()}
    stats = new_stats()
    state_bytes = sum(t.numel() * t.element_size() for m in stats.members.values() if hasattr(m, "state")
                      for t in m.state().values() if t.device.type == setup.device)
    peak = None
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        captured()
        peak = torch.cuda.max_memory_allocated() - base
    ratio = med["capture"] / med["stock"]
    return {"ok": math.isfinite(ratio), "layers": len(sites), "tokens": setup.capture_tokens,
            "stock_ms": round(med["stock"], 3), "capture_ms": round(med["capture"], 3),
            "overhead_x": round(ratio, 3), "state_bytes_on_device": state_bytes,
            "state_bytes_48_layers_est": state_bytes * 48 // max(len(sites), 1),
            "peak_extra_bytes_during_capture": peak}


def _write_text(path: Path) -> Path:
    import random

    rng = random.Random(0)
    words = "expert router token layer sparse dense mass vector gate norm model shard rank merge store".split()
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) + str(rng.randrange(1000))
                                                           for _ in range(80))}) for _ in range(64)))
    return path


def d_torchrun(setup: Setup, work: Path) -> dict:
    """`torchrun --nproc-per-node 1 -m moeprof profile` (nccl on CUDA, gloo in the dry run) == the plain profile."""
    import h5py
    import numpy as np

    data = _write_text(work / "text.jsonl")
    tokens = "128" if setup.dry else "4096"
    common = ["-m", "moeprof", "profile", "tiny-moe", "--data", str(data), "--max-tokens", tokens, "--seq-len",
              "64", "--batch-size", "2", "--device", setup.device]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    plain, ranked = work / "plain.h5", work / "torchrun.h5"
    runs = {"plain": [sys.executable, *common, "--out", str(plain)],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
                         "29517", *common, "--out", str(ranked)]}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            return {"ok": False, "failed": name, "stderr_tail": proc.stderr[-2000:]}
    differ, compared = [], 0
    with h5py.File(plain) as a, h5py.File(ranked) as b:
        def visit(name, obj):
            nonlocal compared
            if isinstance(obj, h5py.Dataset):
                compared += 1
                other = b.get(name)
                if other is None or not np.array_equal(obj[()], other[()], equal_nan=obj.dtype.kind == "f"):
                    differ.append(name)
        a.visititems(visit)
        backend = b.attrs.get("backend", b.attrs.get("dist_backend", None))
    return {"ok": not differ and compared > 0, "datasets_compared": compared, "datasets_differing": differ[:20],
            "backend_attr": None if backend is None else str(backend),
            "expected_backend": "gloo" if setup.dry else "nccl"}


def e_decode(setup: Setup) -> dict:
    """model.generate batch 1: tokens/s dense and with a uniform schedule (type i p 0.8, type x p 0.8)."""
    torch = setup.torch
    import numpy as np

    from moeprof.models import load_model
    from moeprof.schedule import Schedule, model_shape, sparsify_

    models = {"tiny-moe": load_model("tiny-moe", dtype="float32" if setup.dry else "bfloat16",
                                     device=setup.device)[0],
              "qwen3-30b-a3b-shape": setup.shaped_model("float32" if setup.dry else "bfloat16")}
    rows = []
    for name, model in models.items():
        model.generation_config.pad_token_id = 0
        shape = model_shape(model)
        ids = torch.randint(1, 200, (1, 8), generator=torch.Generator().manual_seed(0)).to(setup.device)
        n = setup.decode_new_tokens

        def gen():
            with torch.no_grad():
                model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        dense_ms = setup.time_ms(gen, reps=max(2, setup.reps // 5))
        for t in ("i", "x"):
            schedule = Schedule(np.full((shape["layers"], shape["experts"]), 0.8), t, "topp", name, shape)
            handle = sparsify_(model, schedule)
            try:
                ms = setup.time_ms(gen, reps=max(2, setup.reps // 5))
                realized = handle.realized.overall_flop_weighted
            finally:
                handle.remove()
            rows.append({"model": name, "type": t, "p": 0.8, "new_tokens": n,
                         "dense_tok_s": round(n / dense_ms * 1e3, 2), "scheduled_tok_s": round(n / ms * 1e3, 2),
                         "speedup": round(dense_ms / ms, 3), "realized_sparsity": round(float(realized), 4)})
    return {"ok": all(r["scheduled_tok_s"] > 0 for r in rows), "rows": rows}


# ----------------------------------------------------------------------------------------------------- main

def summary_lines(result: dict) -> list[str]:
    lines = [f"moeprof GPU check — {result['mode']} — {result['device']} — {result['date']}",
             f"overall: {'PASS' if result['ok'] else 'FAIL'} ({result['wall_s']:.0f} s)"]
    for name, sec in result["sections"].items():
        lines.append(f"[{'ok' if sec.get('ok') else 'FAIL'}] {name} ({sec.get('wall_s', 0):.1f} s)")
        if "error" in sec:
            lines.append(f"    error: {sec['error']}")
        if name == "a_exactness" and "cases" in sec:
            bad = [c for c in sec["cases"] if not c["ok"]]
            lines.append(f"    {len(sec['cases'])} cases, {len(bad)} outside tolerance")
        for r in sec.get("rows", []):
            lines.append("    " + ", ".join(f"{k} {v}" for k, v in r.items()))
        for k in ("overhead_x", "stock_ms", "capture_ms", "state_bytes_on_device", "datasets_compared",
                  "datasets_differing"):
            if k in sec:
                lines.append(f"    {k}: {sec[k]}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the plumbing on the CPU, tiny shapes (CI)")
    ap.add_argument("--out", default="outputs/gpu-check", help="folder for check.json and summary.txt")
    ap.add_argument("--only", nargs="*", default=None, help="run only these sections (a_exactness, b_speed, ...)")
    args = ap.parse_args()
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        print("error: --dry-run needs TRITON_INTERPRET=1 set before Python starts (check.sh sets it)", file=sys.stderr)
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch (the GPU check does not skip; run with --dry-run on a CPU)",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"error: Triton is not importable ({exc}); install the README's set-up (pip install triton)",
              file=sys.stderr)
        return 2
    setup = Setup(args.dry_run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    result = {"mode": "dry-run" if args.dry_run else "gpu", "device": device,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "sections": {}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sections = {"a_exactness": lambda: a_exactness(setup), "b_speed": lambda: b_speed(setup),
                    "c_capture": lambda: c_capture(setup), "d_torchrun": lambda: d_torchrun(setup, Path(tmp)),
                    "e_decode": lambda: e_decode(setup)}
        for name, fn in sections.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                sec = fn()
            except Exception as exc:  # one section's failure is reported, the others still run
                sec = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()[-3000:]}
            sec["wall_s"] = round(time.perf_counter() - t0, 2)
            result["sections"][name] = sec
            print(f"[{'ok' if sec['ok'] else 'FAIL'}] {name} ({sec['wall_s']} s)", flush=True)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["ok"] = bool(result["sections"]) and all(s["ok"] for s in result["sections"].values())
    (out / "check.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "summary.txt").write_text("\n".join(summary_lines(result)) + "\n")
    print(f"{'PASS' if result['ok'] else 'FAIL'}: {out / 'check.json'}, {out / 'summary.txt'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel throughput: tokens/s of a 2-rank gloo run ÷ a 1-process run on the same data, and the bytes
the one final all-reduce moves (O(L·E·P·B): the same at N and 2N tokens).

    PYTHONPATH=. .venv/bin/python benchmarks/profile/bench_distributed.py --model tiny-moe --tokens 16384

Both runs are `moeprof profile` subprocesses on the same data (random words, distinct sequences); tokens/s is
the store's tokens / wall_s (the profiling loop and, for the ranks, the final reduction; model loading and
process start are excluded). The 1-process run uses torch's default threads (one per core); each rank gets
OMP_NUM_THREADS=1, as torchrun sets it, so both use every core. Medians of --repeats interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py

ROOT = Path(__file__).resolve().parents[2]


def write_data(path: Path, docs: int) -> Path:
    rng = random.Random(0)
    words = "expert router token layer sparse dense mass vector gate norm model shard rank merge store".split()
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) + str(rng.randrange(1000))
                                                           for _ in range(80))}) for _ in range(docs)))
    return path


def run(cmd: list[str], out: Path, env: dict) -> tuple[float, dict]:
    """Run one profile; return (tokens/s, the store's root attributes)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    with h5py.File(out) as f:
        attrs = dict(f.attrs)
    return attrs["tokens"] / attrs["wall_s"], attrs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_data(tmp / "docs.jsonl", docs=a.tokens // 100 + 50)
        base = ["profile", a.model, "--data", str(data), "--seq-len", str(a.seq_len), "--batch-size",
                str(a.batch_size)]
        one_cmd = [sys.executable, "-m", "moeprof", *base, "--out", str(tmp / "one.h5")]
        dp_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                  "moeprof", *base, "--out", str(tmp / "dp.h5")]
        one, dp, bytes_at = [], [], {}
        for _ in range(a.repeats):
            one.append(run(one_cmd + ["--max-tokens", str(a.tokens)], tmp / "one.h5", env)[0])
            tps, attrs = run(dp_cmd + ["--max-tokens", str(a.tokens)], tmp / "dp.h5",
                             {**env, "OMP_NUM_THREADS": "1"})
            dp.append(tps)
            bytes_at[a.tokens] = json.loads(attrs["distributed"])["allreduce_bytes"]
        attrs = run(dp_cmd + ["--max-tokens", str(2 * a.tokens)], tmp / "dp.h5", {**env, "OMP_NUM_THREADS": "1"})[1]
        bytes_at[2 * a.tokens] = json.loads(attrs["distributed"])["allreduce_bytes"]
    ratio = statistics.median(d / o for d, o in zip(dp, one))
    print(f"model {a.model}, {a.tokens} tokens, seq-len {a.seq_len}, batch {a.batch_size}, {os.cpu_count()} cores")
    print(f"1 process : {statistics.median(one):,.0f} tok/s  (runs: {', '.join(f'{x:,.0f}' for x in one)})")
    print(f"2 ranks   : {statistics.median(dp):,.0f} tok/s  (runs: {', '.join(f'{x:,.0f}' for x in dp)})")
    print(f"ratio 2-rank gloo / 1 process (median of paired runs): {ratio:.2f}")
    for n, b in bytes_at.items():
        print(f"all-reduce at {n} tokens: {b:,} bytes once per run "
              f"({b / -(-n // (a.seq_len * a.batch_size)):,.0f} bytes per batch)")


if __name__ == "__main__":
    main()

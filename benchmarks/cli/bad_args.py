"""Wall time of the CLI refusing bad arguments (each a fresh `python -m moeprof` process; median of --repeats).

    PYTHONPATH=. python benchmarks/cli/bad_args.py [--repeats 5] [--repo PATH]   # --repo: another checkout

Prints one row per command: median seconds to exit 2, and whether torch was imported (`-X importtime`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [
    ["profile", "tiny-moe", "--data", "missing.txt"],
    ["profile", "tiny-moe", "--data", "t.txt", "--types", "z"],
    ["profile", "tiny-moe", "--data", "t.txt", "--p-grid", "2"],
    ["critical", "tiny-moe", "--type", "z", "--task", "ppl:wikipedia"],
    ["critical", "tiny-moe", "--task", "no_such_task"],
    ["schedule", "tiny-moe", "--type", "z", "--task", "ppl:wikipedia", "--out", "s.json"],
    ["eval", "tiny-moe", "--p", "2", "--task", "ppl:wikipedia"],
    ["leaderboard", "missing.h5"],
    ["plot", "missing.h5", "-o", "t.txt/plots"],
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[2]), help="the moeprof checkout to time")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(args.repo).resolve())}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "t.txt").write_text("some text\n")
        print(f"{'command':<70} {'median s':>8}  torch")
        for argv in CASES:
            times, torch_loaded = [], False
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "moeprof", *argv], cwd=tmp, env=env,
                                      capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
                assert proc.returncode == 2, (argv, proc.stderr[-500:])
                torch_loaded |= any(line.split("|")[-1].strip() == "torch" for line in proc.stderr.splitlines())
            print(f"{' '.join(argv):<70} {statistics.median(times):8.2f}  {'yes' if torch_loaded else 'no'}")


if __name__ == "__main__":
    main()

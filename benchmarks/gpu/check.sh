#!/usr/bin/env bash
# The one-call GPU check: Triton kernel exactness and speed, capture overhead and memory, a 1-GPU torchrun
# profile, batch-1 decode with a schedule (benchmarks/gpu/check.py says what each item measures).
#
#   benchmarks/gpu/check.sh [--out DIR]        # on a CUDA machine with the README's set-up: <= 8 min on one H100
#   benchmarks/gpu/check.sh --dry-run          # the plumbing on the CPU, tiny shapes (CI: tests/test_gpu_check.py)
#
# Writes DIR/check.json and DIR/summary.txt (default outputs/gpu-check). Exits non-zero when CUDA or Triton is
# missing (it never skips) or when any item fails. Downloads nothing; installs nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python}"
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then
    export TRITON_INTERPRET=1  # before Python starts: the kernels module reads it at import
  fi
done
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$root"
exec "$python" "$here/check.py" "$@"

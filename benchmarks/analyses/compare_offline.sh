#!/usr/bin/env bash
# The model comparison and mask-stability figures of docs/results.md, from the models available offline.
# Usage: PYTHONPATH=$PWD bash benchmarks/analyses/compare_offline.sh [OUT_DIR]   (default outputs/analyses)
set -euo pipefail
OUT=${1:-outputs/analyses}
PY=${PYTHON:-python}
mkdir -p "$OUT"
for m in tiny-dense tiny-moe smollm2; do
  $PY -m moeprof profile "$m" --data wikipedia:heldout --max-tokens 2048 --seq-len 256 --batch-size 2 \
      --rank --types x,i --out "$OUT/$m.h5"
done
for m in tiny-dense tiny-moe smollm2; do  # the compare table's critical column (SmolLM2: ~5 min idle)
  $PY -m moeprof critical "$m" --type i --task ppl:wikipedia --max-tokens 4096 --out "$OUT/$m.h5"
done
$PY -m moeprof compare "$OUT/tiny-dense.h5" "$OUT/tiny-moe.h5" "$OUT/smollm2.h5" -o "$OUT/compare"
printf '%s\n' "The history of the city begins in the Roman era" "Photosynthesis converts light into" \
  "In mathematics, a prime number is" "The committee met on Tuesday to discuss" > "$OUT/prompts.txt"
for m in tiny-moe smollm2; do
  $PY -m moeprof stability "$m" --prompts "$OUT/prompts.txt" --p 0.9 --type i --max-new-tokens 24 \
      --out "$OUT/$m-stability.h5"
done
$PY -m moeprof leaderboard "$OUT/tiny-moe.h5" --type i --top 8

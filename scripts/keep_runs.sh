#!/usr/bin/env bash
# Copy the small files (config.json, summary.json, metrics.jsonl, and samples.npy where a task writes one: the
# flow task's sample grid, ~20 KB; never checkpoints) of every finished
# run under SRC into DST/<run>/, so that a sweep's results can be committed and its report rebuilt
# without runs/ (python scripts/report.py --runs DST ...). Unfinished runs are skipped.
#   bash scripts/keep_runs.sh runs/lm/tune results/lm/cpu/tune_runs
set -euo pipefail
src=${1:?usage: keep_runs.sh SRC DST}; dst=${2:?usage: keep_runs.sh SRC DST}
n=0
for run in "$src"/*/; do
  run=${run%/}
  [ -f "$run/summary.json" ] || continue
  grep -q '"status": "done"' "$run/summary.json" || continue
  mkdir -p "$dst/$(basename "$run")"
  cp "$run/config.json" "$run/summary.json" "$run/metrics.jsonl" "$dst/$(basename "$run")/"
  if [ -f "$run/samples.npy" ]; then cp "$run/samples.npy" "$dst/$(basename "$run")/"; fi   # report.py's samples.png
  n=$((n + 1))
done
echo "kept the small files of $n finished runs in $dst"

#!/usr/bin/env bash
# The four damping sweeps (issue: DoPr's damping), two processes of one thread each on a 2-core machine:
# per task, the AdamW reference at the base LR first (alone: it builds the task's data caches), then
# the DoPr-AdamW grid at the base LR in one process and at 3x it (then its AdamW reference) in the other.
# Rerunning skips finished runs and resumes the others. Usage: bash scripts/run_damping_sweeps.sh [task ...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
declare -A BASE=( [lm]=1e-3 [control]=1e-3 [flow]=1e-2 [robot]=1e-3 )
declare -A BIG=( [lm]=3e-3 [control]=3e-3 [flow]=3e-2 [robot]=3e-3 )
for t in "${@:-control lm flow robot}"; do
  for task in $t; do
    echo "== $task $(date -u +%H:%M:%S)"
    $PY -m experiments.train -m +sweep=${task}_damping_base hydra.sweeper.params.lr=${BASE[$task]} threads=2 > runs/sweep_${task}_0.log 2>&1
    $PY -m experiments.train -m +sweep=${task}_damping hydra.sweeper.params.lr=${BASE[$task]} threads=1 > runs/sweep_${task}_a.log 2>&1 &
    ( $PY -m experiments.train -m +sweep=${task}_damping hydra.sweeper.params.lr=${BIG[$task]} threads=1 &&
      $PY -m experiments.train -m +sweep=${task}_damping_base hydra.sweeper.params.lr=${BIG[$task]} threads=1 ) > runs/sweep_${task}_b.log 2>&1
    wait
    echo "== $task done $(date -u +%H:%M:%S)"
  done
done

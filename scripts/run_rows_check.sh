#!/usr/bin/env bash
# One-seed training check of AP's row cap (docs/benchmark.md, "Row subsampling"):
# DoPr-AdamW at damping 1, tuning seed 100 and the damping sweep's learning rate, once with the suite's
# row cap (max_rows_per_dim=8, configs/optimizer/dopr_*.yaml) and once exact (every row), on the flow and robot tasks at scale=cpu.
# Two processes of one thread each (a 2-core machine). Runs land in runs/rows_check/<task>-rows<k>.
# Usage: bash scripts/run_rows_check.sh [flow|robot ...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
declare -A LR=( [flow]=1e-2 [robot]=1e-3 )
run() {  # task rows
  $PY -m experiments.train task=$1 scale=cpu optimizer=dopr_adamw lr=${LR[$1]} seed=100 threads=1 \
    optimizer.kwargs.damping=1 optimizer.kwargs.max_rows_per_dim=$2 hydra.run.dir=runs/rows_check/$1-rows$2
}
mkdir -p runs/rows_check
tasks=${*:-flow robot}
[[ " $tasks " == *" flow "* ]] && ( run flow 8 && run flow null ) > runs/rows_check/flow.log 2>&1 &
[[ " $tasks " == *" robot "* ]] && ( run robot 8 && run robot null ) > runs/rows_check/robot.log 2>&1 &
wait

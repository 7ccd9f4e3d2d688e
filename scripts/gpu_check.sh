#!/usr/bin/env bash
# Every task's paper-shaped model for a few DoPr steps on one device: step time, AP's share, peak memory.
#   bash scripts/gpu_check.sh                       # GPU, paper shapes
#   bash scripts/gpu_check.sh --device cpu --tiny   # CPU, toy sizes (CI)
# Arguments go to scripts/gpu_check.py (--tasks lm,flow --steps 10 ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_check.py "$@"

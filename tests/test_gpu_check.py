"""scripts/gpu_check.sh --device cpu --tiny: the GPU check's code runs every task in CI."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # several entry-point runs: keeps `make test` under 10 minutes; .ci/run runs it
def test_gpu_check_runs_every_task_on_cpu_and_prints_time_share_and_memory():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for task in ("lm", "flow", "robot", "control"):
        row = next(line for line in out.stdout.splitlines() if line.startswith(f"| {task} (tiny)"))
        adamw, dopr_s, share, memory = [c.strip() for c in row.split("|")[2:6]]
        assert float(adamw) > 0 and float(dopr_s) > 0 and share.endswith("%")
        assert re.fullmatch(r"[\d.]+ / [\d.]+", memory) and float(memory.split("/")[1]) > 0


def test_gpu_check_names_the_fix_for_a_missing_gpu_or_an_unknown_task():
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--tiny", "--tasks", "nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "choose from lm, flow, robot, control" in out.stderr

"""Wall time of two short training runs: one after another with all cores each, against both at once
with cores / 2 threads each (what `LAUNCHER=local JOBS=2 THREADS=1` does). Run it on an idle machine.

    python scripts/bench_parallel.py [--task lm] [--steps 100] [--cores 2]

Each run is the real entry point (`python -m experiments.train`, logger off, its own temporary run
folder), so start-up, validation and the closing rollout evaluation are counted, as in a sweep.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(task: str, steps: int, threads: int, seed: int, run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.train", f"task={task}", "scale=cpu", "optimizer=adamw", f"seed={seed}",
           f"threads={threads}", "logger=none", f"trainer.steps={steps}", f"trainer.warmup_steps={max(1, steps // 10)}",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a benchmark run failed:\n{err[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="lm")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    half = max(1, args.cores // 2)
    with tempfile.TemporaryDirectory() as tmp:
        warm = launch(args.task, 2, args.cores, 0, Path(tmp) / "warm")  # data generation and caches, not timed
        wait([warm])
        start = time.perf_counter()
        for seed in (0, 1):
            wait([launch(args.task, args.steps, args.cores, seed, Path(tmp) / f"seq{seed}")])
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        wait([launch(args.task, args.steps, half, seed, Path(tmp) / f"par{seed}") for seed in (0, 1)])
        parallel = time.perf_counter() - start
    print(f"task={args.task} scale=cpu, 2 runs of {args.steps} steps, {args.cores} cores")
    print(f"  one after another, threads={args.cores}: {sequential:7.1f} s")
    print(f"  both at once, threads={half} each:     {parallel:7.1f} s")
    print(f"  ratio (one after another / both at once): {sequential / parallel:.2f}")


if __name__ == "__main__":
    main()

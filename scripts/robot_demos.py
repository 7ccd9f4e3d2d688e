#!/usr/bin/env python
"""(Re)generate the robot task's embedded demonstrations: the scripted expert in robosuite, written
in robomimic's hdf5 layout (mask/train, mask/valid), with the expert's success rate printed.

    python scripts/robot_demos.py                                  # Lift and Stack, the task's defaults
    python scripts/robot_demos.py --env Stack --demos 200 --seed 3 --out stack200.hdf5

The robot task generates the file it needs by itself on first use (same function, cached in
task.data_dir); this command is for other counts, seeds and noise levels (task.dataset=<path>).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.robot_sim import ScriptedExpert, write_expert_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="all", choices=[*ScriptedExpert.TASKS, "all"])
    p.add_argument("--demos", type=int, default=60, help="successful demos to write (default: the task's 60)")
    p.add_argument("--val-demos", type=int, default=10, help="the first N go to mask/valid, the rest to mask/train")
    p.add_argument("--seed", type=int, default=1, help="episode i starts from seed*100000 + i")
    p.add_argument("--noise", type=float, default=0.1, help="std of Gaussian noise on the arm's actions")
    p.add_argument("--horizon", type=int, default=400, help="steps before an attempt counts as failed")
    p.add_argument("--out", type=Path, default=None, help="output .hdf5 (one env only; default: <env>_expert.hdf5 here)")
    p.add_argument("--min-success", type=float, default=0.9, help="exit 1 if the expert's success rate is below this")
    args = p.parse_args(argv)
    envs = list(ScriptedExpert.TASKS) if args.env == "all" else [args.env]
    if args.out is not None and len(envs) > 1:
        p.error("--out names one file: pass --env too")
    worst = 1.0
    for env in envs:
        out = args.out or Path(f"{env}_expert.hdf5")
        worst = min(worst, write_expert_dataset(out, env, args.demos, args.val_demos, args.seed, args.noise, args.horizon))
    if worst < args.min_success:
        print(f"the scripted expert's success rate {worst:.2f} is below {args.min_success}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

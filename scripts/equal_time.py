#!/usr/bin/env python
"""The equal-time arm (docs/protocol.md, "The budget axis"): each base GP X that has a DoPr-X in a task's headline
evaluation runs again on the same seeds for DoPr-X's measured training time: its steps (and warmup, evaluation and
checkpoint periods) scaled by the time ratio, the LR schedule stretched to match. The ratio is measured from the
evaluation runs themselves (the median over seeds of DoPr-X's training seconds over X's, from their records), so it
belongs to the machine they ran on, which the records and this arm's page name.

A variant DoPr-X@10 (dopr_<X>_k10: AP refreshed every 10 steps; experiments/registry.py) gets an arm of its own: X
again for DoPr-X@10's measured time, into results/<task>/cpu_equal_time_k10. X's arm for DoPr-X ran longer than
DoPr-X@10 trained, so pairing DoPr-X@10 with it would ask a harder question than equal time; the k10 arm asks the
right one (docs/protocol.md: secondary; docs/tasks/flow.md, "DoPr-X@10").

    python scripts/equal_time.py lm            # reads results/lm/cpu, runs the arm into results/lm/cpu_equal_time
    python scripts/equal_time.py lm --plan     # the ratios and the commands, nothing run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import record  # noqa: E402
from experiments.reports import load  # noqa: E402
from experiments.protocol import launch_overrides  # noqa: E402
from experiments.registry import base_of, has_ap, rank, variant_suffix  # noqa: E402

PERIODS = ("warmup_steps", "eval_every", "rollout_every", "light_rollout_every", "checkpoint_every", "log_every")


def plan(records: list[dict], suffix: str = "") -> dict[str, dict]:
    """{X: {"of": DoPr-X, "ratio", "steps", "trainer": {key: value}, "seeds", "cpu"}} for every X with a DoPr-X; with
    ``suffix`` ("k10") for every X with that variant of its DoPr-X (dopr_<X>_k10) instead."""
    done = [r for r in records if r["status"] == "done"]
    by = {}
    for r in done:
        by.setdefault(r["optimizer"], {})[r["seed"]] = r
    out = {}
    for opt in sorted(by, key=rank):
        if not has_ap(opt) or variant_suffix(opt) != suffix or base_of(opt) not in by:
            continue
        x, d = by[base_of(opt)], by[opt]
        seeds = sorted(set(x) & set(d))
        secs = [(d[s]["evals"][-1].get("train_seconds"), x[s]["evals"][-1].get("train_seconds")) for s in seeds]
        if not seeds or any(a is None or b is None or b <= 0 for a, b in secs):
            raise SystemExit(f"error: the runs of {opt} and {base_of(opt)} have no training seconds in their records (made before the "
                             "loop recorded them): rerun the headline evaluation with the current code first (make reproduce-<task>)")
        ratio = median(a / b for a, b in secs)
        tr = x[seeds[0]]["config"]["trainer"]
        steps = max(1, round(tr["steps"] * ratio))
        trainer = {"steps": steps, **{k: max(1, round(tr[k] * ratio)) for k in PERIODS if tr.get(k)}}
        cpus = sorted({x[s]["provenance"].get("gpu") or x[s]["provenance"].get("cpu") for s in seeds}
                      | {d[s]["provenance"].get("gpu") or d[s]["provenance"].get("cpu") for s in seeds})
        out[base_of(opt)] = {"of": opt, "ratio": ratio, "steps": steps, "trainer": trainer, "seeds": seeds, "machine": cpus}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", help="a task with a headline evaluation in results/<task>/cpu")
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="the results folder")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the run folders go (runs/<task>/cpu_equal_time)")
    parser.add_argument("--plan", action="store_true", help="print the ratios and commands, run nothing")
    parser.add_argument("--launcher", default="local", help="hydra launcher: local (JOBS at once), slurm, or '' (one after another)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run (e.g. scale=smoke logger=none)")
    args = parser.parse_intermixed_args(argv)
    source = args.results / args.task / "cpu"
    if not (source / record.RECORDS).exists():
        parser.error(f"{source / record.RECORDS} does not exist: run the task's headline evaluation first (make reproduce-{args.task.replace('_', '-')})")
    records = record.read(source)
    # the arm runs the task's current config: only headline runs of the current task version set its budget (an older
    # version's steps and periods, scaled, would run the new version at the old budget)
    now = load.current_version(ROOT / "configs" / "task", args.task)
    stale = sorted({load.task_version(r) for r in records if load.task_version(r) != now}) if now is not None else []
    records = [r for r in records if now is None or load.task_version(r) == now]
    if not records:
        parser.error(f"{source / record.RECORDS} holds runs of task version {', '.join(map(str, stale))} only; the task is at "
                     f"version {now} (configs/task/{args.task}.yaml): run its headline evaluation first "
                     f"(make reproduce-{args.task.replace('_', '-')})")
    if stale:
        print(f"left out: the runs of task version {', '.join(map(str, stale))} (the task is at version {now})", flush=True)
    suffixes = sorted({variant_suffix(r["optimizer"]) for r in records if has_ap(r["optimizer"])})  # "": DoPr-X; "k10": DoPr-X@10
    launch = launch_overrides(args.launcher, args.jobs, args.threads)
    planned = {s: plan(records, s) for s in suffixes}
    if not any(planned.values()):
        parser.error(f"{source} has no X with a DoPr-X on common seeds: nothing to equalise")
    for suffix, arms in planned.items():
        if arms:
            run_arms(args, arms, "cpu_equal_time" + (f"_{suffix}" if suffix else ""), launch)
    return 0


def run_arms(args, arms: dict, name: str, launch: list[str]) -> None:
    """Run (or with --plan print) one equal-time experiment, results/<task>/<name>, then render its page."""
    out = args.results / args.task / name
    for x, arm in arms.items():
        machines = ", ".join(m for m in arm["machine"] if m)
        print(f"{x}: {arm['of']} trained {arm['ratio']:.3f}x as long per run (median over seeds {arm['seeds']}, measured on {machines}): "
              f"{x} runs {arm['steps']} steps", flush=True)
        cmd = [sys.executable, "-m", "experiments.train", "-m", f"+experiment={args.task}/cpu", f"optimizer={x}",
               f"seed={','.join(map(str, arm['seeds']))}", f"results_dir={out}", f"hydra.sweep.dir={args.runs / args.task / name}",
               *(f"trainer.{k}={v}" for k, v in arm["trainer"].items()),
               f"+equal_time={{of: {arm['of']}, ratio: {arm['ratio']:.4f}, machine: '{machines}'}}", *launch, *args.overrides]
        if args.plan:
            print(" ".join(cmd[1:]))
            continue
        subprocess.run(cmd, cwd=ROOT, check=False)
    if not args.plan and (out / record.RECORDS).exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(out)], cwd=ROOT, check=True)


if __name__ == "__main__":
    sys.exit(main())

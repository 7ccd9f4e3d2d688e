#!/usr/bin/env python
"""Run a tuning experiment with the version-3 protocol (experiments/tuning.py, docs/protocol.md), round after round,
until every optimizer's selection is interior or at a documented bound; then write the selected settings into the
task config and render the tuning page.

    python scripts/tune.py lm/cpu_tune                     # = make tune-lm (two runs at a time, one thread each)
    python scripts/tune.py lm/cpu_tune --launcher slurm    # every phase as a Slurm array
    python scripts/tune.py lm/cpu_tune --plan              # print what would run next, run nothing

The experiment config (configs/experiment/<task>/<name>.yaml) holds ``tune_spec``: the optimizers, the trials per
round, the tuning seeds, each optimizer's space and the documented bounds. Runs add their records to the
experiment's records file; the plan of each phase is replayed from those records, so a killed tuning resumes by
running the same command. Selection reads only the selection instances (select_<metric>).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import record, tuning  # noqa: E402
from experiments.checkpoint import atomic_write_json  # noqa: E402
from experiments.protocol import launch_overrides  # noqa: E402


def compose(configs: Path, overrides: list[str]):
    """train.yaml under ``overrides``, as experiments.train would compose it (with the hydra node, for the sweeper)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(configs.resolve()), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True)


def eta_text(records: list[dict], runs: int, jobs: int) -> str:
    """'; ~72 min at 2 at a time (3.0 min a run so far)' from the mean wall time of this tuning's finished runs, else ''.
    A progress hint for local runs, not a budget: other jobs on the machine, paused runs and the optimizers' different
    costs per step all move it."""
    done = [r for r in records if r["status"] == "done" and (r.get("summary") or {}).get("wall_seconds")]
    if not done or runs <= 0:
        return ""
    minutes = sum(r["summary"]["wall_seconds"] for r in done) / len(done) / 60
    return f"; ~{runs * minutes / max(jobs, 1):.0f} min at {max(jobs, 1)} at a time ({minutes:.1f} min a run so far)"


def records_of(results: Path) -> list[dict]:
    return record.read(results, missing_ok=True)


def primary_rounds(args, task: str, primary: str, parser) -> int:
    """The number of rounds the task's primary tuning (``<task>/<primary>``) finished with, replayed from its records;
    stops with the command to run while it is unfinished."""
    from omegaconf import OmegaConf

    cfg = compose(args.configs, [f"+experiment={task}/{primary}", *args.overrides])
    spec = OmegaConf.to_container(cfg.tune_spec, resolve=True)
    state = tuning.plan(spec, records_of(Path(cfg.results_dir)), spec["metric"], bool(spec.get("higher_is_better", True)))
    try:
        return tuning.matched_rounds(state)
    except ValueError as err:
        parser.error(f"{args.experiment} runs as many rounds as {task}/{primary} (rounds_of: equal trials for every "
                     f"optimizer of the task), whose tuning is unfinished ({err}): run python scripts/tune.py {task}/{primary} first")


def misapplied(args, cfg, selection: dict, records: list[dict]) -> list[str]:
    """Where a run at the task's tuned settings (no lr= given: what the headline evaluation runs) would differ from
    its selected trial, in the LR or the optimizer config. A task that builds on another's config (task=lm_lora on
    lm.yaml) merges that task's tuned block under its own, so a key the selection does not set can leak in."""
    from omegaconf import OmegaConf

    from experiments.protocol import resolve

    out = []
    for opt, sel in selection.items():
        trial = next(r for r in records if r["optimizer"] == opt and r["status"] == "done"
                     and (r["config"].get("tune") or {}).get("label") == sel["label"])
        run = compose(args.configs, [f"task={cfg.task.name}", f"scale={cfg.scale.name}", f"optimizer={opt}", *args.overrides])
        got = resolve(run, given=set())
        have, want = OmegaConf.to_container(got.optimizer, resolve=True), trial["config"]["optimizer"]
        if not math.isclose(float(got.lr), float(trial["config"]["lr"]), rel_tol=1e-9) or have != want:
            out.append(f"{opt}: a run at the tuned settings gets lr={got.lr} and {have}; its trial {sel['label']} ran lr="
                       f"{trial['config']['lr']} and {want}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="<task>/<name> of a tuning experiment (configs/experiment/<task>/<name>.yaml with tune_spec)")
    parser.add_argument("--configs", type=Path, default=ROOT / "configs", help="the config folder (a copy, for a dry rehearsal)")
    parser.add_argument("--launcher", default="local", help="hydra launcher: local (JOBS at once), slurm, or '' (one after another)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plan", action="store_true", help="print the next phase and exit")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run (e.g. scale=smoke logger=none)")
    args = parser.parse_intermixed_args(argv)
    path = args.configs / "experiment" / f"{args.experiment}.yaml"
    if not path.exists():
        parser.error(f"{path} does not exist: name a tuning experiment as <task>/<name> (ls {args.configs}/experiment/)")
    cfg = compose(args.configs, [f"+experiment={args.experiment}", *args.overrides])
    if not cfg.get("tune_spec"):
        parser.error(f"{path} has no tune_spec: it is not a tuning experiment (see docs/protocol.md, 'Tuning')")
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(cfg.tune_spec, resolve=True)
    results = Path(cfg.results_dir)
    sweep_dir = Path(cfg.hydra.sweep.dir)
    task_yaml = args.configs / "task" / f"{cfg.task.name}.yaml"
    higher = bool(spec.get("higher_is_better", True))
    metric = spec["metric"]
    existing = records_of(results)
    stale = [r["run_id"] for r in existing
             if not (r["config"].get("tune") or {}).get("label")]
    if stale:
        parser.error(f"{results / record.RECORDS} holds {len(stale)} runs of an older tuning protocol (e.g. {stale[0]}): "
                     f"remove them first (git rm {results / record.RECORDS}; git history keeps them)")
    launch = launch_overrides(args.launcher, args.jobs, args.threads)
    if spec.get("rounds_of"):  # a secondary tuning: as many rounds as the task's primary tuning ran (equal trials)
        rounds = primary_rounds(args, cfg.task.name, spec["rounds_of"], parser)
        other = sorted({(r["config"].get("tune_spec") or {}).get("max_rounds") for r in existing} - {rounds})
        if other:
            parser.error(f"{results / record.RECORDS} holds runs that matched {other[0]} rounds of {cfg.task.name}/{spec['rounds_of']}, "
                         f"which has since finished after {rounds}: its tuning changed, so these runs are stale; remove them "
                         f"(git rm {results / record.RECORDS}) and tune again")
        spec["min_rounds"] = spec["max_rounds"] = rounds
        launch += [f"++tune_spec.min_rounds={rounds}", f"++tune_spec.max_rounds={rounds}"]  # in every run's record: the page replays them
        print(f"tuning {args.experiment}: {rounds} round(s), as {cfg.task.name}/{spec['rounds_of']} ran", flush=True)
    if args.configs.resolve() != (ROOT / "configs").resolve():  # the runs find the experiment in the copy too
        launch.append(f"hydra.searchpath=[file://{args.configs.resolve()}]")
    progress = None
    while True:
        records = records_of(results)
        plan = tuning.plan(spec, records, metric, higher)
        if plan["phase"] == "done":
            break
        todo = {opt: pts for opt, pts in plan["points"].items() if pts}
        count = sum(len(p) for p in todo.values()) * len(plan["seeds"])
        print(f"tuning {args.experiment}: round {plan['round']}, {plan['phase']} phase: {count} runs "
              f"({', '.join(f'{o} {len(p)}' for o, p in todo.items())} trials x seeds {plan['seeds']})"
              + (eta_text(records, count, args.jobs) if args.launcher == "local" else ""), flush=True)
        if args.plan:
            print(json.dumps(todo, indent=1))
            return 0
        if progress == (plan["round"], plan["phase"], count):
            raise SystemExit(f"error: the last phase left {count} runs without a record: see the run logs under {sweep_dir} "
                             f"(a run that fails is recorded as failed; one that leaves no record crashed before its end)")
        progress = (plan["round"], plan["phase"], count)
        points = sweep_dir / f"points-r{plan['round']}-{plan['phase']}.json"
        atomic_write_json(points, todo)
        width = max(len(p) for p in todo.values())
        cmd = [sys.executable, "-m", "experiments.train", "-m", f"+experiment={args.experiment}", f"optimizer={','.join(todo)}",
               f"tune.points={points.resolve()}", f"tune.trial={','.join(map(str, range(width)))}",
               f"seed={','.join(map(str, plan['seeds']))}", "hydra.sweep.subdir=${optimizer.name}-${tune_label:}-s${seed}",
               *launch, *args.overrides]
        subprocess.run(cmd, cwd=ROOT, check=False)
    selection = plan["selection"]
    for opt, sel in selection.items():
        print(f"{opt}: {sel['label']} {sel['values']} (select_{metric} {sel['score']:.4g} over seeds {sel['seeds']}, round {sel['round']})")
    if args.plan:  # a look, not a write: the selection goes into the task config only when the tool is run
        print(f"tuning {args.experiment}: done (round {plan['round']}); run it without --plan to write the selection into {task_yaml}")
        return 0
    tuning.write_selection(task_yaml, selection, source=f" from {results}/records.jsonl")
    print(f"wrote the selected settings into {task_yaml} (lr and tuned)")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(results)], cwd=ROOT, check=True)
    wrong = misapplied(args, cfg, selection, records)
    if wrong:  # the evaluation would not run what was selected
        print("error: the written selection does not reproduce its trials:\n  " + "\n  ".join(wrong) + "\nA key from a task "
              f"config that {task_yaml.name} builds on (its defaults list) leaks in: set it explicitly in {task_yaml}, or remove it "
              "from that config's tuned block", file=sys.stderr)
        return 1
    print("checked: a run at the tuned settings reproduces each selected trial's LR and optimizer config")
    return 0


if __name__ == "__main__":
    sys.exit(main())

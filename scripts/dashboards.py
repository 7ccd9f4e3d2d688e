#!/usr/bin/env python
"""W&B reports built from code (wandb-workspaces): one report per task, from the runs the training loop logs.

    python scripts/dashboards.py                     # save the five reports to W&B (needs a login)
    python scripts/dashboards.py --entity my-team    # ... under that entity (default: WANDB_ENTITY, else your own)
    python scripts/dashboards.py --dry-run           # write runs/dashboards/<task>.json instead: no login, no network
    make dashboards [DRY_RUN=1]

Each report has two panel grids:

* the evaluation runs, the runs in the W&B group ``<task>/cpu`` (the sweep folder runs/<task>/cpu of
  configs/experiment/<task>/cpu.yaml): validation loss against ``step`` grouped by the config key
  ``optimizer.name`` (mean line, min-max band over the seeds); the task's rollout metric against ``step`` and
  against ``train_seconds`` (training time without evaluation, rollouts and checkpoints), grouped the same way;
  a scatter of the summary keys ``final_val_loss`` against ``final_<metric>``; a run comparer;
* the tuning trials, the group ``<task>/tune`` (runs/<task>/tune: configs/experiment/<task>/cpu_tune.yaml, and the
  version-2 presets configs/sweep/<task>_tune_*.yaml): parallel
  coordinates over the config keys ``optimizer.name``, ``lr``, ``optimizer.weight_decay`` (and, for the DoPr
  trials, ``optimizer.kwargs.damping``) and the summary keys ``final_<metric>``, ``final_val_loss``; the same
  scatter over the trials.

The runsets filter on the run's group only (a run attribute every run of the suite has, old or new); the group
is ``<task>/<sweep folder>``, set by experiments/train.py. Every key a panel reads is a key the loop logs:
tests/test_dashboards.py checks them against the committed records and a real offline run. Saving creates new
reports each time (W&B keeps the old ones; delete them in the UI).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.logging import _has_netrc_key  # noqa: E402

# The task's rollout metric (experiments/tasks/<task>.py: ``metric``; the records' summary ``metric_name``).
TASKS = {"lm": "accuracy", "lm_lora": "accuracy", "flow": "fd", "control": "return", "robot": "success"}
EVAL_FOLDER = "cpu"     # runs/<task>/cpu: configs/experiment/<task>/cpu.yaml (make reproduce-<task>)
TUNE_FOLDER = "tune"    # runs/<task>/tune: configs/experiment/<task>/cpu_tune.yaml (make tune-<task>)
OUT = ROOT / "runs" / "dashboards"
OPTIMIZER = "optimizer.name"   # the config key the panels group by (the resolved Hydra config)
NO_LOGIN = """dashboards: no W&B login (no WANDB_API_KEY and no api.wandb.ai entry in ~/.netrc), so the reports cannot be saved.
Fix: run `wandb login` (or export WANDB_API_KEY=<your key>), and name the entity that owns the runs with
WANDB_ENTITY=<entity> or --entity <entity> (default: your own). To review the reports without a login or a
network: make dashboards DRY_RUN=1 (writes their specs to runs/dashboards/<task>.json)."""


def group(task: str, folder: str) -> str:
    """The W&B group of the runs in runs/<task>/<folder> (experiments/train.py: ``<task>/<sweep folder>``)."""
    return f"{task}/{folder}"


def runs_filter(task: str, folder: str) -> str:
    return f"Group = '{group(task, folder)}'"


def build_report(task: str, entity: str, project: str, eval_folder: str = EVAL_FOLDER, tune_folder: str = TUNE_FOLDER):
    """The task's report (a ``wandb_workspaces.reports.v2.Report``; nothing is sent until ``save()``)."""
    import wandb_workspaces.reports.v2 as wr

    metric = TASKS[task]
    by_optimizer = dict(groupby=wr.Config(OPTIMIZER), groupby_aggfunc="mean", groupby_rangefunc="minmax")
    final = dict(x=wr.SummaryMetric("final_val_loss"), y=wr.SummaryMetric(f"final_{metric}"))

    def runset(folder: str, what: str):
        return wr.Runset(entity=entity, project=project, name=f"{group(task, folder)} ({what})", filters=runs_filter(task, folder))

    def column(key):
        return wr.ParallelCoordinatesPlotColumn(metric=key)

    trial_columns = [column(wr.Config(OPTIMIZER)), column(wr.Config("lr")), column(wr.Config("optimizer.weight_decay"))]
    outcome_columns = [column(wr.SummaryMetric(f"final_{metric}")), column(wr.SummaryMetric("final_val_loss"))]
    evaluation = wr.PanelGrid(runsets=[runset(eval_folder, "evaluation runs")], panels=[
        wr.LinePlot(title="validation loss by optimizer (mean, min-max over seeds)", x="step", y=["val_loss"],
                    **by_optimizer, layout=wr.Layout(x=0, y=0, w=12, h=8)),
        wr.LinePlot(title=f"{metric} by optimizer, against step", x="step", y=[metric],
                    **by_optimizer, layout=wr.Layout(x=12, y=0, w=12, h=8)),
        wr.LinePlot(title=f"{metric} by optimizer, against training seconds (no evaluation, rollouts, checkpoints)",
                    x="train_seconds", y=[metric], **by_optimizer, layout=wr.Layout(x=0, y=8, w=12, h=8)),
        wr.ScatterPlot(title=f"final validation loss against final {metric}", **final, layout=wr.Layout(x=12, y=8, w=12, h=8)),
        wr.RunComparer(diff_only="split", layout=wr.Layout(x=0, y=16, w=24, h=10)),
    ])
    tuning = wr.PanelGrid(runsets=[runset(tune_folder, "tuning trials")], panels=[
        wr.ParallelCoordinatesPlot(title="every tuning trial", columns=trial_columns + outcome_columns,
                                   layout=wr.Layout(x=0, y=0, w=24, h=8)),
        wr.ParallelCoordinatesPlot(title="trials with an AP damping (DoPr)",
                                   columns=trial_columns + [column(wr.Config("optimizer.kwargs.damping"))] + outcome_columns,
                                   layout=wr.Layout(x=0, y=8, w=24, h=8)),
        wr.ScatterPlot(title=f"final validation loss against final {metric}, tuning trials", **final,
                       layout=wr.Layout(x=0, y=16, w=12, h=8)),
    ])
    return wr.Report(
        entity=entity, project=project, title=f"DoPr {task}: validation loss, {metric}, tuning", width="fluid",
        description=f"Built by scripts/dashboards.py (make dashboards). Runs: W&B group {group(task, eval_folder)} "
                    f"(evaluation) and {group(task, tune_folder)} (tuning); grouped by config {OPTIMIZER}.",
        blocks=[
            wr.H2(f"Evaluation runs: group {group(task, eval_folder)}"),
            wr.P(f"Every run in runs/{task}/{eval_folder} (make reproduce-{task.replace('_', '-')}). Lines: mean over "
                 f"the seeds of each optimizer, band: min to max. Metric: {metric}, at every rollout evaluation."),
            evaluation,
            wr.H2(f"Tuning trials: group {group(task, tune_folder)}"),
            wr.P(f"Every trial in runs/{task}/{tune_folder} (make tune-{task.replace('_', '-')}): the setting and its "
                 f"final {metric} and validation loss. Base optimizers have no damping: they are in the first panel."),
            tuning,
        ])


@contextmanager
def offline():
    """Serialise without the network: a runset with an entity and project asks the API for the project's internal
    id (``Runset._to_model``); here nothing is asked and the id is left out (the server fills it when saving)."""
    from wandb_workspaces.reports.v2 import gql, interface

    def lookup(api, query, variables=None):
        if query is not gql.projectInternalId:
            raise RuntimeError("dashboards: a dry run asked the W&B API for more than a project id")
        return {"project": {"internalId": None}}

    def no_api():
        return None

    with mock.patch.object(interface, "execute_graphql", lookup), mock.patch.object(interface, "_get_api", no_api):
        yield


def spec(report) -> dict:
    """The report's model dump (what ``save()`` sends, less the server's ids), built offline."""
    with offline():
        return report._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def logged_in() -> bool:
    """An API key W&B would use: WANDB_API_KEY or a ``wandb login`` entry in ~/.netrc (experiments/logging.py)."""
    return bool(os.environ.get("WANDB_API_KEY")) or _has_netrc_key()


def default_project() -> str:
    from omegaconf import OmegaConf

    return OmegaConf.load(ROOT / "configs" / "logger" / "wandb.yaml").project


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"), help="W&B entity (default: WANDB_ENTITY, else your own)")
    parser.add_argument("--project", default=os.environ.get("WANDB_PROJECT") or default_project(),
                        help="W&B project (default: WANDB_PROJECT, else configs/logger/wandb.yaml: dopr)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, from " + ", ".join(TASKS))
    parser.add_argument("--eval-folder", default=EVAL_FOLDER, help="sweep folder of the evaluation runs (group <task>/<folder>)")
    parser.add_argument("--tune-folder", default=TUNE_FOLDER, help="sweep folder of the tuning trials (group <task>/<folder>)")
    parser.add_argument("--dry-run", action="store_true", help="write the specs to --out instead of saving (no login, no network)")
    parser.add_argument("--out", type=Path, default=OUT, help="where --dry-run writes <task>.json (default: runs/dashboards)")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if args.dry_run:
        entity = args.entity or "<entity>"
        args.out.mkdir(parents=True, exist_ok=True)
        for task in tasks:
            path = args.out / f"{task}.json"
            path.write_text(json.dumps(spec(build_report(task, entity, args.project, args.eval_folder, args.tune_folder)), indent=1) + "\n")
            print(f"wrote {path} (entity {entity}, project {args.project}, groups {group(task, args.eval_folder)}, {group(task, args.tune_folder)})")
        return 0
    if not logged_in():
        print(NO_LOGIN, file=sys.stderr)
        return 2
    import wandb

    entity = args.entity or wandb.Api().default_entity
    for task in tasks:
        report = build_report(task, entity, args.project, args.eval_folder, args.tune_folder).save()
        print(f"{task}: {report.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

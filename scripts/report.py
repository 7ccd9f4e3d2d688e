#!/usr/bin/env python
"""An experiment's pages, rebuilt from its records: a markdown table (mean and 95% CI over seeds), a per-run CSV,
a meta file and figures.

    python scripts/report.py results/lm/cpu              # the headline evaluation: results.md, results_runs.csv, ...
    python scripts/report.py results/lm/cpu_tune         # the tuning experiment: tuning.md etc., written into results/lm/cpu/
    python scripts/report.py --all                       # every experiment under results/ (make report)
    python scripts/report.py runs/lm/cpu --out /tmp/lm   # run folders (any age) without adding them to records

The report kind follows the experiment's name: ``<name>_tune`` is a tuning page (written beside the headline
evaluation, ``<name>/``), and so is ``<name>_tune_<y>`` (the comparators' tuning, cpu_tune_comparators): one
tuning.md in ``<name>/`` renders every such tuning with its trial counts; ``<name>_lr`` an LR sweep,
``<name>_damping`` a damping sweep, anything else an evaluation (``--kind`` overrides). Reads only records
(experiments/record.py); no number is typed in. Failed runs are listed with their reason, never dropped. The same
records give the same bytes (make report leaves git clean).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import record  # noqa: E402
from experiments.checkpoint import atomic_write_text  # noqa: E402
from experiments.reports import budget, figures, load, sweeps, tables, tuning  # noqa: E402

KINDS = {"_tune": "tuning", "_lr": "lr_sweep", "_damping": "damping"}
WHAT = {"damping": "damping sweep", "lr_sweep": "learning-rate sweep", "results": "results", "tuning": "tuning sweep"}
BY = {"damping": ("optimizer", "lr", "damping"), "lr_sweep": ("optimizer", "lr"), "results": ("optimizer",),
      "tuning": ("optimizer", "lr", "damping", "weight_decay")}



def command_text(made_by: list[str]) -> str | None:
    """The meta's one-line command: the runs' commands where there are one or two; for a sweep whose runs each recorded
    their own (``optimizer=adamw seed=0 ...``), the words every run shares and the keys that vary, so that the cross-task
    summary quotes a line, not forty."""
    if len(made_by) <= 2:
        return " and ".join(made_by) or None
    words = [c.split() for c in made_by]
    common = [w for w in words[0] if all(w in ws for ws in words[1:])]
    varying = sorted({w.split("=", 1)[0] for ws in words for w in ws if w not in common})
    return " ".join(common) + (f" ({', '.join(varying)} per run; each run's command is in its record)" if varying else "")

def kind_and_pages(source: Path) -> tuple[str, Path]:
    """(report kind, folder its pages go to) of an experiment folder, from its name."""
    for suffix, kind in KINDS.items():
        if source.name.endswith(suffix):
            return kind, source.with_name(source.name.removesuffix(suffix))
    if "_tune_" in source.name:  # cpu_tune_comparators: the comparators' tuning, on cpu's page too (docs/comparators.md)
        return "tuning", tuning.evaluated_by(source)
    return "results", source


def log_to_wandb(rows: list[dict], metric: str, task: str, group: str, where: Path, project: str, lab: dict) -> str:
    """One W&B run per report (job_type "report", in the sweep's group): a Table of every run and a scatter plot of
    final validation loss against the final rollout metric. Offline unless WANDB_MODE or an API key says otherwise."""
    import wandb

    from experiments.logging import wandb_mode

    fields = list(dict.fromkeys(k for row in rows for k in row))
    where.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, group=f"{task}/{group}", job_type="report", name=f"report-{task}-{group}", dir=str(where),
                     mode=wandb_mode(), tags=["report"], settings=wandb.Settings(silent=True))
    table = wandb.Table(columns=fields, data=[[row.get(f) for f in fields] for row in rows])
    run.log({"runs": table, f"val_loss_vs_{metric}": wandb.plot.scatter(
        table, "final_val_loss", f"final_{metric}", title=f"{task} {group}: {lab['val_loss_label']} vs {lab['metric_label']}")})
    out = run.dir
    run.finish()
    return out


def best_text(done: list[dict], metric: str) -> str:
    """What `best <metric>` is: the reported metric at the checkpoint the selection instances chose (train.py), where
    every run chose on them, else (older runs) the best rollout evaluation."""
    if all((r["summary"].get("best") or {}).get("chosen_on") == "selection set" for r in done):
        return (f"{metric} at the best checkpoint, the rollout evaluation chosen on the selection instances (`select_{metric}`, "
                f"disjoint from the reported ones), so it can be worse than `final {metric}`")
    return "the best rollout evaluation during training (best checkpoint)"


def rollout_episodes(done: list[dict]):
    """The reported episodes (problems) per evaluation, task.eval_episodes: one number where every run agrees, else
    the sorted list of the values (runs of different task versions in one folder); None for a task without it."""
    values = sorted({(r["config"].get("task") or {}).get("eval_episodes") for r in done}, key=lambda v: (v is None, v or 0))
    return values[0] if len(values) == 1 else values


def shown_name(source: Path) -> str:
    """An experiment folder as results/<task>/<experiment> wherever the copy lies (pages do not depend on it)."""
    return "/".join(("results", *source.parts[-2:])) if (source / record.RECORDS).exists() else str(source)


def render(source: Path, out: Path, kind: str, shown: str, configs: Path | None = None) -> tuple[list[dict], dict]:
    """Write one experiment's pages into ``out``; returns (run rows, meta). A tuning page renders every tuning
    whose page goes there (reports.tuning.joined: cpu_tune and cpu_tune_comparators into cpu/tuning.md)."""
    group = tuning.joined(source) if kind == "tuning" else [source]
    loaded = {s: load.load_runs(s) for s in group}
    done, failed = [r for s in group for r in loaded[s][0]], [r for s in group for r in loaded[s][1]]
    if not done:
        raise SystemExit(f"error: no finished run in {source}" + (f" ({len(failed)} failed or unfinished)" if failed else "")
                         + ": run the experiment first (see docs/experiments.md)")
    # runs of an earlier task version beside runs of the current one (an evaluation being rerun after a version bump,
    # under the same run ids): only the current version's are reported and paired; the rest are counted in the header
    now = load.current_version(configs, done[0]["summary"]["task"])
    version = load.task_version
    older = [r for r in done if version(r) != now] if now is not None and any(version(r) == now for r in done) else []
    done = [r for r in done if r not in older]
    rows = load.per_run_rows(done)
    first = done[0]["summary"]
    metric, higher, lab = first["metric_name"], first.get("higher_is_better", True), load.labels(first)
    to_target = budget.run_columns(done, metric, higher)  # the budget axis: steps and seconds to the targets
    light_cost = budget.light_cost(done)  # what the light rollouts cost, measured (docs/protocol.md, "The budget axis")
    for row in rows:
        row.update(to_target.get(row["run"], {}))
    task, scale = first["task"], first["scale"]
    commits = sorted({r["provenance"]["git_commit"] + ("-dirty" if r["provenance"]["dirty"] else "") for r in done})
    made_by = sorted({r.get("command") for r in done if r.get("command")})
    versions = sorted({row["task_version"] for row in rows if row.get("task_version") is not None})
    rate = load.is_rate(first)
    horizons = load.horizon_series(done)
    # what the task says about its setting (control: env, expert returns, evaluation noise), where every run agrees
    task_meta = [r["summary"].get("task_meta") or {} for r in done]
    setting = {k: v for k, v in task_meta[0].items() if all(m.get(k) == v for m in task_meta)}
    by = BY[kind] + (("steps",) if len({r["steps"] for r in rows}) > 1 else ())  # a budget sweep: one line per budget
    by += tuple(k for k in ("beta2", "momentum") if kind == "tuning" and any(k in r for r in rows))  # the version-3 spaces' own axes
    if kind == "tuning" and any("trial" in r for r in rows):  # version-3 trials: one line each, by round (r1t00, r1t01, ..., r2t00)
        by = ("optimizer", "trial") + by[1:]

    def table_of(runs: list[dict], run_rows: list[dict]) -> str:
        if "trial" in by:
            run_rows = sorted(run_rows, key=lambda r: (r["optimizer"], r.get("trial") or ""))
        return tables.summary_table(run_rows, metric, by, rate, load.episode_outcomes(runs) if rate else None,
                                    load.horizon_series(runs), load.interval_columns(runs))

    table = table_of(done, rows)
    made = (f"`python scripts/report.py {shown}` from its records" if len(group) == 1 else " or ".join(
        f"`python scripts/report.py {shown_name(s)}`" for s in group) + " (one page for every tuning of this experiment) from their records")
    header = [f"# {task}: {WHAT[kind]} (scale={scale})", "",
              f"Generated by {made}; runs trained at commit(s) {', '.join(commits)}.",
              *([f"The runs were made by {' and '.join(f'`{c}`' for c in made_by)}."] if 0 < len(made_by) <= 2
                else ["Each run's own command is in its record (`command`)."] if made_by else []), "",
              *([(f"**Superseded**: these runs are of task version {'/'.join(map(str, versions))}; `configs/task/{task}.yaml` is "
                  f"now at version {now}, so they are not current results (rerun the experiment to replace them)."
                  if source.name.startswith("cpu") else  # a headline, its tuning or arm; else a probe, kept as it ran
                  f"These runs are of task version {'/'.join(map(str, versions))} (`configs/task/{task}.yaml` is now at version "
                  f"{now}): a record of what was measured then, not of the current task."), ""]
                if now is not None and versions and now not in versions else []),
              *([f"Left out: {len(older)} runs of task version {'/'.join(map(str, sorted({version(r) for r in older})))}, "
                 f"beside the current version {now}'s (they are replaced as the experiment reruns).", ""] if older else [])]
    arms = {(r["optimizer"], (r["config"].get("equal_time") or {}).get("of"), (r["config"].get("equal_time") or {}).get("ratio"),
             (r["config"].get("equal_time") or {}).get("machine")) for r in done if r["config"].get("equal_time")}
    for opt, of, ratio, machine in sorted(arms, key=str):  # the equal-time arm (scripts/equal_time.py) says what it equalised
        header += [f"Equal-time arm: {opt} ran {ratio:g}x the steps of the headline evaluation, the training time {of} took there "
                   f"(the median ratio over seeds of their recorded training seconds, measured on {machine}).", ""]
    parts = header + [
        "Mean ± half-width of the 95% Student-t confidence interval over seeds" + (
            f"; {metric} is a rate: its mean and [low, high] of a 95% bootstrap interval that redraws seeds and then "
            "each seed's episodes (seeds only where per-episode outcomes were not logged), inside [0, 1]" if rate else "") + ". `final` is the last step's "
        f"weights; `best {metric}` is " + best_text(done, metric) + "; `best val loss` the lowest validation loss seen.", "",
        *([f"Task setting (the same in every run): {', '.join(f'{k} = {v:.6g}' if isinstance(v, float) else f'{k} = {v}' for k, v in sorted(setting.items()))}.", ""]
          if setting else []), table, ""]
    out.mkdir(parents=True, exist_ok=True)
    title = f"{task} (scale={scale})"
    if kind == "lr_sweep":
        parts += sweeps.lr_section(rows, metric, higher)
    elif kind == "damping":
        parts += sweeps.damping_section(rows, metric, higher, out, title, lab)
    elif kind == "tuning" and len(group) == 1:
        parts = header + tuning_parts(source, done, rows, table, metric, higher, out, title, lab, horizons)
    elif kind == "tuning":  # every tuning of the experiment, each in its section, their trial counts first
        parts = header + tuning.trial_counts([(s.name, loaded[s][0] + loaded[s][1]) for s in group])
        for s in group:
            own = [row for row in rows if row["run"] in {r["run_id"] for r in loaded[s][0]}]
            lines = (tuning_parts(s, loaded[s][0], own, table_of(loaded[s][0], own), metric, higher, out, title, lab,
                                  load.horizon_series(loaded[s][0])) if loaded[s][0] else ["No finished run yet.", ""])
            parts += [f"## {s.name}", ""] + ["#" + line if line.startswith("## ") else line for line in lines]
    else:
        parts += results_sections(source, done, rows, metric, out, title, lab, rate, horizons, light_cost)
    if failed:
        parts += ["## Failed or unfinished runs", "", "| run | status | reason |", "|---|---|---|"]
        parts += [f"| {f['run_id']} | {f['status']} | {f.get('error', '')} |" for f in failed]
        parts.append("")
    stem = kind
    atomic_write_text(out / f"{stem}.md", "\n".join(parts))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / f"{stem}_runs.csv", buf.getvalue())
    # What the cross-task summary (scripts/summary.py) needs to read the CSV without the records.
    meta = {"task": task, "scale": scale, "experiment": group[0].name, "metric": metric, "higher_is_better": higher, **lab,
            "lr_sweep": kind == "lr_sweep", "damping_sweep": kind == "damping", "runs": len(done),
            "failed": [{"run": f["run_id"], "status": f["status"], "error": f.get("error", "")} for f in failed],
            "training_commits": commits, "command": command_text(made_by), "metric_range": [0, 1] if rate else None,
            "rollout_episodes": rollout_episodes(done),
            "horizons": {name: [n for n, _ in pts] for name, pts in horizons.items()},
            "targets": budget.targets(done, metric, higher)}
    if light_cost:
        meta["light_rollout_cost"] = light_cost
    meta.update(setting)
    if len(group) > 1:
        meta["experiments"] = [s.name for s in group]
    atomic_write_text(out / f"{stem}_meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out / (stem + '.md')} ({len(done)} runs, {len(failed)} failed or unfinished)", flush=True)
    return rows, meta


def tuning_parts(source: Path, done: list[dict], rows: list[dict], table: str, metric: str, higher: bool, out: Path,
                 title: str, lab: dict, horizons: dict) -> list[str]:
    """One tuning's part of the tuning page: its selection (version 3, experiments/tuning.py, or the version-2 grids)
    and its table of every run."""
    first = done[0]["summary"]
    if (done[0]["config"].get("tune") or {}).get("label"):  # a version-3 tuning
        return tuning.protocol3_section(done, source, metric) + ["## Every run", "", table, ""]
    task, scale = first["task"], first["scale"]
    lines, _ = tuning.tuning_section(rows, metric, higher, out, title, lab, task, scale, horizons)
    return [f"This tuning followed the version-2 protocol (grids: `configs/sweep/{task}_tune_*.yaml`); `make tune-"
            f"{task.replace('_', '-')}` now runs version 3 (docs/protocol.md).", ""] + lines + [
        "## Every trial", "", "Mean ± 95% t-interval over the tuning seeds of each trial.", "", table, ""]


def results_sections(source: Path, done: list[dict], rows: list[dict], metric: str, out: Path, title: str, lab: dict,
                     rate: bool, horizons: dict, light_cost: dict) -> list[str]:
    """The evaluation page below its table: loss against metric, diagnostics, other numbers, horizons, training
    curves and samples."""
    fig_name = "val_loss_vs_" + metric + ".png"
    figures.figure(rows, metric, out / fig_name, f"{title}: one point per run", lab)
    parts = [f"![validation loss against {metric}]({fig_name})", ""]
    for diag in done[0]["summary"].get("diagnostics") or []:
        name = f"{diag}_vs_{metric}.png"
        figures.figure(rows, metric, out / name, f"{title}: one point per run", lab, x_key=f"final_{diag}", x_label=diag.replace("_", " "))
        parts += [f"![{diag} against {metric}]({name})", ""]
    others = tables.other_metrics_table(rows, metric)
    if others:
        parts += ["## Other rollout numbers (final weights)", "", others, ""]
    if figures.horizon_figure(rows, horizons, out / f"{metric}_vs_horizon.png", title, lab, rate):
        parts += [f"## {metric} against the rollout horizon", "", f"![{metric} against horizon]({metric}_vs_horizon.png)", ""]
    if figures.training_figure(done, metric, out / "training_curves.png", title, lab, rate):
        light = sorted({e["step"] for r in done for e in r["evals"] if e.get("light")})
        parts += ["## Over training", "", f"Validation loss and {lab['metric_label']} at every evaluation during training "
                  "(from each run's evaluation rows); the tables give the means over seeds."
                  + (f" Light rollouts (`trainer.light_rollout_every`: {metric} on fewer of the reported instances, docs/protocol.md, "
                     f"\"The budget axis\") at step(s) {', '.join(map(str, light))}." if light else "")
                  + (" Measured, they added {median:.1%} to a run's wall time (median over {runs} runs; at most {max:.1%}): their "
                     "rollout seconds over the run's wall time without them.".format(**light_cost) if light_cost else ""),
                  "", "![over training](training_curves.png)", ""]
        for key in ("val_loss", metric):
            parts += [tables.curve_table(load.curves(done, key), key), ""]
        steady = budget.last_change(done, metric, bool(done[0]["summary"].get("higher_is_better", True)))
        if any(s["steps"] for s in steady.values()):
            parts += ["The final weights' steadiness: the seed SD of the final " + metric + ", and per run the change from "
                      "its previous rollout (light or full; a light one scores fewer instances) to the final. A large fall "
                      "says the final weights are a poor headline for the task (docs/tasks/lm.md, \"Version 4\").", "",
                      tables.last_change_table(steady, metric), ""]
    experiment_dir = source if (source / record.RECORDS).exists() else None
    if experiment_dir is not None and figures.samples_figure(experiment_dir, done, out / "samples.png", f"{title}: final-weight samples"):
        parts += ["## Samples", "", "Class-conditional samples of each optimizer's lowest-seed run (rows: classes), "
                  "written by the task at the end of training (samples.npy, kept beside the records).", "", "![samples](samples.png)", ""]
    return parts


def experiments(results: Path) -> list[Path]:
    """Every experiment folder (one holding records.jsonl) under results/, tuning experiments last (their pages go
    into the headline folder, whose own report must not delete them)."""
    found = sorted(p.parent for p in results.glob(f"*/*/{record.RECORDS}"))
    return sorted(found, key=lambda p: (kind_and_pages(p)[0] != "results", str(p)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path, help="an experiment folder (results/<task>/<experiment>) or a sweep folder of run folders")
    parser.add_argument("--out", type=Path, default=None, help="where the pages go (default: from the experiment's name)")
    parser.add_argument("--kind", choices=sorted(WHAT), default=None, help="the report kind (default: from the experiment's name)")
    parser.add_argument("--all", nargs="?", const=ROOT / "results", type=Path, default=None, metavar="RESULTS",
                        help="rebuild every experiment's pages under RESULTS (default results/)")
    parser.add_argument("--configs", type=Path, default=None,
                        help="the task configs whose `version` marks older runs as superseded (default: configs/task/ of the "
                             "checkout an experiment folder results/<task>/<experiment> sits in)")
    parser.add_argument("--wandb", action="store_true", help="also log a W&B run with a Table of the runs and a val-loss-vs-metric scatter")
    parser.add_argument("--wandb-project", default="dopr")
    args = parser.parse_args(argv)
    if (args.source is None) == (args.all is None):
        parser.error("pass one experiment folder (e.g. results/lm/cpu) or --all")
    sources = experiments(args.all) if args.all is not None else [args.source]
    rendered = set()  # the tuning experiments already on a page (one page renders every tuning of an experiment)
    if args.all is not None and not sources:
        parser.error(f"no {record.RECORDS} under {args.all}/<task>/<experiment>/")
    for source in sources:
        if not source.is_dir():
            parser.error(f"{source} is not a folder: pass results/<task>/<experiment> (or a sweep folder such as runs/lm/cpu)")
        kind, pages = kind_and_pages(source)
        kind = args.kind or kind
        out = args.out or pages
        if kind == "tuning" and source in rendered:
            continue
        rendered.update(tuning.joined(source) if kind == "tuning" else [])
        shown = shown_name(source)
        try:
            parents = source.resolve().parents
            configs = args.configs or (parents[2] / "configs" / "task" if (source / record.RECORDS).exists() and len(parents) > 2
                                       and parents[1].name == "results" else None)
            rows, meta = render(source, out, kind, shown, configs if configs is not None and configs.is_dir() else None)
        except record.RecordError as err:
            parser.error(str(err))
        if args.wandb:
            lab = {k: meta[k] for k in ("val_loss_label", "metric_label")}
            # beside the run folders, or for an experiment's records in runs/<task>/<experiment>/: W&B's files stay out of results/
            where = ROOT / "runs" / meta["task"] / source.name if (source / record.RECORDS).exists() else source
            logged = log_to_wandb(rows, meta["metric"], meta["task"], source.name, where, args.wandb_project, lab)
            print(f"logged the runs table and scatter plot to W&B ({logged}; offline runs: wandb sync {where}/wandb/offline-run-*)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

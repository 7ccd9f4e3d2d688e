"""The run record: everything a report needs from one run, with a schema, and the experiment's records file.

A run folder (``runs/<task>/<experiment>/<run id>/``) holds what the loop writes while it trains: config.json,
metrics.jsonl (one row per event), summary.json, checkpoints. At the end the loop turns those files into ONE
record (``record.json`` in the run folder, see :func:`from_run_dir`) and, when the run belongs to a named
experiment (``experiment=<name>``), adds it to that experiment's records file,
``results/<task>/<experiment>/records.jsonl``: plain JSON Lines, one run per line, sorted by run id, so that
runs committed from two worktrees merge line by line, and ``pandas.read_json(path, lines=True)`` or DuckDB's
``read_json_auto`` read it. Every page under results/ is rebuilt from these files (``make report``).

A record (schema version ``SCHEMA``)::

    schema       the version of this layout (readers refuse versions they do not know)
    run_id       the run's folder name inside its experiment (adamw-s0, adamw-lr0.003-wd0.1-s100, ...): the key
    task, experiment, optimizer, seed, lr, status ("done", "failed" or "unfinished"), error (when failed),
    command      the run's own command line (its Hydra overrides), or for upgraded folders the sweep's command
    provenance   git_commit, dirty, torch, python, threads, cpu, cpu_count, gpu (or null), world_size
    config       the resolved Hydra config the run trained with
    evals        one row per evaluation, in step order: step, train_seconds (training so far, without
                 evaluation, rollouts and checkpoints; null for runs older than the field), train_cpu_seconds
                 (the process's CPU time over the same steps; absent in older runs), val_loss,
                 rollout_seconds, metrics {name: value} on the reported instances, select {name: value} on
                 the selection instances, intervals {name: [low, high]} (a metric's per-run interval),
                 horizons {series: {horizon: metric name}} (where the headline metric by rollout horizon is), raw {val_loss,
                 metrics, select} (the raw weights where an EMA is evaluated), ap {cond_max, cond_median}, and
                 light: true on a light rollout (trainer.light_rollout_every: the headline metric on fewer
                 instances, for the budget axis; no selection score, never the best checkpoint)
    outcomes     {step: {metric: [one value per episode / problem]}} at the evaluations that kept them
    train        the training-loss rows (step, train_loss, lr, steps_per_s, grad_norm, AP fallback counts)
    summary      the run's summary.json, every field (final and best rows, ap_rows, task_meta, wall_seconds, ...)
    artifacts    names of the small files beside the records that pages are drawn from (flow: samples.npy)

The metric names a task reports (``select_<m>``, ``raw_<m>``, ``<m>_ci_low``, ``<m>_h<T>``, ``<m>_steps<k>``) are
decoded into these fields here, once (:func:`split_row`): no report parses a metric name.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from .checkpoint import atomic_write_bytes, atomic_write_json, file_lock

SCHEMA = 1
RECORDS = "records.jsonl"
ARTIFACTS = ("samples.npy",)  # small files a task writes at the end that pages are drawn from (kept beside the records)
_LOG_KEYS = ("train_loss", "lr", "steps_per_s", "grad_norm")


class RecordError(ValueError):
    """A records file or run folder that cannot be read; the message names the file and the fix."""


def _number(value):
    """JSON has no inf/nan: the logger writes them as strings; read them back as floats."""
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    return value


def split_row(row: dict, metric: str) -> dict:
    """One logged evaluation row (flat names, as the loop and the tasks write them) as the record's structured
    eval row. ``metric`` is the task's headline metric (its per-horizon values are decoded from its name)."""
    out = {"step": row["step"], "train_seconds": row.get("train_seconds"), "val_loss": _number(row.get("val_loss")),
           "rollout_seconds": row.get("rollout_seconds"), "metrics": {}, "select": {}, "intervals": {}, "horizons": {}}
    if row.get("train_cpu_seconds") is not None:  # runs since the field: the process's CPU time over the same steps
        out["train_cpu_seconds"] = row["train_cpu_seconds"]
    if row.get("light"):  # a light rollout (trainer.light_rollout_every): the headline metric on fewer instances
        out["light"] = True
    raw = {k[4:]: _number(v) for k, v in row.items() if k.startswith("raw_")}
    flat = {k: _number(v) for k, v in row.items() if not k.startswith("raw_")
            and k not in ("step", "train_seconds", "train_cpu_seconds", "val_loss", "rollout_seconds", "light")}
    horizon = re.compile(rf"^{re.escape(metric)}_(?P<series>[A-Za-z_]*?)_?(?P<n>\d+)$")
    for key, value in flat.items():
        if key.startswith("select_"):
            out["select"][key[7:]] = value
        elif key.endswith("_ci_low") or key.endswith("_ci_high"):
            name, side = key.rsplit("_ci_", 1)
            out["intervals"].setdefault(name, [None, None])[side == "high"] = value
        else:
            out["metrics"][key] = value
            m = horizon.match(key)
            if m:
                out["horizons"].setdefault(m["series"] or "steps", {})[m["n"]] = key
    if raw:
        out["raw"] = {"val_loss": raw.pop("val_loss", None), "select": {k[7:]: v for k, v in raw.items() if k.startswith("select_")},
                      "metrics": {k: v for k, v in raw.items() if not k.startswith("select_")}}
    return out


def _read_jsonl_rows(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill: the loop logs it again on resume
    return rows


def from_run_dir(run_dir: Path, run_id: str | None = None) -> dict:
    """The record of one run folder, from the files the loop writes (config.json, metrics.jsonl, summary.json).
    It reads folders of every age: summaries written before a field existed give null for it (this is the one
    upgrade path from the older per-run folders; ``upgrade`` is its name for that use)."""
    run_dir = Path(run_dir)
    config_path, summary_path = run_dir / "config.json", run_dir / "summary.json"
    if not config_path.exists() and not summary_path.exists():
        raise RecordError(f"{run_dir} is not a run folder (no config.json, no summary.json): pass the folder of one run")
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"status": "unfinished",
                                                                                    "error": "no summary.json: killed or still running (rerun the same command to resume)"}
    machine = config.pop("machine", {}) or {}
    commit = config.pop("git_commit", summary.get("git_commit", "unknown")) or "unknown"
    world = config.pop("world_size", summary.get("world_size", 1))
    command = config.pop("command", None)
    metric = summary.get("metric_name") or (config.get("task") or {}).get("metric") or ""
    evals, outcomes, train, ap, coverage = [], {}, [], {}, None
    for row in _read_jsonl_rows(run_dir / "metrics.jsonl"):
        if "outcomes" in row:
            outcomes[str(row["step"])] = row["outcomes"]
        elif "val_loss" in row:
            evals.append(split_row(row, metric))
        elif "train_loss" in row:
            train.append({k: _number(v) for k, v in row.items() if k in _LOG_KEYS or k == "step" or k.startswith("ap_fallback_")})
        elif "ap_coverage" in row:
            coverage = row["ap_coverage"]
        elif "ap_cond_max" in row:
            ap[row["step"]] = {"cond_max": _number(row["ap_cond_max"]), "cond_median": _number(row.get("ap_cond_median"))}
    evals = list({e["step"]: e for e in evals}.values())  # a step logged twice (a resumed run): the last one
    if not evals and isinstance(summary.get("final"), dict):  # a folder that kept only its summary: its final row
        evals = [split_row(summary["final"], metric)]
    for e in evals:
        if e["step"] in ap:
            e["ap"] = ap[e["step"]]
    optimizer = summary.get("optimizer") or (config.get("optimizer") or {}).get("name")
    record = {
        "schema": SCHEMA, "run_id": run_id or run_dir.name,
        "task": summary.get("task") or (config.get("task") or {}).get("name"),
        "experiment": Path(config["results_dir"]).name if config.get("results_dir") else summary.get("scale") or (config.get("scale") or {}).get("name"),
        "command": command,
        "optimizer": optimizer, "seed": summary.get("seed", config.get("seed")), "lr": summary.get("lr", config.get("lr")),
        "status": summary.get("status", "unfinished"),
        "provenance": {"git_commit": commit.removesuffix("-dirty"), "dirty": commit.endswith("-dirty"), "world_size": world,
                       "torch": machine.get("torch"), "python": machine.get("python"), "threads": machine.get("threads"),
                       "cpu": machine.get("cpu"), "cpu_count": machine.get("cpu_count"), "gpu": machine.get("gpu")},
        "config": config, "evals": evals, "outcomes": outcomes, "train": train, "summary": summary,
        "artifacts": sorted(a for a in ARTIFACTS if (run_dir / a).exists()),
    }
    if summary.get("error"):
        record["error"] = summary["error"]
    if coverage is not None:
        record["ap_coverage"] = coverage
    return record


upgrade = from_run_dir  # the older per-run folders (results/<task>/cpu/seed_runs/<run>/ before schema 1) read the same way


def _clean(obj):
    """inf/nan as strings (JSON has neither), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def dumps(record: dict) -> str:
    """One record as one line (keys sorted: the same record gives the same bytes)."""
    return json.dumps(_clean(record), sort_keys=True, separators=(",", ":"))


def read(path: Path, missing_ok: bool = False) -> list[dict]:
    """The records of one experiment (``results/<task>/<experiment>/records.jsonl``, or the folder holding it).

    ``missing_ok``: an experiment with no records file yet reads as no records instead of an error."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / RECORDS
    if not path.exists():
        if missing_ok:
            return []
        raise RecordError(f"{path} does not exist: run the experiment first (its runs add themselves there), or rebuild it "
                          f"from run folders with `python -m experiments.record add runs/<task>/<experiment> {path.parent}`")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}, line {n}: not a whole JSON record ({err.msg}); the file was cut or edited by hand: "
                              f"restore it with `git checkout -- {path}` or re-add the runs with `python -m experiments.record add`") from None
        version = rec.get("schema") if isinstance(rec, dict) else None
        if version != SCHEMA:
            raise RecordError(f"{path}, line {n}: record schema {version!r}, this code reads schema {SCHEMA}: "
                              + ("update this checkout (git pull): a newer suite wrote it" if isinstance(version, int) and version > SCHEMA
                                 else "rebuild the file from its run folders with `python -m experiments.record add`"))
        records.append(rec)
    return records


def add(experiment_dir: Path, records: list[dict], run_dirs: dict[str, Path] | None = None) -> Path:
    """Add (or replace, by run id) records in ``experiment_dir/records.jsonl``, atomically and under a lock, so
    that two sweeps adding runs at once lose nothing. ``run_dirs`` {run_id: folder}: copy the records' artifacts
    (ARTIFACTS) beside them, into ``experiment_dir/artifacts/<run_id>/``. Returns the records file."""
    experiment_dir = Path(experiment_dir)
    path = experiment_dir / RECORDS
    with file_lock(experiment_dir / ".records.lock"):
        kept = {r["run_id"]: r for r in (read(path) if path.exists() else [])}
        for rec in records:
            kept[rec["run_id"]] = rec
            for name in rec.get("artifacts") or ():
                if run_dirs and rec["run_id"] in run_dirs:
                    target = experiment_dir / "artifacts" / rec["run_id"] / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(target, (Path(run_dirs[rec["run_id"]]) / name).read_bytes())
        atomic_write_bytes(path, "".join(dumps(kept[k]) + "\n" for k in sorted(kept)).encode())
    return path


def finish(run_dir: Path, results_dir: Path | None) -> dict:
    """What the loop does after summary.json: write the run's record.json and, for a named experiment, add it
    to the experiment's records file (``results_dir``)."""
    record = from_run_dir(run_dir)
    atomic_write_json(run_dir / "record.json", _clean(record))
    if results_dir is not None:
        add(results_dir, [record], {record["run_id"]: run_dir})
    return record


def artifact(experiment_dir: Path, record: dict, name: str) -> Path | None:
    """The path of one of a record's artifacts beside the records file (None when it was not kept)."""
    path = Path(experiment_dir) / "artifacts" / record["run_id"] / name
    return path if path.exists() else None


def collect(runs_dir: Path) -> dict[str, Path]:
    """{run id: folder} of every run folder under a sweep folder (config.json or summary.json or metrics.jsonl)."""
    found = {}
    for marker in ("config.json", "summary.json", "metrics.jsonl"):
        for p in Path(runs_dir).rglob(marker):
            found.setdefault(str(p.parent.relative_to(runs_dir)), p.parent)
    return dict(sorted(found.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Add the runs of a sweep folder to an experiment's records file.",
                                     epilog="python -m experiments.record add runs/lm/cpu results/lm/cpu")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("add", help="read every run folder under RUNS (older layouts too) and add its record to EXPERIMENT/records.jsonl")
    p.add_argument("runs", type=Path)
    p.add_argument("experiment", type=Path)
    p.add_argument("--finished-only", action="store_true", help="skip failed and unfinished runs")
    p.add_argument("--with-unfinished", action="store_true",
                   help="also add runs still going or killed (status unfinished); by default they wait for their end")
    p.add_argument("--experiment-name", default=None, help="set the records' experiment name (default: the EXPERIMENT folder's name)")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a folder: pass a sweep folder such as runs/lm/cpu")
    dirs = collect(args.runs)
    records = [from_run_dir(d, run_id) for run_id, d in dirs.items()]
    if args.finished_only:
        records = [r for r in records if r["status"] == "done"]
    waiting = [] if args.with_unfinished else [r["run_id"] for r in records if r["status"] == "unfinished"]
    records = [r for r in records if r["run_id"] not in waiting]
    if waiting:
        print(f"left out {len(waiting)} unfinished runs (still going, or killed: rerun their command, then add again; "
              f"--with-unfinished adds them now): {', '.join(waiting[:5])}{' ...' if len(waiting) > 5 else ''}")
    for r in records:
        r["experiment"] = args.experiment_name or args.experiment.name
    if not records and not waiting:
        parser.error(f"no run folder under {args.runs}")
    if not records:
        return 0
    path = add(args.experiment, records, dirs)
    print(f"added {len(records)} records to {path} ({sum(r['status'] == 'done' for r in records)} finished)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

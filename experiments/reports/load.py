"""Reading an experiment's records for the reports: finished and failed runs, one flat row per run (the
results_runs.csv columns), the curves over training, per-episode outcomes and the horizon series."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .. import record as rec
from ..registry import TASK_LABELS, has_ap, rank

# Metrics that are rates, for runs written before summary.json declared metric_range.
RATE_METRICS = ("success",)
# The library's damping default until it was chosen by the damping sweeps; records of DoPr runs whose summary
# and config name no damping were made with it.
OLD_DEFAULT_DAMPING = 1e-3


def load_runs(source: Path) -> tuple[list[dict], list[dict]]:
    """(finished runs, failed or unfinished runs) as records: from an experiment folder's records.jsonl, or from a
    sweep folder of run folders (runs/<task>/<experiment>, read through record.from_run_dir)."""
    source = Path(source)
    if (source / rec.RECORDS).exists() or source.name == rec.RECORDS:
        records = rec.read(source)
    else:
        records = [rec.from_run_dir(d, run_id) for run_id, d in rec.collect(source).items()]
    done = [r for r in records if r["status"] == "done"]
    return done, [r for r in records if r["status"] != "done"]


def final_eval(r: dict) -> dict:
    """The record's evaluation at its last step (the final weights)."""
    step = r["summary"]["final"]["step"]
    return next((e for e in reversed(r["evals"]) if e["step"] == step), r["evals"][-1])


def is_rate(summary: dict) -> bool:
    return list(summary.get("metric_range") or []) == [0, 1] or summary["metric_name"] in RATE_METRICS


def labels(summary: dict) -> dict:
    fallback = TASK_LABELS.get(summary.get("task"), {})
    out = {k: summary.get(k) or fallback.get(k) for k in ("val_loss_label", "metric_label", "horizon_label")}
    out["val_loss_label"] = out["val_loss_label"] or "validation loss"
    out["metric_label"] = out["metric_label"] or summary["metric_name"]
    out["horizon_label"] = out["horizon_label"] or "rollout horizon"
    return out


def episode_outcomes(done: list[dict]) -> dict[str, dict[str, list[float] | None]]:
    """{run id: {"final": outcomes, "best": outcomes}}: the per-episode (per-problem) outcomes of the headline
    metric at the final and the best step."""
    out = {}
    for r in done:
        s = r["summary"]
        by_step = {int(step): o[s["metric_name"]] for step, o in r["outcomes"].items() if s["metric_name"] in o}
        out[r["run_id"]] = {k: by_step.get(s[k]["step"]) for k in ("final", "best")}
    return out


def run_damping(r: dict):
    """The AP damping (gamma) of a DoPr run, None (an empty CSV cell) for a run without AP."""
    s = r["summary"]
    if not has_ap(s["optimizer"]):
        return None
    if s.get("damping") is not None:
        return s["damping"]
    return ((r["config"].get("optimizer") or {}).get("kwargs") or {}).get("damping", OLD_DEFAULT_DAMPING)


def max_rows_per_dim(r: dict):
    """AP's row cap per input dimension (None: every row, the exact statistic, or no AP)."""
    if not has_ap(r["summary"]["optimizer"]):
        return None
    rows = r["summary"].get("ap_rows") or {}
    if "max_rows_per_dim" in rows:
        return rows["max_rows_per_dim"]
    return ((r["config"].get("optimizer") or {}).get("kwargs") or {}).get("max_rows_per_dim")


def per_run_rows(done: list[dict]) -> list[dict]:
    """One flat row per finished run: its settings, final and best numbers (the results_runs.csv columns)."""
    rows = []
    for r in done:
        s, last = r["summary"], final_eval(r)
        metric = s["metric_name"]
        row = {"optimizer": s["optimizer"], "lr": s["lr"], "damping": run_damping(r), "max_rows_per_dim": max_rows_per_dim(r),
               "weight_decay": (r["config"].get("optimizer") or {}).get("weight_decay"),
               "task_version": task_version(r), "steps": s.get("steps"), "seed": s["seed"], "final_val_loss": last["val_loss"],
               "min_val_loss": s["best"]["min_val_loss"], f"final_{metric}": last["metrics"][metric],
               f"best_{metric}": s["best"]["metric"], "best_step": s["best"]["step"], "run": r["run_id"],
               "wall_seconds": s.get("wall_seconds"), "train_seconds": last.get("train_seconds"),
               **({"train_cpu_seconds": last["train_cpu_seconds"]} if last.get("train_cpu_seconds") is not None else {}),
               "final_rollout_seconds": last.get("rollout_seconds")}
        label = (r["config"].get("tune") or {}).get("label")
        if label:  # a trial of the version-3 tuning (experiments/tuning.py)
            row["trial"] = label
        kwargs = (r["config"].get("optimizer") or {}).get("kwargs") or {}
        if kwargs.get("betas") is not None:  # AdamW's own searched hyperparameter (version-3 tuning); only where a run set it
            row["beta2"] = kwargs["betas"][1]
        if kwargs.get("momentum") is not None:  # Muon's
            row["momentum"] = kwargs["momentum"]
        row.update({f"final_{k}": v for k, v in last["metrics"].items() if k != metric})
        row.update({f"final_select_{k}": v for k, v in last["select"].items()})
        for name, (low, high) in last["intervals"].items():
            row[f"final_{name}_ci_low"], row[f"final_{name}_ci_high"] = low, high
        if "raw" in last:
            row["final_raw_val_loss"] = last["raw"]["val_loss"]
            row.update({f"final_raw_{k}": v for k, v in last["raw"]["metrics"].items()})
            row.update({f"final_raw_select_{k}": v for k, v in last["raw"]["select"].items()})
        # a metric's floor (flow: fd_floor, what real images of the sample's size score) also under its own name
        row.update({k: v for k, v in last["metrics"].items() if k.endswith("_floor")})
        rows.append(row)
    return sorted(rows, key=lambda r: (rank(r["optimizer"]), r["lr"], -1 if r["damping"] is None else r["damping"], r["seed"]))


def interval_columns(done: list[dict]) -> set[str]:
    """The per-run interval columns (final_<metric>_ci_low/high): kept in the CSV, never averaged over seeds."""
    return {f"final_{n}_ci_{side}" for r in done for n in final_eval(r)["intervals"] for side in ("low", "high")}


def horizon_series(done: list[dict]) -> dict[str, list[tuple[int, str]]]:
    """The headline metric by rollout horizon in the final evaluations (accuracy by chain length, FD by ODE
    steps, ...): {series: [(horizon, run-row column), ...]} sorted by horizon, the main series ("steps") first."""
    series = defaultdict(set)
    for r in done:
        for name, points in final_eval(r)["horizons"].items():
            series[name].update((int(n), f"final_{column}") for n, column in points.items())
    return {k: sorted(v) for k, v in sorted(series.items(), key=lambda kv: (kv[0] != "steps", kv[0]))}


def curves(done: list[dict], key: str) -> dict[str, dict[int, list[float]]]:
    """{optimizer: {step: [value per seed]}} of the validation loss (``val_loss``) or a metric, at every evaluation."""
    out = defaultdict(lambda: defaultdict(list))
    for r in done:
        for e in r["evals"]:
            value = e["val_loss"] if key == "val_loss" else e["metrics"].get(key)
            if isinstance(value, (int, float)):
                out[r["summary"]["optimizer"]][e["step"]].append(value)
    return out


def current_version(configs: Path | None, task: str) -> int | None:
    """The task's version now (``version`` in ``configs/task/<task>.yaml``), None where there is no such file."""
    path = configs / f"{task}.yaml" if configs is not None else None
    if path is None or not path.exists():
        return None
    from omegaconf import OmegaConf

    version = OmegaConf.load(path).get("version")
    return int(version) if version is not None else None


def task_version(record: dict) -> int:
    """The task version a run trained at (``task.version`` in its config; 1 for runs from before the field)."""
    return (record["config"].get("task") or {}).get("version", 1)

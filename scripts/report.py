#!/usr/bin/env python
"""Turn run folders into a task's results: a markdown table (mean and 95% CI over seeds), a
per-run CSV and a figure of validation loss against the rollout metric.

    python scripts/report.py --runs runs/lm/cpu --out results/lm
    python scripts/report.py --runs runs/lm/lr_sweep --out results/lm --lr-sweep
    python scripts/report.py --runs runs/lm/damping_sweep --out results/lm/cpu --damping-sweep

Reads only the files the training loop wrote (config.json, summary.json, metrics.jsonl) in each
run folder; no number is typed in. Failed runs are listed with their reason, never dropped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.checkpoint import atomic_write_text  # noqa: E402
from experiments.logging import git_commit  # noqa: E402
from experiments.stats import mean_ci, nested_bootstrap_ci  # noqa: E402

# One colour per optimizer across every figure: the base GP's hue, dark with AP, light without.
COLOURS = {"adamw": "#9ecae1", "dopr_adamw": "#08519c", "muon": "#fdae6b", "dopr_muon": "#a63603",
           "signum": "#a1d99b", "dopr_signum": "#006d2c", "adamuon": "#bcbddc", "dopr_adamuon": "#54278f",
           "sgd": "#bdbdbd", "dopr_sgd": "#252525"}
ORDER = list(COLOURS)


def load_runs(runs_dir: Path) -> tuple[list[dict], list[dict]]:
    """(finished runs, failed or unfinished runs), each a dict of its summary and config."""
    done, failed = [], []
    for summary_path in sorted(runs_dir.rglob("summary.json")):
        run = summary_path.parent
        summary = json.loads(summary_path.read_text())
        config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
        entry = {"dir": str(run.relative_to(runs_dir)), "summary": summary, "config": config}
        (done if summary.get("status") == "done" else failed).append(entry)
    for run in sorted(p.parent for p in runs_dir.rglob("metrics.jsonl")):
        if not (run / "summary.json").exists():
            failed.append({"dir": str(run.relative_to(runs_dir)), "summary": {"status": "unfinished", "error": "no summary.json: killed or still running (rerun the same command to resume)"}, "config": {}})
    return done, failed


def fmt(mean: float, half: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


# Metrics that are rates, for runs written before summary.json declared metric_range.
RATE_METRICS = ("success",)


def is_rate(summary: dict) -> bool:
    return list(summary.get("metric_range") or []) == [0, 1] or summary["metric_name"] in RATE_METRICS


def spread(values: list[float], rate: bool = False, groups: list[list[float]] | None = None) -> tuple[float, float, float]:
    """(mean, low, high) over seeds: the 95% Student-t interval, or for a rate the two-level bootstrap over
    seeds and each seed's episodes (``groups``; seeds only without them), which stays inside [0, 1]."""
    if rate:
        return nested_bootstrap_ci(groups if groups and all(groups) else [[v] for v in values])
    mean, half = mean_ci(values)
    return mean, mean - half, mean + half


def fmt_spread(point: float, low: float, high: float, digits: int, rate: bool) -> str:
    if math.isnan(low):
        return f"{point:.{digits}f}"
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]" if rate else fmt(point, (high - low) / 2, digits)


def episode_outcomes(runs_dir: Path, done: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{run folder: {"final": outcomes, "best": outcomes}}: the per-episode (per-problem) outcomes of the
    headline metric at the final and the best step, from the ``outcomes`` rows of metrics.jsonl."""
    out = {}
    for r in done:
        path, s = runs_dir / r["dir"] / "metrics.jsonl", r["summary"]
        if not path.exists():
            continue
        by_step = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if isinstance(row.get("outcomes"), dict) and s["metric_name"] in row["outcomes"]:
                by_step[row["step"]] = row["outcomes"][s["metric_name"]]
        out[r["dir"]] = {k: by_step.get(s[k]["step"]) for k in ("final", "best")}
    return out


def run_damping(run: dict):
    """The AP damping (gamma) of a DoPr run, None (an empty CSV cell) for a run without AP. Runs
    written before summary.json recorded it: from config.json, else the library default they ran with."""
    s = run["summary"]
    if not s["optimizer"].startswith("dopr_"):
        return None
    if s.get("damping") is not None:
        return s["damping"]
    return ((run["config"].get("optimizer") or {}).get("kwargs") or {}).get("damping", OLD_DEFAULT_DAMPING)


# The library's damping default until it was chosen by the damping sweeps (results/<task>/cpu/damping.md).
OLD_DEFAULT_DAMPING = 1e-3


def per_run_rows(done: list[dict]) -> list[dict]:
    rows = []
    for r in done:
        s = r["summary"]
        row = {"optimizer": s["optimizer"], "lr": s["lr"], "damping": run_damping(r),
               "weight_decay": (r["config"].get("optimizer") or {}).get("weight_decay"),
               "task_version": (r["config"].get("task") or {}).get("version", 1), "seed": s["seed"], "final_val_loss": s["final"]["val_loss"],
               "min_val_loss": s["best"]["min_val_loss"], f"final_{s['metric_name']}": s["final"][s["metric_name"]],
               f"best_{s['metric_name']}": s["best"]["metric"], "best_step": s["best"]["step"], "run": r["dir"],
               "wall_seconds": s.get("wall_seconds")}
        row.update({f"final_{k}": v for k, v in s["final"].items() if k not in ("step", "val_loss", s["metric_name"])})
        # a metric's floor (flow: fd_floor, what real images of the sample's size score) also under its own name
        row.update({k: v for k, v in s["final"].items() if k.endswith("_floor")})
        rows.append(row)
    return sorted(rows, key=lambda r: (ORDER.index(r["optimizer"]) if r["optimizer"] in ORDER else 99, r["lr"],
                                       -1 if r["damping"] is None else r["damping"], r["seed"]))


def summary_table(rows: list[dict], metric: str, by: tuple = ("optimizer",), rate: bool = False, episodes: dict | None = None) -> str:
    """Mean and CI over seeds, one line per value of the ``by`` columns (optimizer, lr, damping); for a
    rate metric (``rate``) its intervals come from the bootstrap over seeds and ``episodes`` (``spread``)."""
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in by)].append(row)
    extra = [k for k in ("final_raw_val_loss", f"final_raw_{metric}") if any(k in row for row in rows)]  # EMA runs: the raw weights too
    extra += [key for points in horizon_series(rows, metric).values() for _, key in points]
    # per-run interval bounds (e.g. success_ci_low) stay in the CSV: averaged over seeds they mean nothing
    extra += sorted({k for row in rows for k in row if k.startswith(f"final_{metric}_") and k not in extra
                     and not re.search(r"_ci_(low|high)$", k)})
    head = list(by) + ["seeds", "final val loss", "best val loss",
            f"final {metric}", f"best {metric}"] + [k.replace(f"final_{metric}_", f"final {metric}, ").replace("final_raw_", "raw: final ").replace("_", " ")
                                                   for k in extra]
    timed = any(row.get("wall_seconds") is not None for row in rows)  # runs from before summary.json had it: no column
    head += ["minutes per run"] if timed else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rs in groups.items():
        cells = [key[0]] + ["" if v is None else f"{v:g}" for v in key[1:]] + [str(len(rs))]
        cells += [fmt(*mean_ci([r["final_val_loss"] for r in rs]), 4), fmt(*mean_ci([r["min_val_loss"] for r in rs]), 4),
                  *(fmt_spread(*spread([r[f"{when}_{metric}"] for r in rs], rate, [(episodes or {}).get(r["run"], {}).get(when) for r in rs]), 3, rate)
                    for when in ("final", "best"))]
        cells += [(fmt_spread(*spread([r[k] for r in rs if k in r], rate), 3, rate) if rate and (k.startswith(f"final_{metric}_") or k == f"final_raw_{metric}")
                   else fmt(*mean_ci([r[k] for r in rs if k in r]), 4 if "val_loss" in k else 3)) if any(k in r for r in rs) else "" for k in extra]
        if timed:  # the mean wall time (set-up, training, evaluations) of the runs that recorded it
            minutes = [r["wall_seconds"] / 60 for r in rs if r.get("wall_seconds") is not None]
            cells.append(f"{sum(minutes) / len(minutes):.1f}" if minutes else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Axis labels for run folders written before tasks declared their own (summary.json's *_label keys).
LABELS = {"lm": {"val_loss_label": "validation loss (nats per token)", "metric_label": "exact-answer accuracy (fraction)",
                 "horizon_label": "reasoning steps in the problem"}}


def labels(summary: dict) -> dict:
    fallback = LABELS.get(summary.get("task"), {})
    keys = ("val_loss_label", "metric_label", "horizon_label")
    out = {k: summary.get(k) or fallback.get(k) for k in keys}
    out["val_loss_label"] = out["val_loss_label"] or "validation loss"
    out["metric_label"] = out["metric_label"] or summary["metric_name"]
    out["horizon_label"] = out["horizon_label"] or "rollout horizon"
    return out


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no timestamp: deterministic bytes
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _optimizers(rows: list[dict]) -> list[str]:
    return sorted({r["optimizer"] for r in rows}, key=lambda o: ORDER.index(o) if o in ORDER else 99)


def _band(ax, opt: str, xs: list, samples: list[list[float]], rate: bool = False, **plot_kw) -> None:
    """One optimizer's line: the mean over seeds at each x, its 95% CI as a band (``spread``: inside
    [0, 1] for a rate)."""
    stats = [spread(v, rate) for v in samples]
    means = [m for m, _, _ in stats]
    lows = [m if math.isnan(lo) else lo for m, lo, _ in stats]
    highs = [m if math.isnan(hi) else hi for m, _, hi in stats]
    colour = COLOURS.get(opt, "#777777")
    ax.plot(xs, means, marker="o" if opt.startswith("dopr_") else "s", color=colour, label=opt,
            linestyle="-" if opt.startswith("dopr_") else "--", **plot_kw)
    ax.fill_between(xs, lows, highs, color=colour, alpha=0.2, linewidth=0)


def _finish(fig, axes, title: str, path: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title + "; mean and 95% CI over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    _save_png(fig, path)


def horizon_series(rows: list[dict], metric: str) -> dict[str, list[tuple[int, str]]]:
    """The per-horizon variants of the metric in the run rows, e.g. accuracy_steps3 (series
    "steps") or fd_euler_8 (series "euler"): {series: [(horizon, column), ...]} sorted by horizon."""
    pattern = re.compile(rf"^final_{re.escape(metric)}_(?P<series>[A-Za-z_]*?)_?(?P<n>\d+)$")
    series = defaultdict(set)
    for row in rows:
        for key in row:
            m = pattern.match(key)
            if m:
                series[m["series"] or "steps"].add((int(m["n"]), key))
    return {k: sorted(v) for k, v in sorted(series.items(), key=lambda kv: (kv[0] != "steps", kv[0]))}  # the main series first


def horizon_figure(rows: list[dict], metric: str, path: Path, title: str, lab: dict, rate: bool = False) -> bool:
    """The rollout metric against the rollout horizon (chain length, ODE steps, ...), one panel per
    series, one line per optimizer: mean over seeds with its 95% CI as a band."""
    series = horizon_series(rows, metric)
    if not series:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 4.0), dpi=120, squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items()):
        for opt in _optimizers(rows):
            rs = [r for r in rows if r["optimizer"] == opt]
            kept = [(n, [r[key] for r in rs if key in r]) for n, key in points]
            kept = [(n, vals) for n, vals in kept if vals]
            _band(ax, opt, [n for n, _ in kept], [vals for _, vals in kept], rate)
        if max(n for n, _ in points) / max(1, min(n for n, _ in points)) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks([n for n, _ in points], [str(n) for n, _ in points])
        ax.set_xlabel(lab["horizon_label"] + ("" if name == "steps" else f" ({name})"))
        ax.set_ylabel(lab["metric_label"] + ", final weights", fontsize=9)
    _finish(fig, axes[0], title, path)
    return True


def curves(runs_dir: Path, done: list[dict], key: str) -> dict[str, dict[int, list[float]]]:
    """{optimizer: {step: [value per seed]}} of one logged number, from each run's metrics.jsonl."""
    out = defaultdict(lambda: defaultdict(list))
    for r in done:
        path = runs_dir / r["dir"] / "metrics.jsonl"
        if not path.exists():
            continue
        seen = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if key in row and isinstance(row[key], (int, float)):
                seen[row["step"]] = row[key]  # a resumed run may log a step twice: keep the last
        for step, value in seen.items():
            out[r["summary"]["optimizer"]][step].append(value)
    return out


def curve_table(series: dict[str, dict[int, list[float]]], key: str) -> str:
    """Mean over seeds of one logged number at each evaluated step, one row per optimizer."""
    steps = sorted({t for per_step in series.values() for t in per_step})
    lines = [f"| {key} at step | " + " | ".join(str(t) for t in steps) + " |", "|" + "---|" * (len(steps) + 1)]
    for opt in sorted(series, key=lambda o: ORDER.index(o) if o in ORDER else 99):
        lines.append(f"| {opt} | " + " | ".join(f"{sum(series[opt][t]) / len(series[opt][t]):.3f}" if t in series[opt] else ""
                                                for t in steps) + " |")
    return "\n".join(lines)


def training_figure(runs_dir: Path, done: list[dict], metric: str, path: Path, title: str, lab: dict, rate: bool = False) -> bool:
    """Validation loss and the rollout metric against the training step (every evaluation of the
    weights being evaluated), one line per optimizer: mean over seeds with its 95% CI as a band."""
    panels = [("val_loss", lab["val_loss_label"]), (metric, lab["metric_label"])]
    data = [curves(runs_dir, done, key) for key, _ in panels]
    if not data[0] or max(len(steps) for steps in data[0].values()) < 2:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.0), dpi=120)
    for ax, (key, label), series in zip(axes, panels, data):
        for opt in sorted(series, key=lambda o: ORDER.index(o) if o in ORDER else 99):
            steps = sorted(series[opt])
            _band(ax, opt, steps, [series[opt][t] for t in steps], rate and key == metric, markersize=3)
        ax.set_xlabel("training step")
        ax.set_ylabel(label, fontsize=9)
    _finish(fig, axes, title, path)
    return True


def samples_figure(runs_dir: Path, done: list[dict], path: Path, title: str) -> bool:
    """A grid of generated samples per optimizer (the lowest seed's run), from the samples.npy
    that tasks with images write at the end of training: rows are classes."""
    import numpy as np

    picked = {}
    for r in sorted(done, key=lambda r: r["summary"]["seed"]):
        f = runs_dir / r["dir"] / "samples.npy"
        if f.exists():
            picked.setdefault(r["summary"]["optimizer"], (r["summary"]["seed"], np.load(f)))
    if not picked:
        return False
    plt = _pyplot()
    opts = [o for o in ORDER if o in picked] + [o for o in picked if o not in ORDER]
    fig, axes = plt.subplots(1, len(opts), figsize=(3.2 * len(opts), 3.8), dpi=120, squeeze=False)
    for ax, opt in zip(axes[0], opts):
        seed, images = picked[opt]
        images = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=96)  # a grey frame around each sample
        n, c, h, w = images.shape
        per_row = 8 if n % 8 == 0 else n
        grid = images.reshape(n // per_row, per_row, c, h, w).transpose(0, 3, 1, 4, 2).reshape(n // per_row * h, per_row * w, c)
        ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{opt} (seed {seed})", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)
    return True


def other_metrics_table(rows: list[dict], metric: str) -> str:
    """Mean ± CI of every other final rollout number (e.g. class accuracy of samples)."""
    skip = {"final_val_loss", f"final_{metric}", "final_step", "final_rollout_seconds"}
    keys = sorted({k for row in rows for k in row if k.startswith("final_") and k not in skip
                   and not k.startswith(f"final_{metric}_") and isinstance(row[k], (int, float))}, key=lambda k: (len(k), k))
    if not keys:
        return ""
    head = ["optimizer", "seeds"] + [k[len("final_"):] for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for opt in _optimizers(rows):
        rs = [r for r in rows if r["optimizer"] == opt]
        lines.append("| " + " | ".join([opt, str(len(rs))] + [fmt(*mean_ci([r[k] for r in rs if k in r]), 3) for k in keys]) + " |")
    return "\n".join(lines)


def figure(rows: list[dict], metric: str, path: Path, title: str, lab: dict, x_key: str = "final_val_loss", x_label: str | None = None) -> None:
    """One point per run: x (validation loss, or a diagnostic) against the rollout metric."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for opt in sorted({r["optimizer"] for r in rows}, key=lambda o: ORDER.index(o) if o in ORDER else 99):
        rs = [r for r in rows if r["optimizer"] == opt and x_key in r]
        ax.scatter([r[x_key] for r in rs], [r[f"final_{metric}"] for r in rs], s=40,
                   color=COLOURS.get(opt, "#777777"), label=opt, edgecolors="black", linewidths=0.5,
                   marker="o" if opt.startswith("dopr_") else "s")
    ax.set_xlabel((x_label or lab["val_loss_label"]) + ", final weights")
    ax.set_ylabel(lab["metric_label"] + ", final weights")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


def damping_section(rows: list[dict], metric: str, higher: bool, out: Path, title: str, lab: dict) -> list[str]:
    """The damping sweep: the rollout metric and the validation loss against the AP damping, one
    line per LR (DoPr runs), the base GP at the same LR as a dashed horizontal line; with EMA runs,
    the raw weights' numbers in their own panels. Then the best damping per LR by each criterion."""
    quantities = [(f"final_{metric}", lab["metric_label"]), ("final_val_loss", lab["val_loss_label"])]
    if any(f"final_raw_{metric}" in r for r in rows):
        quantities += [(f"final_raw_{metric}", lab["metric_label"] + ", raw weights"), ("final_raw_val_loss", lab["val_loss_label"] + ", raw weights")]
        quantities[0] = (quantities[0][0], lab["metric_label"] + ", EMA weights")
        quantities[1] = (quantities[1][0], lab["val_loss_label"] + ", EMA weights")
    dopr_rows = [r for r in rows if r["damping"] is not None]
    base_rows = [r for r in rows if r["damping"] is None]
    lrs = sorted({r["lr"] for r in dopr_rows})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(quantities), figsize=(4.6 * len(quantities), 3.9), dpi=120, squeeze=False)
    palette = ["#08519c", "#a63603", "#006d2c", "#54278f"]
    for ax, (key, label) in zip(axes[0], quantities):
        for i, lr in enumerate(lrs):
            colour = palette[i % len(palette)]
            for opt in sorted({r["optimizer"] for r in dopr_rows}):
                pts = sorted((r["damping"], r[key]) for r in dopr_rows if r["lr"] == lr and r["optimizer"] == opt and key in r)
                if pts:
                    ax.plot([d for d, _ in pts], [v for _, v in pts], marker="o", color=colour, label=f"{opt}, lr {lr:g}")
            for opt in sorted({r["optimizer"] for r in base_rows}):
                vals = [r[key] for r in base_rows if r["lr"] == lr and r["optimizer"] == opt and key in r]
                if vals:
                    ax.axhline(sum(vals) / len(vals), color=colour, linestyle="--", linewidth=1, label=f"{opt}, lr {lr:g}")
        ax.set_xscale("log")
        if "val_loss" in key:
            ax.set_yscale("log")
        ax.set_xlabel("AP damping gamma (x mean eigenvalue of Sigma)")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title + ": final weights, one run per point", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    _save_png(fig, out / "damping.png")
    sign = 1 if higher else -1
    lines = ["## Best damping per learning rate", "",
             f"Per LR, the damping with the {'highest' if higher else 'lowest'} final {metric} and the one with the lowest final "
             "validation loss (one seed per point: a difference of one grid step is within noise); the base GP at the same LR beside it.", "",
             "| optimizer | lr | " + " | ".join(f"damping by {k.removeprefix('final_')}" + (" (min)" if "val_loss" in k else "") for k, _ in quantities)
             + " | " + " | ".join(f"best {k.removeprefix('final_')}" for k, _ in quantities) + " | base GP: " + ", ".join(k.removeprefix("final_") for k, _ in quantities) + " |",
             "|---|---|" + "---|" * (2 * len(quantities) + 1)]
    for opt in sorted({r["optimizer"] for r in dopr_rows}):
        for lr in lrs:
            rs = [r for r in dopr_rows if r["lr"] == lr and r["optimizer"] == opt]
            if not rs:
                continue
            picks, bests = [], []
            for key, _ in quantities:
                have = [r for r in rs if key in r]
                if not have:
                    picks.append(""), bests.append("")
                    continue
                s_ = -1 if "val_loss" in key else sign
                best = max(have, key=lambda r: s_ * r[key])
                picks.append(f"{best['damping']:g}")
                bests.append(f"{best[key]:.4g}")
            base = [r for r in base_rows if r["lr"] == lr and r["optimizer"] == opt.removeprefix("dopr_")]
            base_cells = ", ".join(f"{sum(r[k] for r in base if k in r) / len(base):.4g}" for k, _ in quantities) if base else "n/a"
            lines.append(f"| {opt} | {lr:g} | " + " | ".join(picks) + " | " + " | ".join(bests) + f" | {base_cells} |")
    return lines + ["", "![metric and validation loss against damping](damping.png)", ""]


def trial_key(row: dict) -> tuple:
    """A tuning trial: (lr, the optimizer's own hyperparameter): the damping for DoPr-X, the weight decay for X."""
    return (row["lr"], row["damping"] if row["damping"] is not None else row["weight_decay"])


ROUND_ONE_LRS = 3  # the tuning presets' first round: +lr_step -1,0,1 around each optimizer's centre


def extension_lrs(by_opt: dict, selections: dict, sign: int, metric: str) -> dict:
    """Per optimizer, the learning rate a second tuning round adds: one rung of the half-decade ladder beyond
    the grid, below it when the selected LR is the lowest or its lower neighbour scores at least as well as
    its upper one, else above it. Every optimizer gets one, so budgets stay equal."""
    from experiments.train import lr_ladder

    out = {}
    for opt, trials in by_opt.items():
        lrs = sorted({t[0] for t in trials})
        if len(lrs) < 2:
            continue
        score = lambda x: max(sign * sum(r[f"final_{metric}"] for r in rs) / len(rs) for t, rs in trials.items() if t[0] == x)  # noqa: E731
        i = lrs.index(selections[opt]["by_metric"][0])
        down = i == 0 or (i < len(lrs) - 1 and score(lrs[i - 1]) >= score(lrs[i + 1]))
        out[opt] = lr_ladder(lrs[0], -1) if down else lr_ladder(lrs[-1], 1)
    return out


def tuning_section(rows: list[dict], metric: str, higher: bool, out: Path, title: str, lab: dict, task: str, scale: str):
    """The tuning protocol's report: per optimizer the trial count, the grid, the trial selected by
    mean final validation loss and by mean final rollout metric, and the regret of selecting by
    validation loss; Observation 4.3 (DoPr-X's best LR over X's); the tuning surface; and the
    commands for the evaluation seeds at each selected setting. Returns (lines, selections)."""
    sign = 1 if higher else -1
    by_opt = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_opt[r["optimizer"]][trial_key(r)].append(r)
    opts = sorted(by_opt, key=lambda o: (ORDER.index(o.removeprefix("dopr_")) if o.removeprefix("dopr_") in ORDER else 99, o.startswith("dopr_")))
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    selections = {}
    lines = ["## Selection", "",
             f"Every optimizer searched its learning rate and one hyperparameter of its own (DoPr-X: the AP damping; X: the "
             f"weight decay) over a grid of equal size, on tuning seeds disjoint from the evaluation seeds. Per optimizer: the "
             f"trial with the lowest mean final validation loss, the trial with the {'highest' if higher else 'lowest'} mean "
             f"final {metric}, and the regret of selecting by validation loss ({metric} given up, in its units).", "",
             f"| optimizer | trials | seeds per trial | LRs | damping (DoPr-X) or weight decay (X) | selected by val loss (lr, hp) | {metric} there | "
             f"selected by {metric} (lr, hp) | {metric} there | regret |", "|---|---|---|---|---|---|---|---|---|---|"]
    for opt in opts:
        trials = by_opt[opt]
        by_loss = min(trials, key=lambda t: (mean(trials[t], "final_val_loss"), t))
        by_metric = max(trials, key=lambda t: (sign * mean(trials[t], f"final_{metric}"), tuple(-x for x in t)))
        m_loss, m_metric = mean(trials[by_loss], f"final_{metric}"), mean(trials[by_metric], f"final_{metric}")
        selections[opt] = {"by_loss": by_loss, "by_metric": by_metric, "regret": abs(m_metric - m_loss), "trials": len(trials)}
        seeds = sorted({len(v) for v in trials.values()})
        lines.append(f"| {opt} | {len(trials)} | {'/'.join(map(str, seeds))} | {', '.join(f'{x:g}' for x in sorted({t[0] for t in trials}))} | "
                     f"{', '.join(f'{x:g}' for x in sorted({t[1] for t in trials if t[1] is not None}))} | "
                     f"{by_loss[0]:g}, {by_loss[1]:g} | {m_loss:.4g} | {by_metric[0]:g}, {by_metric[1]:g} | {m_metric:.4g} | {abs(m_metric - m_loss):.4g} |")
    edges, lr_edges = [], []
    for opt in opts:
        trials, (lr, hp) = by_opt[opt], selections[opt]["by_metric"]
        lrs, hps = sorted({t[0] for t in trials}), sorted({t[1] for t in trials if t[1] is not None})
        where = [f"LR {lr:g}"] if len(lrs) > 1 and lr in (lrs[0], lrs[-1]) else []
        lr_edges += [opt] if where else []
        where += [f"{'damping' if opt.startswith('dopr_') else 'weight decay'} {hp:g}"] if hp is not None and len(hps) > 1 and hp in (hps[0], hps[-1]) else []
        if where:
            edges.append(f"{opt} ({', '.join(where)})")
    if edges:
        lines += ["", "**At the edge of the grid** (selected by the metric): " + "; ".join(edges) + ". The best setting may lie "
                  "outside the grid; a wider grid would tell."]
    extend = extension_lrs(by_opt, selections, sign, metric)
    extended = all(len({t[0] for t in by_opt[o]}) > ROUND_ONE_LRS for o in opts)
    if lr_edges and extended:
        lines += ["", "**The second round is in** (every optimizer searched more than the first round's "
                  f"{ROUND_ONE_LRS} LRs); the protocol extends once, so these selections stand, at the edge for "
                  + ", ".join(lr_edges) + "."]
    elif lr_edges and extend:
        lines += ["", "**One more learning rate each** keeps the budgets equal: every optimizer gets one half-decade beyond its grid, "
                  "on the side of its best (beyond the selected LR where it is at an edge, else beyond its better neighbour), "
                  "crossed with the same hyperparameter values and seeds. As a sweep preset's grid centres with `+lr_step: 0` "
                  f"(as in `configs/sweep/{task}_tune_extend_*.yaml` where it exists):", "", "```yaml",
                  "lr_centre: {" + ", ".join(f"{opt}: {extend[opt]:g}" for opt in opts if opt in extend) + "}", "```"]
    horizon = [key for points in horizon_series(rows, metric).values() for _, key in points]
    if horizon:
        lines += ["", f"Per-horizon {metric} of each optimizer's trial selected by {metric}:", "",
                  "| optimizer | " + " | ".join(k.removeprefix(f"final_{metric}_") for k in horizon) + " |", "|---|" + "---|" * len(horizon)]
        for opt in opts:
            rs = by_opt[opt][selections[opt]["by_metric"]]
            lines.append(f"| {opt} | " + " | ".join(f"{mean(rs, k):.3g}" if all(k in r for r in rs) else "" for k in horizon) + " |")
    counts = {o: s_["trials"] for o, s_ in selections.items()}
    if len(set(counts.values())) > 1:
        lines += ["", "**Unequal budgets**: " + ", ".join(f"{o} {n}" for o, n in counts.items()) + " trials; the comparison is not fair "
                  "until every optimizer has the same number (finish or rerun the sweep)."]
    lines += ["", "## Observation 4.3: does X's learning rate carry over to DoPr-X?", "",
              "| optimizer | best LR (by metric) | X's best LR | ratio | best damping (by metric) | best LR by val loss | X's | ratio |", "|---|---|---|---|---|---|---|---|"]
    for opt in opts:
        base = opt.removeprefix("dopr_")
        if not opt.startswith("dopr_") or base not in selections:
            continue
        d, b = selections[opt], selections[base]
        lines.append(f"| {opt} | {d['by_metric'][0]:g} | {b['by_metric'][0]:g} | {d['by_metric'][0] / b['by_metric'][0]:g} | {d['by_metric'][1]:g} | "
                     f"{d['by_loss'][0]:g} | {b['by_loss'][0]:g} | {d['by_loss'][0] / b['by_loss'][0]:g} |")
    lines += ["", "The paper's Observation 4.3 holds where the ratio is 1 (DoPr-X tuned at X's learning rate).", ""]
    # The surface: the metric against LR, one line per value of the optimizer's own hyperparameter.
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(opts), figsize=(4.2 * len(opts), 3.6), dpi=120, squeeze=False)
    for ax, opt in zip(axes[0], opts):
        trials = by_opt[opt]
        for hp in sorted({t[1] for t in trials}, key=lambda x: -1 if x is None else x):
            pts = sorted((t[0], mean(rs, f"final_{metric}")) for t, rs in trials.items() if t[1] == hp)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=("damping " if opt.startswith("dopr_") else "wd ") + f"{hp:g}")
        ax.set_xscale("log")
        lrs = sorted({t[0] for t in trials})
        ax.set_xticks(lrs, [f"{x:g}" for x in lrs])  # the grid's LRs, no overlapping minor labels
        ax.set_xticks([], minor=True)
        ax.set_xlabel("learning rate")
        ax.set_ylabel(lab["metric_label"], fontsize=9)
        ax.set_title(opt, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title + f": final {metric}, mean over tuning seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    _save_png(fig, out / "tuning.png")
    lines += ["![tuning surface](tuning.png)", "", "## Evaluation runs at the selected settings", "",
              f"Each optimizer at its setting selected by {metric} (the suite's question), on evaluation seeds 0-4:", "", "```bash"]
    for opt in opts:
        lr, hp = selections[opt]["by_metric"]
        own = f"optimizer.kwargs.damping={hp:g}" if opt.startswith("dopr_") else f"optimizer.weight_decay={hp:g}"
        lines.append(f"python -m experiments.train -m task={task} scale={scale} optimizer={opt} lr={lr:g} {own} seed=0,1,2,3,4")
    lines += ["```", "", f"or set these entries in `configs/task/{task}.yaml` (the other optimizers' entries of `lr` stay) and run "
              f"`make reproduce-{task.replace('_', '-')}`; `task.tuned` applies whenever `lr=` is not given:", "", "```yaml"]
    lines.append("lr: {" + ", ".join(f"{opt}: {selections[opt]['by_metric'][0]:g}" for opt in opts) + "}")
    lines.append("tuned:")
    for opt in opts:
        hp = selections[opt]["by_metric"][1]
        lines.append(f"  {opt}: " + (f"{{kwargs: {{damping: {hp:g}}}}}" if opt.startswith("dopr_") else f"{{weight_decay: {hp:g}}}"))
    lines += ["```", ""]
    return lines, selections


def log_to_wandb(rows: list[dict], metric: str, task: str, runs_dir: Path, project: str, lab: dict) -> str:
    """One W&B run per report (job_type "report", in the sweep's group): a Table of every run and a
    scatter plot of final validation loss against the final rollout metric, so the dashboard shows
    the comparison without custom panels. Offline unless WANDB_MODE or an API key says otherwise."""
    import wandb

    from experiments.logging import wandb_mode

    group = f"{task}/{runs_dir.name}"
    fields = list(dict.fromkeys(k for row in rows for k in row))
    run = wandb.init(project=project, group=group, job_type="report", name=f"report-{task}-{runs_dir.name}", dir=str(runs_dir),
                     mode=wandb_mode(), tags=["report", git_commit(ignore=("results",))], settings=wandb.Settings(silent=True))
    table = wandb.Table(columns=fields, data=[[row.get(f) for f in fields] for row in rows])
    run.log({"runs": table, f"val_loss_vs_{metric}": wandb.plot.scatter(
        table, "final_val_loss", f"final_{metric}", title=f"{task} {runs_dir.name}: {lab['val_loss_label']} vs {lab['metric_label']}")})
    where = run.dir
    run.finish()
    return where


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, type=Path, help="a sweep folder (runs/<task>/<scale>)")
    parser.add_argument("--out", required=True, type=Path, help="results folder (results/<task>)")
    parser.add_argument("--lr-sweep", action="store_true", help="group by (optimizer, lr) and write lr_sweep.md")
    parser.add_argument("--damping-sweep", action="store_true", help="group by (optimizer, lr, damping) and write damping.md with its figure")
    parser.add_argument("--tuning", action="store_true", help="a tuning sweep (+sweep=<task>_tune_*): write tuning.md, its surface figure and the selected settings")
    parser.add_argument("--command", default=None, help="the command that made the runs (written into the report)")
    parser.add_argument("--wandb", action="store_true", help="also log a W&B run with a Table of the runs and a val-loss-vs-metric scatter")
    parser.add_argument("--wandb-project", default="dopr")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a folder of runs: run the sweep first (e.g. make reproduce-lm)")
    done, failed = load_runs(args.runs)
    if not done:
        parser.error(f"no finished run under {args.runs}" + (f" ({len(failed)} failed or unfinished)" if failed else ""))
    rows = per_run_rows(done)
    metric = done[0]["summary"]["metric_name"]
    higher = done[0]["summary"].get("higher_is_better", True)
    lab = labels(done[0]["summary"])
    task = done[0]["summary"]["task"]
    scale = done[0]["summary"]["scale"]
    commits = sorted({r["summary"]["git_commit"] for r in done})
    if args.lr_sweep + args.damping_sweep + args.tuning > 1:
        parser.error("--lr-sweep, --damping-sweep and --tuning are three reports: pass one")
    stem = "damping" if args.damping_sweep else "lr_sweep" if args.lr_sweep else "tuning" if args.tuning else "results"
    by = {"damping": ("optimizer", "lr", "damping"), "lr_sweep": ("optimizer", "lr"), "results": ("optimizer",),
          "tuning": ("optimizer", "lr", "damping", "weight_decay")}[stem]
    flag = {"damping": " --damping-sweep", "lr_sweep": " --lr-sweep", "results": "", "tuning": " --tuning"}[stem]
    rate = is_rate(done[0]["summary"])
    # what the task says about its setting (control: env, expert returns, evaluation noise), where every run agrees
    task_meta = [r["summary"].get("task_meta") or {} for r in done]
    setting = {k: v for k, v in task_meta[0].items() if all(m.get(k) == v for m in task_meta)}
    table = summary_table(rows, metric, by, rate, episode_outcomes(args.runs, done) if rate else None)
    what = {"damping": "damping sweep", "lr_sweep": "learning-rate sweep", "results": "results", "tuning": "tuning sweep"}[stem]
    parts = [f"# {task}: {what} (scale={scale})", "",
             f"Generated by `python scripts/report.py --runs {args.runs} --out {args.out}{flag}` "
             f"(report at commit {git_commit(ignore=('results',))}); runs trained at commit(s) {', '.join(commits)}.",
             *([f"The runs were made by `{args.command}`."] if args.command else []), "",
             "Mean ± half-width of the 95% Student-t confidence interval over seeds" + (
                 f"; {metric} is a rate: its mean and [low, high] of a 95% bootstrap interval that redraws seeds and then "
                 "each seed's episodes (seeds only where per-episode outcomes were not logged), inside [0, 1]" if rate else "") + ". `final` is the last step's "
             f"weights; `best {metric}` is the best rollout evaluation during training (best checkpoint); "
             "`best val loss` the lowest validation loss seen.", "",
             *([f"Task setting (the same in every run): {', '.join(f'{k} = {v:.6g}' if isinstance(v, float) else f'{k} = {v}' for k, v in sorted(setting.items()))}.", ""]
               if setting else []), table, ""]
    if args.lr_sweep:
        parts += ["## Chosen learning rates", "",
                  f"Per optimizer, the LR with the {'highest' if higher else 'lowest'} mean final {metric} (the rollout metric the suite is about); "
                  "the LR with the lowest mean final validation loss is shown beside it.", "",
                  "| optimizer | LR by " + metric + " | LR by val loss |", "|---|---|---|"]
        by_opt = defaultdict(lambda: defaultdict(list))
        for row in rows:
            by_opt[row["optimizer"]][row["lr"]].append(row)
        sign = 1 if higher else -1
        for opt, lrs in by_opt.items():
            best_metric = max(lrs, key=lambda lr: sign * sum(r[f"final_{metric}"] for r in lrs[lr]) / len(lrs[lr]))
            best_loss = min(lrs, key=lambda lr: sum(r["final_val_loss"] for r in lrs[lr]) / len(lrs[lr]))
            parts.append(f"| {opt} | {best_metric:g} | {best_loss:g} |")
        parts.append("")
    elif args.damping_sweep:
        args.out.mkdir(parents=True, exist_ok=True)
        parts += damping_section(rows, metric, higher, args.out, f"{task} (scale={scale})", lab)
    elif args.tuning:
        args.out.mkdir(parents=True, exist_ok=True)
        tuning_lines, _ = tuning_section(rows, metric, higher, args.out, f"{task} (scale={scale})", lab, task, scale)
        header = parts[: 3 + bool(args.command)] + [""]
        parts = header + tuning_lines + ["## Every trial", "", "Mean ± 95% t-interval over the tuning seeds of each trial.", "", table, ""]
    else:
        fig_name = "val_loss_vs_" + metric + ".png"
        figure(rows, metric, args.out / fig_name, f"{task} (scale={scale}): one point per run", lab)
        parts += [f"![validation loss against {metric}]({fig_name})", ""]
        for diag in done[0]["summary"].get("diagnostics") or []:
            name = f"{diag}_vs_{metric}.png"
            figure(rows, metric, args.out / name, f"{task} (scale={scale}): one point per run", lab,
                   x_key=f"final_{diag}", x_label=diag.replace("_", " "))
            parts += [f"![{diag} against {metric}]({name})", ""]
        others = other_metrics_table(rows, metric)
        if others:
            parts += ["## Other rollout numbers (final weights)", "", others, ""]
        if horizon_figure(rows, metric, args.out / f"{metric}_vs_horizon.png", f"{task} (scale={scale})", lab, rate):
            parts += [f"## {metric} against the rollout horizon", "", f"![{metric} against horizon]({metric}_vs_horizon.png)", ""]
        if training_figure(args.runs, done, metric, args.out / "training_curves.png", f"{task} (scale={scale})", lab, rate):
            parts += ["## Over training", "", f"Validation loss and {lab['metric_label']} at every evaluation during training "
                      "(from each run's metrics.jsonl); the tables give the means over seeds.", "", "![over training](training_curves.png)", ""]
            for key in ("val_loss", metric):
                parts += [curve_table(curves(args.runs, done, key), key), ""]
        if samples_figure(args.runs, done, args.out / "samples.png", f"{task} (scale={scale}): final-weight samples"):
            parts += ["## Samples", "", "Class-conditional samples of each optimizer's lowest-seed run (rows: classes), "
                      "written by the task at the end of training (samples.npy in the run folder).", "", "![samples](samples.png)", ""]
    if failed:
        parts += ["## Failed or unfinished runs", "", "| run | status | reason |", "|---|---|---|"]
        parts += [f"| {f['dir']} | {f['summary'].get('status')} | {f['summary'].get('error', '')} |" for f in failed]
        parts.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{stem}.md", "\n".join(parts))
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.out / f"{stem}_runs.csv", buf.getvalue())
    # What the cross-task summary (scripts/summary.py) needs to read the CSV without the run folders.
    meta = {"task": task, "scale": scale, "metric": metric, "higher_is_better": higher, **lab, "lr_sweep": args.lr_sweep, "damping_sweep": args.damping_sweep,
            "runs": len(done), "failed": [{"run": f["dir"], "status": f["summary"].get("status"), "error": f["summary"].get("error", "")} for f in failed],
            "training_commits": commits, "command": args.command, "metric_range": [0, 1] if rate else None,
            "rollout_episodes": ((done[0]["config"].get("task") or {}).get("eval_episodes")),
            "horizons": {name: [n for n, _ in pts] for name, pts in horizon_series(rows, metric).items()}}
    meta.update(setting)
    atomic_write_text(args.out / f"{stem}_meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out / (stem + '.md')} ({len(done)} runs, {len(failed)} failed or unfinished)")
    if args.wandb:
        where = log_to_wandb(rows, metric, task, args.runs, args.wandb_project, lab)
        print(f"logged the runs table and scatter plot to W&B ({where}; offline runs: wandb sync {args.runs}/wandb/offline-run-*)")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Turn run folders into a task's results: a markdown table (mean and 95% CI over seeds), a
per-run CSV and a figure of validation loss against the rollout metric.

    python scripts/report.py --runs runs/lm/cpu --out results/lm
    python scripts/report.py --runs runs/lm/lr_sweep --out results/lm --lr-sweep

Reads only the files the training loop wrote (config.json, summary.json, metrics.jsonl) in each
run folder; no number is typed in. Failed runs are listed with their reason, never dropped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.checkpoint import atomic_write_text  # noqa: E402
from experiments.logging import git_commit  # noqa: E402

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


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (nan for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def fmt(mean: float, half: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def per_run_rows(done: list[dict]) -> list[dict]:
    rows = []
    for r in done:
        s = r["summary"]
        row = {"optimizer": s["optimizer"], "lr": s["lr"], "seed": s["seed"], "final_val_loss": s["final"]["val_loss"],
               "min_val_loss": s["best"]["min_val_loss"], f"final_{s['metric_name']}": s["final"][s["metric_name"]],
               f"best_{s['metric_name']}": s["best"]["metric"], "best_step": s["best"]["step"], "run": r["dir"]}
        row.update({f"final_{k}": v for k, v in s["final"].items() if k.startswith(s["metric_name"] + "_")})
        rows.append(row)
    return sorted(rows, key=lambda r: (ORDER.index(r["optimizer"]) if r["optimizer"] in ORDER else 99, r["lr"], r["seed"]))


def summary_table(rows: list[dict], metric: str, by_lr: bool) -> str:
    groups = defaultdict(list)
    for row in rows:
        groups[(row["optimizer"], row["lr"]) if by_lr else (row["optimizer"],)].append(row)
    extra = sorted({k for row in rows for k in row if k.startswith(f"final_{metric}_")},
                   key=lambda k: (len(k), k))
    head = ["optimizer"] + (["lr"] if by_lr else []) + ["seeds", "final val loss", "best val loss",
            f"final {metric}", f"best {metric}"] + [k.replace(f"final_{metric}_", f"final {metric}, ") for k in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rs in groups.items():
        cells = [key[0]] + ([f"{key[1]:g}"] if by_lr else []) + [str(len(rs))]
        cells += [fmt(*mean_ci([r["final_val_loss"] for r in rs]), 4), fmt(*mean_ci([r["min_val_loss"] for r in rs]), 4),
                  fmt(*mean_ci([r[f"final_{metric}"] for r in rs]), 3), fmt(*mean_ci([r[f"best_{metric}"] for r in rs]), 3)]
        cells += [fmt(*mean_ci([r[k] for r in rs if k in r]), 3) if any(k in r for r in rs) else "" for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(rows: list[dict], metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for opt in sorted({r["optimizer"] for r in rows}, key=lambda o: ORDER.index(o) if o in ORDER else 99):
        rs = [r for r in rows if r["optimizer"] == opt]
        ax.scatter([r["final_val_loss"] for r in rs], [r[f"final_{metric}"] for r in rs], s=40,
                   color=COLOURS.get(opt, "#777777"), label=opt, edgecolors="black", linewidths=0.5,
                   marker="o" if opt.startswith("dopr_") else "s")
    ax.set_xlabel("validation loss (nats per token, final weights)")
    ax.set_ylabel(f"{metric} (final weights, fraction)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no timestamp: deterministic bytes
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, type=Path, help="a sweep folder (runs/<task>/<scale>)")
    parser.add_argument("--out", required=True, type=Path, help="results folder (results/<task>)")
    parser.add_argument("--lr-sweep", action="store_true", help="group by (optimizer, lr) and write lr_sweep.md")
    parser.add_argument("--command", default=None, help="the command that made the runs (written into the report)")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a folder of runs: run the sweep first (e.g. make reproduce-lm)")
    done, failed = load_runs(args.runs)
    if not done:
        parser.error(f"no finished run under {args.runs}" + (f" ({len(failed)} failed or unfinished)" if failed else ""))
    rows = per_run_rows(done)
    metric = done[0]["summary"]["metric_name"]
    task = done[0]["summary"]["task"]
    scale = done[0]["summary"]["scale"]
    commits = sorted({r["summary"]["git_commit"] for r in done})
    stem = "lr_sweep" if args.lr_sweep else "results"
    table = summary_table(rows, metric, by_lr=args.lr_sweep)
    parts = [f"# {task}: {'learning-rate sweep' if args.lr_sweep else 'results'} (scale={scale})", "",
             f"Generated by `python scripts/report.py --runs {args.runs} --out {args.out}{' --lr-sweep' if args.lr_sweep else ''}` "
             f"(report at commit {git_commit()}); runs trained at commit(s) {', '.join(commits)}.",
             *([f"The runs were made by `{args.command}`."] if args.command else []), "",
             "Mean ± half-width of the 95% Student-t confidence interval over seeds. `final` is the last step's "
             f"weights; `best {metric}` is the best rollout evaluation during training (best checkpoint); "
             "`best val loss` the lowest validation loss seen.", "", table, ""]
    if args.lr_sweep:
        parts += ["## Chosen learning rates", "",
                  f"Per optimizer, the LR with the highest mean final {metric} (the rollout metric the suite is about); "
                  "the LR with the lowest mean final validation loss is shown beside it.", "",
                  "| optimizer | LR by " + metric + " | LR by val loss |", "|---|---|---|"]
        by_opt = defaultdict(lambda: defaultdict(list))
        for row in rows:
            by_opt[row["optimizer"]][row["lr"]].append(row)
        for opt, lrs in by_opt.items():
            best_metric = max(lrs, key=lambda lr: sum(r[f"final_{metric}"] for r in lrs[lr]) / len(lrs[lr]))
            best_loss = min(lrs, key=lambda lr: sum(r["final_val_loss"] for r in lrs[lr]) / len(lrs[lr]))
            parts.append(f"| {opt} | {best_metric:g} | {best_loss:g} |")
        parts.append("")
    else:
        fig_name = "val_loss_vs_" + metric + ".png"
        figure(rows, metric, args.out / fig_name, f"{task} (scale={scale}): one point per run")
        parts += [f"![validation loss against {metric}]({fig_name})", ""]
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
    print(f"wrote {args.out / (stem + '.md')} ({len(done)} runs, {len(failed)} failed or unfinished)")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

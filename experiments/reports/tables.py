"""Markdown tables and number formats of the reports."""

from __future__ import annotations

import math
from collections import defaultdict

from ..registry import ordered
from ..stats import mean_ci, nested_bootstrap_ci


def fmt(mean: float, half: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


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


def summary_table(rows: list[dict], metric: str, by: tuple = ("optimizer",), rate: bool = False, episodes: dict | None = None,
                  horizons: dict | None = None, intervals: set = frozenset()) -> str:
    """Mean and CI over seeds, one line per value of the ``by`` columns (optimizer, lr, damping); for a
    rate metric (``rate``) its intervals come from the bootstrap over seeds and ``episodes`` (``spread``).
    ``horizons``: load.horizon_series (their columns are shown); ``intervals``: per-run interval columns (not averaged)."""
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k) for k in by)].append(row)  # a column only some runs have (beta2, momentum): blank elsewhere
    extra = [k for k in ("final_raw_val_loss", f"final_raw_{metric}") if any(k in row for row in rows)]  # EMA runs: the raw weights too
    extra += [key for points in (horizons or {}).values() for _, key in points]
    # per-run interval bounds (e.g. success_ci_low) stay in the CSV: averaged over seeds they mean nothing
    extra += sorted({k for row in rows for k in row if k.startswith(f"final_{metric}_") and k not in extra and k not in intervals})
    head = list(by) + ["seeds", "final val loss", "best val loss",
            f"final {metric}", f"best {metric}"] + [k.replace(f"final_{metric}_", f"final {metric}, ").replace("final_raw_", "raw: final ").replace("_", " ")
                                                   for k in extra]
    timed = any(row.get("wall_seconds") is not None for row in rows)  # runs from before summary.json had it: no column
    head += ["minutes per run"] if timed else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rs in groups.items():
        cells = [key[0]] + ["" if v is None else v if isinstance(v, str) else f"{v:g}" for v in key[1:]] + [str(len(rs))]
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


def other_metrics_table(rows: list[dict], metric: str) -> str:
    """Mean ± CI of every other final rollout number (e.g. class accuracy of samples)."""
    skip = {"final_val_loss", f"final_{metric}", "final_step", "final_rollout_seconds"}
    keys = sorted({k for row in rows for k in row if k.startswith("final_") and k not in skip
                   and not k.startswith(f"final_{metric}_") and isinstance(row[k], (int, float))}, key=lambda k: (len(k), k))
    if not keys:
        return ""
    head = ["optimizer", "seeds"] + [k[len("final_"):] for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for opt in ordered(r["optimizer"] for r in rows):
        rs = [r for r in rows if r["optimizer"] == opt]
        lines.append("| " + " | ".join([opt, str(len(rs))] + [fmt(*mean_ci([r[k] for r in rs if k in r]), 3) for k in keys]) + " |")
    return "\n".join(lines)


def curve_table(series: dict[str, dict[int, list[float]]], key: str) -> str:
    """Mean over seeds of one logged number at each evaluated step, one row per optimizer."""
    steps = sorted({t for per_step in series.values() for t in per_step})
    lines = [f"| {key} at step | " + " | ".join(str(t) for t in steps) + " |", "|" + "---|" * (len(steps) + 1)]
    for opt in ordered(series):
        lines.append(f"| {opt} | " + " | ".join(f"{sum(series[opt][t]) / len(series[opt][t]):.3f}" if t in series[opt] else ""
                                                for t in steps) + " |")
    return "\n".join(lines)


def last_change_table(steady: dict[str, dict], metric: str) -> str:
    """The final weights' steadiness (budget.last_change), one row per optimizer."""
    lines = [f"| optimizer | runs | SD of final {metric} over runs (seeds) | previous rollout at step | mean change to the final | "
             "largest fall to the final (run) |", "|---|---|---|---|---|---|"]
    for opt in ordered(steady):
        s = steady[opt]
        fall = f"{s['worst_fall']:.3g} ({s['worst_run']})" if s["worst_run"] else "none"
        lines.append(f"| {opt} | {s['seeds']} | {s['sd']:.3g} | {', '.join(map(str, s['steps'])) or '-'} | "
                     f"{s['mean_change']:+.3g} | {fall} |")
    return "\n".join(lines)

"""The budget axis (docs/protocol.md, "The budget axis"): targets per task, steps and training seconds to reach them
per run and per optimizer, and performance profiles across tasks, AlgoPerf style.

- The **floor** is where training starts: 0 for accuracy, success and return; for a lower-is-better metric (FD) the
  median over the base GPs' runs of their first evaluation that scored it.
- The **main target** is 90% of the way from the floor to the tuned best base GP's median final metric (the best of
  the base GPs present, X without AP), so that most of that baseline's seeds reach it; an easier one sits at 50%.
  The comparators (SOAP, one-sided Shampoo, PSGD-Kron: registry.COMPARATORS) are not base GPs: their runs in the
  headline experiment are timed against the targets but never set them, so adding them moves no one's time.
- Per run, the steps and training seconds (the loop's ``train_seconds``: no evaluation, rollout or checkpoint) of
  the first evaluation that reaches a target; a miss is infinite. Per optimizer, the median over seeds, infinite
  when more than half of them miss.
- A **performance profile** over tasks: r = t / (min over optimizers of t) per task, rho(tau) = the share of tasks
  with r <= tau; the score is the area under rho on tau in [1, 4], divided by 3 (1: fastest on every task).
Written here: AlgoPerf's scoring code is tied to its workloads and JAX/PyTorch submission API, not importable alone.
"""

from __future__ import annotations

import math
from statistics import median

from ..registry import COMPARATORS, has_ap
from .load import final_eval

FRACTIONS = {"": 0.9, "50": 0.5}  # the column suffix of each target and its share of the way from floor to baseline
TAU_MAX = 4.0


def base_gp(optimizer: str) -> bool:
    """Whether a run's optimizer sets the targets: X without AP, a comparator not."""
    return not has_ap(optimizer) and optimizer not in COMPARATORS


def floor(done: list[dict], metric: str, higher: bool) -> float:
    if higher:
        return 0.0
    def first(r):  # the run's first evaluation that scored the metric (some evaluate the validation loss only)
        return next((e["metrics"][metric] for e in r["evals"] if metric in e["metrics"]), None)

    firsts = [v for r in done if base_gp(r["optimizer"]) and (v := first(r)) is not None]
    return median(firsts) if firsts else math.nan


def targets(done: list[dict], metric: str, higher: bool) -> dict:
    """{"floor", "baseline" (the best base GP), "baseline_median", "target", "target50"}."""
    base = {}
    for r in done:
        if base_gp(r["optimizer"]):
            base.setdefault(r["optimizer"], []).append(final_eval(r)["metrics"][metric])
    if not base:
        return {}
    best = (max if higher else min)(base, key=lambda o: median(base[o]))
    lo, hi = floor(done, metric, higher), median(base[best])
    out = {"floor": lo, "baseline": best, "baseline_median": hi}
    out.update({f"target{k}": lo + f * (hi - lo) for k, f in FRACTIONS.items()})
    return out


def to_target(r: dict, metric: str, target: float, higher: bool) -> tuple[float, float]:
    """(steps, training seconds) of the run's first evaluation at or beyond ``target``; inf where it never gets there,
    nan seconds where the run predates the train_seconds field."""
    for e in r["evals"]:
        value = e["metrics"].get(metric)
        if value is not None and (value >= target if higher else value <= target):
            seconds = e.get("train_seconds")
            return float(e["step"]), (math.nan if seconds is None else float(seconds))
    return math.inf, math.inf


def run_columns(done: list[dict], metric: str, higher: bool) -> dict[str, dict]:
    """{run id: {steps_to_target, seconds_to_target, steps_to_target50, seconds_to_target50}} (empty without a base GP)."""
    t = targets(done, metric, higher)
    if not t:
        return {}
    out = {}
    for r in done:
        row = {}
        for k in FRACTIONS:
            row[f"steps_to_target{k}"], row[f"seconds_to_target{k}"] = to_target(r, metric, t[f"target{k}"], higher)
        out[r["run_id"]] = row
    return out


def light_cost(done: list[dict]) -> dict:
    """What the light rollouts (trainer.light_rollout_every) cost, measured on the runs: per run, the light rows'
    ``rollout_seconds`` over the run's wall time without them (summary ``wall_seconds`` less those seconds), i.e.
    the share they add to a run; {"runs", "median", "max"} over the runs that have light rows and a wall time
    ({} where none has). The protocol keeps it under 20% (docs/protocol.md, "The budget axis")."""
    shares = []
    for r in done:
        light = [e.get("rollout_seconds") for e in r["evals"] if e.get("light")]
        wall = r["summary"].get("wall_seconds")
        if not light or wall is None or any(s is None for s in light):
            continue
        spent = float(sum(light))
        if wall > spent:
            shares.append(spent / (wall - spent))
    return {"runs": len(shares), "median": median(shares), "max": max(shares)} if shares else {}


def optimizer_time(values: list[float]) -> float:
    """The median over seeds; infinite when more than half of the seeds miss (their values are infinite); nan when
    any seed's time is unknown (nan: a run without training seconds), which the median would place by input order."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    if sum(math.isinf(v) for v in values) * 2 > len(values):
        return math.inf
    return median(values)


def profile(times: dict[str, dict[str, float]], taus: list[float] | None = None) -> dict[str, dict]:
    """Performance profiles from {task: {optimizer: time}}: per optimizer its ratios per task, rho at each tau and
    the score (area under rho on [1, TAU_MAX] / (TAU_MAX - 1)). As in AlgoPerf's scoring, rho's denominator is every
    task given: a task where no optimizer reaches the target counts as a miss for all (it stays in the denominator,
    so adding or losing such a task moves every score alike); an optimizer missing from a task (not run there) counts
    as never reaching the target."""
    optimizers = sorted({o for ts in times.values() for o in ts})
    ratios = {o: [] for o in optimizers}
    for ts in times.values():
        best = min((v for v in ts.values() if math.isfinite(v) and v > 0), default=math.inf)
        for o in optimizers:
            v = ts.get(o, math.inf)
            ratios[o].append(v / best if math.isfinite(v) and math.isfinite(best) else math.inf)
    taus = taus or [1 + 0.01 * i for i in range(int((TAU_MAX - 1) / 0.01) + 1)]
    out = {}
    for o, rs in ratios.items():
        rho = [sum(r <= tau for r in rs) / len(rs) for tau in taus] if rs else []
        # the exact area of a step function: each task contributes (TAU_MAX - max(r, 1)) where r <= TAU_MAX
        area = sum(TAU_MAX - max(r, 1.0) for r in rs if r <= TAU_MAX) / len(rs) if rs else math.nan
        out[o] = {"ratios": rs, "taus": taus, "rho": rho, "score": area / (TAU_MAX - 1)}
    return out


def last_change(done: list[dict], metric: str, higher: bool) -> dict[str, dict]:
    """How steady the final weights are (docs/tasks/lm.md, "Version 4": the headline is the final weights, checked
    here): per optimizer, the seed SD of the final metric and, per run, the change from its previous rollout (the last
    row before the final that scored the metric, light or full) to the final. {optimizer: {"seeds", "sd", "steps"
    (the previous rollouts' steps), "mean_change", "worst_fall" (the largest move in the worse direction, 0 if none
    got worse), "worst_run"}}. A light row scores fewer of the reported instances, so its change carries that
    sample's noise too."""
    per = {}
    for r in done:
        final = final_eval(r)
        before = [e for e in r["evals"] if e["step"] < final["step"] and metric in e["metrics"]]
        if metric not in final["metrics"]:
            continue
        d = per.setdefault(r["optimizer"], {"finals": [], "changes": [], "steps": set()})
        d["finals"].append(final["metrics"][metric])
        if before:
            d["changes"].append((final["metrics"][metric] - before[-1]["metrics"][metric], r["run_id"]))
            d["steps"].add(before[-1]["step"])
    out = {}
    for opt, d in per.items():
        n, finals = len(d["finals"]), d["finals"]
        mu = sum(finals) / n
        falls = [(-c if higher else c, run) for c, run in d["changes"]]
        worst = max(falls, default=(0.0, None))
        out[opt] = {"seeds": n, "sd": math.sqrt(sum((x - mu) ** 2 for x in finals) / (n - 1)) if n > 1 else math.nan,
                    "steps": sorted(d["steps"]),
                    "mean_change": sum(c for c, _ in d["changes"]) / len(d["changes"]) if d["changes"] else math.nan,
                    "worst_fall": max(worst[0], 0.0), "worst_run": worst[1] if worst[0] > 0 else None}
    return out

#!/usr/bin/env python
"""How many seeds a comparison needs: a power calculation for each DoPr-X vs X pair of an experiment (and for a
variant DoPr-X@10, experiments/registry.py: DoPr-X@10 vs X and vs DoPr-X, secondary).

    python scripts/power.py --runs results/control/cpu
    python scripts/power.py --runs results/control/cpu --json

Per comparison (DoPr-X against X, paired by seed over the seeds both have): the number of paired seeds n,
the mean and standard deviation (SD) of the paired differences, the minimum detectable difference at this n
(a two-sided paired t-test at 0.05 with 80% power: (t(0.975, n-1) + t(0.8, n-1)) x SD / sqrt(n)), the target
MDD, and the seeds needed to reach it (the smallest n with MDD(n) <= target at this SD, counted up because t
depends on n), and the seeds to run: that number, never below the protocol's floor of 10. Only runs of the task's
current version (configs/task/<task>.yaml) are read where any exist, as on the pages; where none does, the answer is
about the newest version there and says so. The target is 10% of the task's floor-to-ceiling range (experiments/protocol.py):

    control          0.1 x expert_return (the committed expert's mean return; records' task_meta)
    lm, lm_lora      0.1 (accuracy, range 1)
    robot, robot_*   0.1 (success rate, range 1)
    flow             0.1 x (best baseline's mean FD - fd_floor): the better of adamw's and muon's mean FD, and
                     the mean of the fd_floor column (what real images of the sample's size score)

Where the seed budget (20) cannot reach the target, it says which noise source dominates the paired SD: the
seeds (between-seed variance) or the episodes / problems (the sampling variance of the pair's difference of means
over its evaluation instances, averaged over the seeds), estimated from the records' per-episode / per-problem
outcomes. The runs of a pair face the same instances in the same order (common random numbers), so that variance is
the per-instance differences' variance / n; where the instances do not align, each run's (p(1-p)/n for a rate, the
per-episode variance / n for a return) summed over the two runs, as independent draws.

It reads the records (experiments/reports/load.py), not results_runs.csv: the outcomes the noise split needs
are only there, and the numbers do not depend on the pages having been rebuilt.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import protocol, record  # noqa: E402
from experiments.registry import base_of, is_primary_pair, pairs  # noqa: E402
from experiments.reports import load  # noqa: E402
from experiments.stats import mdd_at, minimum_detectable_difference, seeds_needed  # noqa: E402

BUDGET = 20  # the most seeds a headline comparison is planned with
CAP = 100  # seeds needed are counted up to this
MIN_SEEDS = 3  # fewer paired seeds give no usable SD


class Refusal(Exception):
    """A reason the tool cannot answer; the message names the fix (exit code 2)."""


def mean(xs):
    return sum(xs) / len(xs)


def sample_var(xs):
    m = mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else math.nan


def target_mdd(task: str, rows: list[dict], done: list[dict], metric: str) -> tuple[float, str]:
    """(target MDD, how it was made) for a task (experiments/protocol.py: the rule of docs/protocol.md)."""
    expert = next((r["summary"].get("task_meta", {}).get("expert_return") for r in done
                   if (r["summary"].get("task_meta") or {}).get("expert_return") is not None), None)
    try:
        return protocol.target_mdd(task, rows, metric, expert)
    except ValueError as err:
        raise Refusal(f"{err}; or give the target with --target VALUE (in {metric}'s units)") from None


def run_outcomes(r: dict) -> list[list[float]] | None:
    """The final evaluation's per-instance outcomes of the headline metric as strata (lists in instance order), or
    None where the record has none. One stratum where the outcomes are the metric's own (control's returns, robot's
    successes); the main horizon series' strata where the metric pools them (lm's accuracy: problems of each chain
    length), when they give the metric back."""
    s = r["summary"]
    metric, last = s["metric_name"], load.final_eval(r)
    outcomes = (r.get("outcomes") or {}).get(str(last["step"])) or {}
    if metric in outcomes:
        strata = [outcomes[metric]]
    else:
        series = next(iter(load.horizon_series([r]).values()), [])
        names = [column.removeprefix("final_") for _, column in series]
        if not names or any(n not in outcomes for n in names):
            return None
        strata = [outcomes[n] for n in names]
        pooled = [x for st in strata for x in st]
        if not pooled or abs(mean(pooled) - last["metrics"][metric]) > 1e-9:
            return None  # the strata do not pool into the metric: no estimate
    return strata if sum(len(st) for st in strata) else None


def mean_variance(strata: list[list[float]], rate_formula: bool = True) -> float:
    """The sampling variance of the pooled mean over the strata's instances: per stratum p(1-p)/n for a rate (0/1
    outcomes, with ``rate_formula``), else its sample variance / n, weighted by the stratum's share squared."""
    total, var = sum(len(st) for st in strata), 0.0
    for st in strata:
        binary = rate_formula and set(st) <= {0, 1}
        v = mean(st) * (1 - mean(st)) if binary else sample_var(st)
        if math.isnan(v):
            return math.nan
        var += (len(st) / total) ** 2 * v / len(st)
    return var


def noise_split(pairs: list[tuple[dict, dict]], sd: float) -> dict:
    """The paired variance SD^2 split into the episodes' part (averaged over seeds) and the seeds' part (the rest, at
    least 0). Under common random numbers (docs/protocol.md) the two runs of a pair face the same instances in the
    same order, so where their strata align the episodes' part of a pair is the sampling variance of the mean of the
    per-instance differences (their correlation included); where they do not, the two runs are taken as independent
    draws (the sum of each run's variance of its mean)."""
    total = sd ** 2
    parts, aligned = [], 0
    for treated, control in pairs:
        a, b = run_outcomes(treated), run_outcomes(control)
        if a is None or b is None:
            return {"episodes_var": None, "seed_var": None, "dominant": "unknown",
                    "why": "the records hold no per-episode / per-problem outcomes of the metric"}
        if [len(st) for st in a] == [len(st) for st in b] and all(len(st) > 1 for st in a):
            parts.append(mean_variance([[x - y for x, y in zip(sa, sb)] for sa, sb in zip(a, b)], rate_formula=False))
            aligned += 1
        else:
            parts.append(mean_variance(a) + mean_variance(b))
    if any(math.isnan(v) for v in parts):
        return {"episodes_var": None, "seed_var": None, "dominant": "unknown", "why": "a stratum with one instance has no variance"}
    episodes = mean(parts)
    seed = max(total - episodes, 0.0)
    return {"episodes_var": episodes, "seed_var": seed, "dominant": "seed" if seed >= episodes else "episodes",
            "episodes_var_over_paired_var": episodes / total if total > 0 else math.nan, "paired_instances": aligned == len(pairs)}


def comparisons(done: list[dict], target: float, budget: int, cap: int) -> list[dict]:
    rows, by_id = load.per_run_rows(done), {r["run_id"]: r for r in done}
    metric = done[0]["summary"]["metric_name"]
    by_opt = defaultdict(dict)
    for row in rows:
        if int(row["seed"]) in by_opt[row["optimizer"]]:
            raise Refusal(f"{row['optimizer']} has more than one run with seed {int(row['seed'])} (a sweep of settings): power pairs "
                          "one run per optimizer and seed; point --runs at an evaluation experiment such as results/<task>/cpu")
        by_opt[row["optimizer"]][int(row["seed"])] = row
    out = []
    for t_name, c_name in pairs(by_opt):
        treated, control = by_opt[t_name], by_opt[c_name]
        seeds = sorted(set(treated) & set(control))
        diffs = [treated[s][f"final_{metric}"] - control[s][f"final_{metric}"] for s in seeds]
        c = {"comparison": f"{t_name} vs {c_name}", "base": base_of(t_name), "primary": is_primary_pair(t_name, c_name), "n": len(seeds),
             "seeds": seeds, "target_mdd": target}
        if len(seeds) < MIN_SEEDS:
            c["note"] = (f"only {len(seeds)} paired seed{'s' if len(seeds) != 1 else ''}: the SD of the differences needs at least "
                         f"{MIN_SEEDS}; run more seeds of both (e.g. seed=0,1,2)")
            out.append(c)
            continue
        sd = math.sqrt(sample_var(diffs))
        need = seeds_needed(sd, target, cap)
        c.update({"mean_diff": mean(diffs), "sd": sd, "mdd": minimum_detectable_difference(diffs), "seeds_needed": need,
                  # the plan's seed count: what power asks for, never below the protocol's floor of 10
                  "seeds_to_run": None if need is None else max(need, protocol.MIN_EVAL_SEEDS),
                  "mdd_at_budget": mdd_at(sd, budget), "reaches_target_within_budget": need is not None and need <= budget})
        c["noise"] = noise_split([(by_id[treated[s]["run"]], by_id[control[s]["run"]]) for s in seeds], sd)
        if not c["reaches_target_within_budget"]:
            split = c["noise"]
            where = ("the seeds dominate (between-seed variance {seed_var:.3g} against {episodes_var:.3g} from the episodes / "
                     "instances): only more seeds or a steadier training narrow it" if split["dominant"] == "seed" else
                     "the episodes / instances dominate ({episodes_var:.3g} against {seed_var:.3g} between seeds): more "
                     "evaluation episodes / problems per run narrow it" if split["dominant"] == "episodes" else
                     "which noise dominates is not known: " + split.get("why", ""))
            c["note"] = f"{budget} seeds cannot reach the target (MDD at {budget}: {c['mdd_at_budget']:.3g}); " + where.format(**split)
        out.append(c)
    return out


def analyse(runs: Path, target: float | None = None, budget: int = BUDGET, cap: int = CAP, configs: Path = ROOT / "configs" / "task") -> dict:
    runs = Path(runs)
    if not (runs / record.RECORDS).exists():
        hint = "" if runs.exists() else " (no such folder)"
        raise Refusal(f"no records at {runs / record.RECORDS}{hint}: give an experiment folder, results/<task>/<experiment> "
                      f"(e.g. --runs results/control/cpu), or add run folders to it with "
                      f"`python -m experiments.record add runs/<task>/<experiment> {runs}`")
    try:
        done, _ = load.load_runs(runs)
    except record.RecordError as err:
        raise Refusal(str(err)) from None
    if not done:
        raise Refusal(f"no finished run in {runs}: run the experiment first (see docs/experiments.md)")
    s = done[0]["summary"]
    task, metric = s["task"], s["metric_name"]
    # one task version, as on the pages (scripts/report.py): the current one where it has runs, else the newest there
    # is (and the answer says so); an older version's runs are neither paired with the new ones nor read for the target
    now, version = load.current_version(configs, task), load.task_version
    versions = sorted({version(r) for r in done})
    keep = now if now in versions else versions[-1]  # the current version, else the newest there is
    done = [r for r in done if version(r) == keep]
    stale = (f"these runs are of task version {keep}; the task is at version {now} (configs/task/{task}.yaml): the "
             f"numbers describe the older version") if now is not None and keep != now else None
    if target is None:
        target, rule = target_mdd(task, load.per_run_rows(done), done, metric)
    else:
        rule = "given with --target"
    return {"runs": str(runs), "task": task, "metric": metric, "higher_is_better": s.get("higher_is_better", True),
            "target_mdd": target, "target_rule": rule, "budget": budget, "cap": cap, "alpha": 0.05, "power": 0.8,
            "min_seeds": protocol.MIN_EVAL_SEEDS, "task_version": now, "superseded": stale,
            "comparisons": comparisons(done, target, budget, cap)}


def finite(x):
    """JSON has no nan: None in its place."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def g(x, digits=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def table(result: dict) -> str:
    lines = [f"{result['runs']}: task {result['task']}, metric {result['metric']} "
             f"({'higher' if result['higher_is_better'] else 'lower'} is better); paired t-test at 0.05, 80% power",
             f"target MDD {g(result['target_mdd'])} = {result['target_rule']}", ""]
    head = ["comparison", "n", "mean diff", "paired SD", "MDD now", "target", "seeds needed", f"to run (>= {result['min_seeds']})",
            "dominant noise (seed / episodes var)"]
    body = []
    for c in result["comparisons"]:
        if "sd" not in c:
            body.append([c["comparison"], str(c["n"]), "-", "-", "-", g(c["target_mdd"]), "-", "-", "-"])
            continue
        need = str(c["seeds_needed"]) if c["seeds_needed"] is not None else f"more than {result['cap']}"
        n = c["noise"]
        noise = f"{n['dominant']} ({g(n['seed_var'])} / {g(n['episodes_var'])})" if n["dominant"] != "unknown" else "unknown"
        run = str(c["seeds_to_run"]) if c["seeds_to_run"] is not None else need
        body.append([c["comparison"], str(c["n"]), f"{c['mean_diff']:+.3g}", g(c["sd"]), g(c["mdd"]), g(c["target_mdd"]), need, run, noise])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    lines += [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
    notes = [f"- {c['comparison']}: {c['note']}" for c in result["comparisons"] if c.get("note")]
    if result.get("superseded"):
        notes.insert(0, f"- warning: {result['superseded']}")
    if not result["comparisons"]:
        notes.append("- no DoPr-X with its X in these runs: nothing to compare")
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="an experiment folder: results/<task>/<experiment>")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--target", type=float, default=None, help="the target MDD in the metric's units (default: the task's rule)")
    parser.add_argument("--budget", type=int, default=BUDGET, help=f"the seed budget (default {BUDGET})")
    parser.add_argument("--max-seeds", type=int, default=CAP, help=f"count seeds needed up to this (default {CAP})")
    args = parser.parse_args(argv)
    try:
        result = analyse(args.runs, args.target, args.budget, args.max_seeds)
    except Refusal as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(finite(result), indent=2, allow_nan=False) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The cross-task summary: results/README.md, generated (never hand-edited) from the per-task
pages that scripts/report.py rebuilt from the records (results/<task>/<experiment>/results_runs.csv,
tuning_runs.csv and their *_meta.json), so it needs no run folders and runs on a fresh clone.

    python scripts/summary.py                    # = make report
    python scripts/summary.py --results results --out results/README.md

The headline is the comparison protocol's primary family: DoPr-AdamW vs AdamW and DoPr-Muon vs Muon per
task in results/<task>/cpu, Holm-adjusted across all tasks (one family). For every task and base GP: did AP change the rollout metric and the validation loss (paired
over seeds: mean difference, 95% CI, paired t-test)? Secondary and unadjusted: DoPr-AdamW and DoPr-Muon against each
comparator (SOAP, one-sided Shampoo, PSGD-Kron) whose runs are in results/<task>/cpu. For every tuning: which trial validation loss
picks, which the rollout metric picks, and what picking by validation loss costs; Spearman rank
correlation between validation loss and the rollout metric per optimizer.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import protocol  # noqa: E402
from experiments.checkpoint import atomic_write_text  # noqa: E402
from experiments.registry import COMPARATORS, base_of, display, is_primary_pair, pair_rank, pairs, variant_suffix  # noqa: E402
from experiments.reports import budget, crosstask  # noqa: E402
from experiments.reports.crosstask import version_note  # noqa: E402
from experiments.reports.load import current_version  # noqa: E402
from experiments.stats import bootstrap_ci, holm, iqm, mean_ci, minimum_detectable_difference, paired, probability_of_improvement, selection, spearman  # noqa: E402



def read_csv(path: Path) -> list[dict]:
    def num(v):
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        return [{k: num(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def superseded(entry: dict, configs: Path | None) -> tuple[list[int], int] | None:
    """(the runs' task versions, the task's version now) when none of an experiment's runs is of the task's current
    version (docs/protocol.md: the headline counts current task versions only), else None."""
    now = current_version(configs, entry["meta"]["task"])
    versions = sorted({int(float(r["task_version"])) for r in entry["runs"] if r.get("task_version") not in (None, "")})
    return (versions, now) if now is not None and versions and now not in versions else None


def load(results: Path, include_smoke: bool = False, configs: Path | None = None) -> list[dict]:
    """[{meta, runs, sweep (the tuning's meta, runs) or None, folder, superseded}] for every results/<task>/<experiment>/
    report (scale=smoke folders, which are not committed, only with ``include_smoke``); ``superseded`` against the task
    configs in ``configs`` (configs/task/)."""
    out = []
    for meta_path in sorted(results.glob("*/*/results_meta.json")):
        folder = meta_path.parent
        if folder.name == "smoke" and not include_smoke:
            continue
        meta = json.loads(meta_path.read_text())
        entry = {"meta": meta, "runs": read_csv(folder / "results_runs.csv"), "folder": folder, "sweep": None}
        if (folder / "tuning_meta.json").exists():
            entry["sweep"] = (json.loads((folder / "tuning_meta.json").read_text()), read_csv(folder / "tuning_runs.csv"))
        entry["superseded"] = superseded(entry, configs)
        out.append(entry)
    return out


def fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}g}" if digits < 0 else f"{x:.{digits}f}"


def verdict(diff: dict, better_sign: int) -> str:
    """'better' / 'worse' when the 95% CI of the paired difference excludes 0, else 'no difference'."""
    if diff["n"] < 2 or math.isnan(diff["ci"]):
        return "too few seeds"
    low, high = diff["mean"] - diff["ci"], diff["mean"] + diff["ci"]
    if low > 0 or high < 0:
        return "**better**" if (diff["mean"] > 0) == (better_sign > 0) else "**worse**"
    return "no difference"


def comparisons(entry: dict) -> list[dict]:
    """The paired comparisons of the registry's pairs (experiments/registry.py: DoPr-X vs X, and a variant such as
    DoPr-X@10 vs X and vs DoPr-X), computed once per entry: the bootstraps are the cost."""
    if "comparisons" not in entry:
        entry["comparisons"] = _comparisons(entry)
    return entry["comparisons"]


def _comparisons(entry: dict) -> list[dict]:
    meta, runs = entry["meta"], entry["runs"]
    metric_key = f"final_{meta['metric']}"
    sign = 1 if meta["higher_is_better"] else -1
    by_opt = defaultdict(dict)
    for r in runs:
        by_opt[r["optimizer"]][int(r["seed"])] = r
    rows = []
    for t_name, c_name in pairs(by_opt):
        treated, control = by_opt[t_name], by_opt[c_name]
        d_metric = paired({s: r[metric_key] for s, r in treated.items()}, {s: r[metric_key] for s, r in control.items()})
        d_loss = paired({s: r["final_val_loss"] for s, r in treated.items()}, {s: r["final_val_loss"] for s, r in control.items()})
        keys = d_metric["seeds"]
        # every column of the row on the same seeds as the difference (the paired ones; all of each where none pair)
        x = [control[k][metric_key] for k in keys] if keys else [r[metric_key] for r in control.values()]
        dx = [treated[k][metric_key] for k in keys] if keys else [r[metric_key] for r in treated.values()]
        rows.append({"base": base_of(t_name), "treated": t_name, "control": c_name, "primary_pair": is_primary_pair(t_name, c_name),
                     "ap_vs_x": c_name == base_of(t_name), "metric": d_metric, "loss": d_loss, "metric_verdict": verdict(d_metric, sign),
                     # rliable's estimators: IQM of each, P(DoPr-X beats X) on a run, both with stratified-bootstrap 95% intervals
                     "iqm": (bootstrap_ci(iqm, x), bootstrap_ci(iqm, dx)),
                     "poi": bootstrap_ci(probability_of_improvement, [sign * v for v in dx], [sign * v for v in x]),
                     "mdd": minimum_detectable_difference([treated[k][metric_key] - control[k][metric_key] for k in keys]),
                     "loss_verdict": verdict(d_loss, -1),
                     "base_mean": mean_ci(x)[0], "dopr_mean": mean_ci(dx)[0]})
    return rows


def ci_text(d: dict, digits: int = 4) -> str:
    if d["n"] == 0:
        return "n/a"
    if math.isnan(d["ci"]):
        return f"{d['mean']:+.{digits}f}"
    return f"{d['mean']:+.{digits}f} [{d['mean'] - d['ci']:+.{digits}f}, {d['mean'] + d['ci']:+.{digits}f}]"


def interval_text(estimate: tuple[float, float, float], digits: int = 4) -> str:
    point, low, high = estimate
    return f"{point:.{digits}g} [{low:.{digits}g}, {high:.{digits}g}]"


def mdd_text(mdd: float) -> str:
    return "n/a" if math.isnan(mdd) else f"{mdd:.3g}"


def p_text(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3f}"


PRIMARY_EXPERIMENT = "cpu"  # in each task's headline experiment, results/<task>/cpu (current task version)
EQUAL_TIME = "cpu_equal_time"  # its equal-time arms: cpu_equal_time (X for DoPr-X's time), cpu_equal_time_k10 (for DoPr-X@10's)
ALPHA = 0.05  # a comparison is better or worse when its Holm-adjusted p is below this (docs/protocol.md)
PRIMARY_BASES = ("adamw", "muon")  # the primary family's X, per task: DoPr-X vs X


def primary_family(entries: list[dict]) -> dict:
    """The comparison protocol's primary family, declared in advance (docs/protocol.md): per task of
    crosstask.PRIMARY_TASKS, DoPr-AdamW vs AdamW and DoPr-Muon vs Muon on the final rollout metric in
    results/<task>/cpu, Holm-adjusted as one family of all 10. A declared comparison without a test yet (no current
    runs, runs of an earlier task version, fewer than 2 paired seeds) counts at p = 1 in the adjustment, so the
    family's size never shrinks to the comparisons run so far (which would make Holm less strict than declared).
    Returns {"tested": [(entry, comparison, adjusted p)], "untested": [(entry, comparison)], "superseded": [(entry,
    comparison)], "missing": ["<task> DoPr-X"], "size": 10} in the order of the entries."""
    tested, untested, stale, seen = [], [], [], set()
    for e in entries:
        if e["folder"].name != PRIMARY_EXPERIMENT or e["meta"]["task"] not in crosstask.PRIMARY_TASKS:
            continue
        for c in comparisons(e):
            if not c["primary_pair"]:  # other GPs and DoPr-X@10 (experiments/registry.py) are secondary
                continue
            seen.add((e["meta"]["task"], c["base"]))
            if e.get("superseded"):  # runs of an earlier task version: shown, never tested
                stale.append((e, c))
            else:
                (tested if c["metric"]["n"] >= 2 and not math.isnan(c["metric"]["p"]) else untested).append((e, c))
    declared = [(t, b) for t in crosstask.PRIMARY_TASKS for b in PRIMARY_BASES]
    ps = [c["metric"]["p"] for _, c in tested]
    adjusted = holm(ps + [1.0] * (len(declared) - len(ps)))[:len(ps)]
    return {"tested": [(e, c, q) for (e, c), q in zip(tested, adjusted)], "untested": untested, "superseded": stale,
            "missing": [f"{t} {display('dopr_' + b)}" for t, b in declared if (t, b) not in seen], "size": len(declared)}


def family_key(e: dict, c: dict) -> tuple:
    return (str(e["folder"]), c["treated"], c["control"])


def gp_cell(c: dict) -> str:
    """The GP column: X for DoPr-X vs X, the pair's names for a variant's comparisons (DoPr-X@10 vs X, vs DoPr-X)."""
    return c["base"] if c["treated"] == f"dopr_{c['base']}" and c["ap_vs_x"] else f"{c['treated']} vs {c['control']}"


def equal_time_cell(e: dict, c: dict, equal_time: dict) -> str:
    """DoPr-X (or DoPr-X@10) minus X given its measured training time, paired by seed: X's runs from the arm that
    equalised that optimizer (`<task>/cpu_equal_time`, `<task>/cpu_equal_time_k10`: scripts/equal_time.py)."""
    arm = equal_time.get((e["meta"]["task"], variant_suffix(c["treated"]))) if c["ap_vs_x"] else None
    if arm is None:
        return "not run" if c["ap_vs_x"] else "n/a"
    if arm.get("superseded") or e.get("superseded"):  # the arm or the headline of an earlier task version
        return "superseded"
    key, version = f"final_{e['meta']['metric']}", lambda r: r.get("task_version")
    d_rows = {int(float(r["seed"])): r for r in e["runs"] if r["optimizer"] == c["treated"]}
    d = {s: float(r[key]) for s, r in d_rows.items()}
    # paired by seed and task version: an arm run of another version than the headline run it faces is no pair
    x = {int(float(r["seed"])): float(r[key]) for r in arm["runs"] if r["optimizer"] == c["control"]
         and int(float(r["seed"])) in d_rows and version(r) == version(d_rows[int(float(r["seed"]))])}
    return ci_text(paired(d, x), 3) if set(x) & set(d) else "not run"


def target_of(e: dict) -> float:
    """The task's target MDD (experiments/protocol.py: 10% of its floor-to-ceiling range), nan where its runs cannot
    give it (no expert_return in a control page's meta, no fd_floor column on flow)."""
    m = e["meta"]
    try:
        return protocol.target_mdd(m["task"], e["runs"], m["metric"], m.get("expert_return"))[0]
    except ValueError:
        return math.nan


def reading(e: dict, c: dict, q: float) -> str:
    """docs/protocol.md: better or worse when the Holm-adjusted p is below 0.05 (in the direction of the mean paired
    difference); otherwise "no difference" is a finding only when the MDD reaches the task's target, and "the
    instrument cannot tell" when it does not."""
    if q < ALPHA:
        return "**better**" if (c["metric"]["mean"] > 0) == bool(e["meta"]["higher_is_better"]) else "**worse**"
    target = target_of(e)
    if math.isnan(c["mdd"]) or math.isnan(target):
        return "no test of power (no MDD or target)"
    return "no difference (MDD within target)" if c["mdd"] <= target else "the instrument cannot tell (MDD above target)"


def headline(entries: list[dict], family: dict) -> list[str]:
    """The paragraph the front README quotes: the primary family, Holm-adjusted, then every paired comparison."""
    tested = family["tested"]
    significant = [(e, c, q) for e, c, q in tested if q < ALPHA]
    name = lambda e, c: f"{e['meta']['task']} {display(c['treated'])}"  # noqa: E731
    parts = ["## Headline (the primary family)", "",
             f"Primary family (the comparison protocol, version 3): per task, DoPr-AdamW vs AdamW and DoPr-Muon vs Muon on the "
             f"final rollout metric at the task's step budget, in each task's headline experiment (`<task>/{PRIMARY_EXPERIMENT}`); "
             f"paired t-tests over seeds, Holm-adjusted across all tasks as one family of the {family['size']} declared in advance, "
             f"where a comparison not tested yet counts at p = 1. {len(tested)} of the {family['size']} tested; "
             f"{len(significant)} significant after Holm (adjusted p below {ALPHA})"
             + (": " + ", ".join(f"{name(e, c)} ({'better' if (c['metric']['mean'] > 0) == bool(e['meta']['higher_is_better']) else 'worse'}, "
                                 f"adjusted p {q:.3f})" for e, c, q in significant) if significant else "") + "."
             + (" Not tested yet, counted at p = 1 (fewer than 2 paired seeds): " + ", ".join(f"{name(e, c)} ({c['metric']['n']} seed{'s' if c['metric']['n'] != 1 else ''})"
                                                                                        for e, c in family["untested"]) + "." if family["untested"] else "")
             + (" Not tested yet, counted at p = 1 (runs of an earlier task version, shown in the tables but superseded until the "
                "task's new version is tuned, `make tune-<task>`, and evaluated, `make reproduce-<task>`): " + ", ".join(f"{name(e, c)}{version_note(e)}" for e, c in family["superseded"]) + "."
                if family["superseded"] else "")
             + (" Not run yet, counted at p = 1: " + ", ".join(family["missing"]) + "." if family["missing"] else ""),
             "", "| task | comparison | seeds | metric | difference (DoPr-X minus X) | raw p | adjusted p (Holm) | MDD (target) | reading |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e, c, q in tested:
        m = e["meta"]
        parts.append(f"| {m['task']} | {display(c['treated'])} vs {display(c['control'])} | {c['metric']['n']} | "
                     f"{m['metric']} ({'higher' if m['higher_is_better'] else 'lower'} is better) | {c['metric']['mean']:+.4g} | "
                     f"{p_text(c['metric']['p'])} | {p_text(q)} | {mdd_text(c['mdd'])} ({mdd_text(target_of(e))}) | {reading(e, c, q)} |")
    verdicts = [c["metric_verdict"] for e in entries for c in comparisons(e) if c["ap_vs_x"]]  # not DoPr-X@10 vs DoPr-X
    few = verdicts.count("too few seeds")  # one seed (e.g. robot_image's one-seed table): no interval, not counted
    verdicts = [v for v in verdicts if v != "too few seeds"]
    better, worse = verdicts.count("**better**"), verdicts.count("**worse**")
    parts += ["", f"Unadjusted, over all {len(verdicts)} paired DoPr-X vs X comparisons on the rollout metric ({len(entries)} results "
              f"folders, secondary GPs included), the 95% t-interval over seeds excluded 0 in favour of DoPr in {better}, against it "
              f"in {worse}, and included 0 in {len(verdicts) - better - worse}." + (f" Left out: {few} with one seed (no interval)." if few else "")
              + (f" Superseded task versions included: {', '.join(sorted({e['meta']['task'] for e in entries if e.get('superseded')}))}."
                 if any(e.get("superseded") for e in entries) else ""), ""]
    return parts


VARIANT_NOTE = (" Rows named `dopr_<X>_k10 vs ...` are DoPr-X@10 (AP's statistic refreshed every 10 steps, secondary): against X, "
                "and against DoPr-X, where the X column holds DoPr-X's mean and there is no equal-time arm; against X at equal "
                "time, X ran for DoPr-X@10's measured training time (`<task>/cpu_equal_time_k10`).")


def verdict_table(entries: list[dict], family: dict, equal_time: dict) -> list[str]:
    """The front door: one row per task and base GP of the headline experiments."""
    adjusted = {family_key(e, c): q for e, c, q in family["tested"]}
    lines = ["## Verdicts", "",
             "DoPr-X against X on each task's final rollout metric at equal steps (paired by seed, 95% t-interval), the "
             "Holm-adjusted p over the primary family (docs/protocol.md; other GPs are secondary), the same comparison at "
             "equal training time where that arm has run (X given DoPr-X's measured training time, `<task>/cpu_equal_time`), "
             "and whether validation loss and the metric agree on the task (Spearman over its tuning runs, \"Loss versus "
             "performance\" below). A task marked with an earlier version ran before its current calibration: its rows "
             "are shown but are not in the primary family (\"superseded\")." + (VARIANT_NOTE if any(not c["primary_pair"] and c["treated"] != f"dopr_{c['base']}"
                                                          for e in entries for c in comparisons(e)) else ""), "",
             "| task | GP | X | DoPr-X | difference [95% CI] | adjusted p (Holm) | at equal time | loss and metric |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        m = e["meta"]
        rho, reading = crosstask.agreement(e)
        for c in comparisons(e):
            q = adjusted.get(family_key(e, c))
            holm_p = p_text(q) if q is not None else ("superseded" if e.get("superseded") else "n/a") if c["primary_pair"] else "secondary"
            lines.append(f"| [{m['task']}]({m['task']}/cpu/results.md){version_note(e)} | {gp_cell(c)} | {c['base_mean']:.4g} | {c['dopr_mean']:.4g} | "
                         f"{ci_text(c['metric'], 3)} | {holm_p} | {equal_time_cell(e, c, equal_time)} | {reading}" + ("" if math.isnan(rho) else f" ({rho:+.2f})") + " |")
    return lines + [""]


SECONDARY_REFERENCES = ("dopr_adamw", "dopr_muon")  # docs/protocol.md: each comparator against DoPr-AdamW and DoPr-Muon


def seconds_cell(runs: list[dict]) -> str:
    """The median over seeds of the training seconds to the main target (budget.optimizer_time): `never` when more
    than half miss, n/a where the records carry no training seconds."""
    values = [float(r.get("seconds_to_target", math.nan)) for r in runs]
    t = budget.optimizer_time(values) if values and not any(math.isnan(v) for v in values) else math.nan
    return "never" if math.isinf(t) else "n/a" if math.isnan(t) else f"{t:.0f}"


def comparator_table(entries: list[dict]) -> list[str]:
    """The secondary comparison (docs/protocol.md, "Secondary comparisons"): per task, DoPr-AdamW and DoPr-Muon against
    each comparator whose runs are in the headline experiment, paired by seed within one task version (the same
    instances), unadjusted; a task without them says so in one line."""
    lines = ["## Secondary: DoPr-X against the comparators", "",
             "What a user would pick instead of DoPr (docs/protocol.md, \"Secondary comparisons\"; docs/comparators.md): SOAP "
             "(`soap`), one-sided Shampoo on the input side (`shampoo_input`) and PSGD-Kron (`psgd_kron`) at their tuned "
             "settings, run into each task's headline experiment (`<task>/cpu`) on its evaluation seeds and instances. At equal "
             "steps: DoPr-X minus the comparator on the final rollout metric, paired by seed (runs of one task version only), "
             "mean [95% t-interval], the paired t-test's p, **unadjusted and secondary** (outside the Holm family and the "
             "headline), and the MDD. At equal time: each one's median training seconds to the task's main target (\"Time to "
             "target\" below; `never` when more than half of the seeds miss, n/a where the records carry no training seconds).", ""]
    rows, idle = [], []
    for e in entries:
        m, key, sign = e["meta"], f"final_{e['meta']['metric']}", 1 if e["meta"]["higher_is_better"] else -1
        by = defaultdict(dict)
        for r in e["runs"]:
            by[r["optimizer"]][(int(float(r["seed"])), int(float(r.get("task_version", 1))))] = r
        both = [(d, c) for d in SECONDARY_REFERENCES for c in COMPARATORS if by.get(d) and by.get(c)]
        if not both:
            if m["task"] in crosstask.PRIMARY_TASKS or any(c in by for c in COMPARATORS):
                idle.append(f"- {m['task']}: not run yet (" + ("no DoPr-AdamW or DoPr-Muon runs" if any(c in by for c in COMPARATORS)
                                                              else "no comparator runs") + f" in `{m['task']}/cpu`).")
            continue
        for d, c in both:
            diff = paired({k: r[key] for k, r in by[d].items()}, {k: r[key] for k, r in by[c].items()})
            if diff["n"] == 0:
                versions = lambda o: "/".join(sorted({str(k[1]) for k in by[o]}))  # noqa: E731
                rows.append(f"| {m['task']} | {display(d)} | {c} | 0 | {m['metric']} | | | not paired: task version {versions(d)} "
                            f"against {versions(c)} | | | | |")
                continue
            keys = diff["seeds"]
            mdd = minimum_detectable_difference([by[d][k][key] - by[c][k][key] for k in keys])
            rows.append(f"| {m['task']} | {display(d)} | {c} | {diff['n']} | {m['metric']} ({'higher' if sign > 0 else 'lower'} is better) | "
                        f"{mean_ci([by[d][k][key] for k in keys])[0]:.4g} | {mean_ci([by[c][k][key] for k in keys])[0]:.4g} | "
                        f"{ci_text(diff, 3)} | {p_text(diff['p'])} | {mdd_text(mdd)} | {verdict(diff, sign)} | "
                        f"{seconds_cell([by[d][k] for k in keys])} / {seconds_cell([by[c][k] for k in keys])} |")
    if rows:
        lines += ["| task | DoPr-X | comparator | seeds | metric | DoPr-X | comparator | difference (DoPr-X minus comparator) [95% CI] | "
                  "p (unadjusted, secondary) | MDD | at equal steps | seconds to the main target (DoPr-X / comparator) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    return lines + idle + ([""] if idle else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="the results folder (results/<task>/<scale>/)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: <results>/README.md)")
    parser.add_argument("--include-smoke", action="store_true", help="also summarise results/<task>/smoke/ (skipped by default)")
    parser.add_argument("--configs", type=Path, default=None,
                        help="the task configs whose `version` marks older runs as superseded (default: configs/task/ of the "
                             "checkout the results folder sits in; none there: nothing is marked)")
    args = parser.parse_args(argv)
    out = args.out or args.results / "README.md"
    configs = args.configs or args.results.resolve().parent / "configs" / "task"
    entries = load(args.results, args.include_smoke, configs if configs.is_dir() else None)
    if not entries:
        parser.error(f"no per-task report under {args.results} (results/<task>/<scale>/results_meta.json): "
                     "run a make reproduce-<task> first, or scripts/report.py on its run folders")
    others = [e for e in entries if e["folder"].name != PRIMARY_EXPERIMENT and not e["folder"].name.startswith(EQUAL_TIME)]
    # the equal-time arms (scripts/equal_time.py): {(task, "" or a variant's suffix such as "k10"): entry}
    equal_time = {(e["meta"]["task"], e["folder"].name.removeprefix(EQUAL_TIME).lstrip("_")): e for e in entries
                  if e["folder"].name.startswith(EQUAL_TIME)}
    entries = [e for e in entries if e["folder"].name == PRIMARY_EXPERIMENT]  # the headline experiments; the rest is linked below
    family = primary_family(entries)
    adjusted = {family_key(e, c): q for e, c, q in family["tested"]}
    untested = {family_key(e, c) for e, c in family["untested"]}
    parts = ["# Results across tasks", "",
             "Generated by `make report` (`python scripts/summary.py`) from the per-task reports in this folder; "
             "do not edit by hand. Each task's folder holds its table, per-run CSV, figures and the command that made them.", "",
             *verdict_table(entries, family, equal_time),
             *headline(entries, family),
             "## Did AP help? (DoPr-X against X, paired by seed)", "",
             "Differences are DoPr-X minus X on the final weights, paired over the seeds both have: mean, 95% t-interval "
             "[low, high], and the two-sided paired t-test p-value. 'better'/'worse' means the interval excludes 0 "
             "(in the direction that is better for that quantity: higher accuracy, lower FD, lower loss); with 3 seeds "
             "only large effects can show. Beside them, rliable's estimators (written in experiments/stats.py): the "
             "interquartile mean of each over seeds and P(DoPr-X > X), the probability that a DoPr-X run beats an X run "
             "on the metric, with stratified-bootstrap 95% intervals (2000 replicates; with 3 seeds these intervals are "
             "coarse); and the minimum detectable difference (MDD): the true paired difference the t-test would detect "
             "with 80% power at these seeds' spread. 'adjusted p (Holm)' is the metric's p-value adjusted over the primary family "
             "(the headline); comparisons outside it (other base GPs, other experiments) are 'secondary' and not adjusted.", "",
             "| task | results folder | base GP | seeds | metric | X | DoPr-X | difference in metric [95% CI] | p | adjusted p (Holm) | AP on metric | "
             "MDD | IQM X [95% CI] | IQM DoPr-X [95% CI] | P(DoPr-X > X) [95% CI] | "
             "difference in val loss [95% CI] | p | AP on val loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        m = e["meta"]
        for c in comparisons(e):
            key = family_key(e, c)
            holm_p = (p_text(adjusted[key]) if key in adjusted else "n/a (not tested)" if key in untested
                      else "superseded" if e.get("superseded") and c["primary_pair"] else "secondary")
            parts.append(f"| [{m['task']}]({e['folder'].relative_to(args.results)}/results.md) | {e['folder'].name} | {gp_cell(c)} | "
                         f"{c['metric']['n']} | {m['metric']} ({'higher' if m['higher_is_better'] else 'lower'} is better) | "
                         f"{c['base_mean']:.4g} | {c['dopr_mean']:.4g} | {ci_text(c['metric'])} | {p_text(c['metric']['p'])} | {holm_p} | "
                         f"{c['metric_verdict']} | {mdd_text(c['mdd'])} | "
                         f"{interval_text(c['iqm'][0])} | {interval_text(c['iqm'][1])} | {interval_text(c['poi'], 2)} | "
                         f"{ci_text(c['loss'])} | {p_text(c['loss']['p'])} | {c['loss_verdict']} |")
    parts += ["", *comparator_table(entries), *crosstask.time_to_target(entries), *crosstask.performance_profiles(entries, out.parent),
              *crosstask.loss_versus_performance(entries)]
    for e in entries:
        name = crosstask.delta_figure(e, out.parent)
        if name:
            parts += [f"![{e['meta']['task']}: DoPr-X minus X, validation loss against metric, per seed]({name})", ""]
    parts += ["", "### Does validation loss pick the model the rollout metric would pick?", "",
              "Over each optimizer's tuning trials (the same number of trials for every optimizer; a trial is a learning rate "
              "and the optimizer's own hyperparameter, its mean over the tuning seeds): the trial with the lowest mean final "
              "validation loss, the trial with the best mean rollout metric, and the regret of choosing by validation loss (the "
              "rollout metric given up, in its units). Spearman's rank correlation between final validation loss and the final "
              "rollout metric over the tuning runs and over the evaluation (seed) runs: negative means lower loss goes with "
              "higher metric; for a lower-is-better metric such as FD a positive sign means the two agree.", "",
              "| task | optimizer | trials | by val loss (lr, hp) | by metric (lr, hp) | metric at val-loss choice | metric at metric choice | regret | Spearman (tuning runs) | Spearman (seed runs) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        if not e["sweep"]:
            continue
        sweep_meta, sweep_runs = e["sweep"]
        key = f"final_{sweep_meta['metric']}"
        by_opt, seed_runs = defaultdict(list), defaultdict(list)
        for r in sweep_runs:
            by_opt[r["optimizer"]].append(r)
        for r in e["runs"]:
            seed_runs[r["optimizer"]].append(r)
        for opt in sorted(by_opt, key=pair_rank):
            rs = by_opt[opt]
            sel = selection(rs, key, sweep_meta["higher_is_better"], by=lambda r: (r["lr"], r.get("damping", r.get("weight_decay"))))
            rho = spearman([r["final_val_loss"] for r in rs], [r[key] for r in rs])
            own = seed_runs.get(opt, [])
            rho_seeds = spearman([r["final_val_loss"] for r in own], [r[key] for r in own]) if own else math.nan
            pick = lambda t: f"{t[0]:g}, {t[1]:g}" if t[1] is not None else f"{t[0]:g}"  # noqa: E731
            parts.append(f"| {sweep_meta['task']} | {opt} | {sel['settings']} | {pick(sel['by_loss'])} | {pick(sel['by_metric'])} | "
                         f"{sel['metric_at_loss_choice']:.4g} | {sel['metric_at_metric_choice']:.4g} | {sel['regret']:.4g} | "
                         f"{'n/a' if math.isnan(rho) else f'{rho:+.2f}'} | {'n/a' if math.isnan(rho_seeds) else f'{rho_seeds:+.2f}'} |")
    if others:
        parts += ["", "## Other experiments", "", "Not part of the comparison protocol's family; each page says what it is.", ""]
        parts += [f"- [{e['folder'].relative_to(args.results)}]({e['folder'].relative_to(args.results)}/results.md): {e['meta']['runs']} runs"
                  + (f", made by `{e['meta']['command']}`" if e["meta"].get("command") else "") for e in others]
    parts += ["", "## Figures per task", ""]
    for e in entries:
        m, rel = e["meta"], e["folder"].relative_to(args.results)
        parts += [f"### {m['task']} ({rel})", "",
                  f"Runs: {m['runs']}" + (f"; failed or unfinished: {len(m['failed'])} (listed in [{rel}/results.md]({rel}/results.md))" if m["failed"] else "")
                  + f". Made by `{m.get('command') or 'see the task report'}`.", ""]
        diagnostics = [(p.name, f"{p.name.split('_vs_')[0].replace('_', ' ')} against {m['metric']}")
                       for p in sorted(e["folder"].glob(f"*_vs_{m['metric']}.png")) if not p.name.startswith("val_loss_vs_")]
        for name, caption in ((f"val_loss_vs_{m['metric']}.png", f"validation loss against {m['metric']}"), *diagnostics,
                              (f"{m['metric']}_vs_horizon.png", f"{m['metric']} against the rollout horizon ({m.get('horizon_label')})"),
                              ("training_curves.png", "validation loss and metric over training"), ("samples.png", "samples")):
            if (e["folder"] / name).exists():
                parts += [f"![{caption}]({rel}/{name})", ""]
    atomic_write_text(out, "\n".join(parts))
    print(f"wrote {out} ({len(entries)} task reports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
